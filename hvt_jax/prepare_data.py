"""Prepare a TFDS dataset once, before training (TFDS shows progress bars while it works).

  python -m hvt_jax.prepare_data --dataset=imagenet2012 --data_dir=/data/tfds \\
      --manual_dir=/data/imagenet_tars
  python -m hvt_jax.prepare_data --dataset=cifar100 --data_dir=/data/tfds
  python -m hvt_jax.prepare_data --dataset=hvt_digits     # offline demo, seconds

ImageNet: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from image-net.org) in the
manual dir (default <data_dir>/downloads/manual). Preparing it takes hours and ~150 GB.
"""
from __future__ import annotations

from hvt_jax import cli

if __name__ == '__main__':
  cli.quiet_native_logs()  # before TensorFlow, imported below, reads its log settings

from absl import flags

from hvt_jax.data import datasets

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Only when run as a program: importing the module defines no flags."""
  flags.DEFINE_string('dataset', 'hvt_digits', 'TFDS name: imagenet2012, cifar100, hvt_digits, ...')
  flags.DEFINE_string('data_dir', None, 'TFDS data dir; default $TFDS_DATA_DIR or '
                      '~/tensorflow_datasets.')
  flags.DEFINE_string('manual_dir', None, 'Manually downloaded files (the ImageNet tars); '
                      'default <data_dir>/downloads/manual.')


def main(argv: list[str]) -> None:
  del argv
  b = datasets.builder(FLAGS.dataset, FLAGS.data_dir, setting='--dataset')
  where = datasets.resolve_data_dir(FLAGS.data_dir)
  manual = datasets.resolve_manual_dir(FLAGS.manual_dir, FLAGS.data_dir)
  if b.is_prepared():
    print(f'{b.name} is already prepared in {b.data_dir}.')
  else:
    datasets.check_manual_files(b, where, manual)
    print(f'Preparing {b.name} {b.version} in {where} ...', flush=True)
    datasets.prepare(b, where, manual)
  splits = ', '.join(f'{name}: {info.num_examples}' for name, info in sorted(b.info.splits.items()))
  print(f'{b.name}: {b.info.features["label"].num_classes} classes; {splits}; in {b.data_dir}')


if __name__ == '__main__':
  define_flags()
  cli.run(main)
