"""Finding and preparing the TFDS dataset a config names.

`config.data.name` is any TFDS image-classification dataset (features `image` and `label`):
`imagenet2012`, `cifar100`, or the offline demo `hvt_digits` (registered by importing this
module). Datasets TFDS can download are prepared on first use; `imagenet2012` needs its two
tars, which a user must fetch from image-net.org, in the manual dir.
"""
from __future__ import annotations

import os
import tarfile

import jax
import ml_collections
import tensorflow_datasets as tfds
from absl import logging

from hvt_jax.data import digits  # noqa: F401  (defining the builder registers `hvt_digits`)
from hvt_jax.data import folders
from hvt_jax.errors import UserError

IMAGENET_TARS = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')


# ImageNet's ReaL test set has no `label`: its original one, and a list of corrected ones (an
# image counts as right if the prediction is any of them; images without one are left out).
REAL_LABELS = 'real_label'


def label_key(b: tfds.core.DatasetBuilder) -> str:
  return 'original_label' if REAL_LABELS in b.info.features else 'label'


class DataError(UserError):
  """A dataset that is missing, unknown or unusable; the message says what to do."""


def data_dir(config: ml_collections.ConfigDict) -> str:
  return os.path.expanduser(config.data.data_dir or os.environ.get('TFDS_DATA_DIR')
                            or '~/tensorflow_datasets')


def manual_dir(config: ml_collections.ConfigDict) -> str:
  """Where manually downloaded files go; TFDS's own default is the same path."""
  return os.path.expanduser(config.data.get('manual_dir')
                            or os.path.join(data_dir(config), 'downloads', 'manual'))


def prepare_command(name: str, data_dir_: str, manual_dir_: str | None = None) -> str:
  manual = f' --manual_dir={manual_dir_}' if manual_dir_ else ''
  return f'python -m hvt_jax.prepare_data --dataset={name} --data_dir={data_dir_}{manual}'


def builder(config: ml_collections.ConfigDict,
            setting: str = '--config.data.name') -> tfds.core.DatasetBuilder:
  """The TFDS builder for `config.data.name` in the config's data dir (prepared or not).

  `setting`: how the user chose the name, for error messages.
  """
  name = config.data.name
  try:
    b = tfds.builder(name, data_dir=data_dir(config))
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError(f'unknown dataset {name!r}: set {setting} to a TFDS image '
                    'classification dataset, e.g. imagenet2012, cifar100 or hvt_digits.') from None
  features = b.info.features
  if 'image' not in features or label_key(b) not in features:
    raise DataError(f'dataset {name!r} has features {sorted(features)}, not image and label: '
                    f'set {setting} to an image classification dataset.')
  return b


def check_manual_files(b: tfds.core.DatasetBuilder, data_dir_: str, manual: str) -> None:
  """Raises, saying what to put where, if files a user must download by hand are missing."""
  what = None
  if b.name == 'imagenet2012':
    missing = [f for f in IMAGENET_TARS if not os.path.isfile(os.path.join(manual, f))]
    if missing:
      what = f'{" and ".join(missing)} (from https://image-net.org/download-images)'
  elif b.MANUAL_DOWNLOAD_INSTRUCTIONS and not (os.path.isdir(manual) and os.listdir(manual)):
    what = 'the files its TFDS catalog page names'
  if what:
    raise DataError(f'{b.name} is not prepared in {data_dir_} and needs files downloaded by '
                    f'hand: put {what} in {manual}, then run: '
                    f'{prepare_command(b.name, data_dir_, manual)}')


def prepare(b: tfds.core.DatasetBuilder, data_dir_: str, manual: str) -> None:
  """`download_and_prepare`, with a one-line error for what a user must fetch by hand."""
  check_manual_files(b, data_dir_, manual)
  logging.info('Preparing %s in %s (only once; this can take long for large datasets).',
               b.name, data_dir_)
  try:
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
  except tarfile.TarError as e:
    raise DataError(f'a tar file in {manual} is unreadable ({e}): download it again, then run: '
                    f'{prepare_command(b.name, data_dir_, manual)}') from None
  # No network, an HTTP error, a full disk: all for the user to fix.
  except (OSError, tfds.download.util.DownloadError) as e:
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DataError(f'could not prepare {b.name} in {data_dir_}: {first_line}. Fix that, or '
                    f'prepare it on a machine that can (`{prepare_command(b.name, data_dir_)}`) '
                    f'and copy {os.path.join(data_dir_, b.name)} here.') from None


def ensure_prepared(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The builder, prepared: downloads what TFDS can; ImageNet needs its tars in the manual dir.

  With several processes, preparing is left to `prepare_data` (one writer), since every
  process writing the same data dir at once would clash.
  """
  b = builder(config)
  if b.is_prepared():
    return b
  if jax.process_count() > 1:
    raise DataError(f'{b.name} is not prepared in {data_dir(config)}: prepare it once from one '
                    f'machine with `{prepare_command(b.name, data_dir(config))}` before a '
                    'multi-process run.')
  prepare(b, data_dir(config), manual_dir(config))
  return b


def check_split(b: tfds.core.DatasetBuilder, split: str, key: str) -> int:
  """Number of examples in `split` (TFDS split syntax); `key` names the config setting."""
  try:
    n = b.info.splits[split].num_examples
  except (KeyError, ValueError, AssertionError):
    n = None
  if not n:
    raise DataError(f'{b.name} has no split {split!r} (its splits: {", ".join(b.info.splits)}): '
                    f'set --config.{key} to one of them, e.g. "train" or "train[:90%]".')
  return n


def dataset_info(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(num_train, num_eval, num_classes), preparing the dataset if needed."""
  if config.data.name == folders.NAME:
    return folders.dataset_info(config)
  b = ensure_prepared(config)
  # Evaluating alone needs no train split (ImageNet-v2 and ReaL have none).
  num_train = 0 if config.eval_only else check_split(b, config.data.train_split, 'data.train_split')
  num_eval = check_split(b, config.data.eval_split, 'data.eval_split')
  num_classes = b.info.features[label_key(b)].num_classes
  if num_classes != config.model.num_classes:
    raise DataError(f'{b.name} has {num_classes} classes but the model has '
                    f'{config.model.num_classes}: set --config.model.num_classes={num_classes}.')
  return num_train, num_eval, num_classes
