"""Finding and preparing the TFDS dataset a config names.

`config.data.name` is any TFDS image-classification dataset (features `image` and `label`):
`imagenet2012`, `cifar100`, or the offline demo `hvt_digits` (registered by importing this
module). Datasets TFDS can download are prepared on first use; `imagenet2012` needs its two
tars, which a user must fetch from image-net.org, in the manual dir.
"""
from __future__ import annotations

import dataclasses
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


def resolve_data_dir(data_dir: str | None) -> str:
  """The TFDS data dir: `data_dir` if set, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return os.path.expanduser(data_dir or os.environ.get('TFDS_DATA_DIR')
                            or '~/tensorflow_datasets')


def resolve_manual_dir(manual_dir: str | None, data_dir: str | None) -> str:
  """Where manually downloaded files go; TFDS's own default is the same path."""
  return os.path.expanduser(manual_dir
                            or os.path.join(resolve_data_dir(data_dir), 'downloads', 'manual'))


def prepare_command(name: str, data_dir_: str, manual_dir_: str | None = None) -> str:
  manual = f' --manual_dir={manual_dir_}' if manual_dir_ else ''
  return f'python -m hvt_jax.prepare_data --dataset={name} --data_dir={data_dir_}{manual}'


def builder(name: str, data_dir: str | None = None,
            setting: str = '--config.data.name') -> tfds.core.DatasetBuilder:
  """The TFDS builder for dataset `name` in `data_dir` (resolved as above; prepared or not).

  `setting`: how the user chose the name, for error messages.
  """
  try:
    b = tfds.builder(name, data_dir=resolve_data_dir(data_dir))
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
  data = config.data
  b = builder(data.name, data.data_dir)
  if b.is_prepared():
    return b
  where = resolve_data_dir(data.data_dir)
  if jax.process_count() > 1:
    raise DataError(f'{b.name} is not prepared in {where}: prepare it once from one '
                    f'machine with `{prepare_command(b.name, where)}` before a '
                    'multi-process run.')
  prepare(b, where, resolve_manual_dir(data.manual_dir, data.data_dir))
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


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A run's dataset, opened once (`open_dataset`) and shared by the input and the model files."""
  builder: tfds.core.DatasetBuilder | None  # prepared; None for an image folder (data/folders.py)
  num_train: int  # examples in config.data.train_split (0 for an eval-only run)
  num_eval: int  # examples in config.data.eval_split
  class_names: tuple[str, ...]  # in label order


def open_dataset(config: ml_collections.ConfigDict) -> Dataset:
  """The config's dataset, prepared if needed, with its splits and class count checked."""
  if config.data.name == folders.NAME:
    num_train, num_eval, names = folders.dataset_info(config)
    return Dataset(None, num_train, num_eval, names)
  b = ensure_prepared(config)
  # Evaluating alone needs no train split (ImageNet-v2 and ReaL have none).
  num_train = 0 if config.eval_only else check_split(b, config.data.train_split, 'data.train_split')
  num_eval = check_split(b, config.data.eval_split, 'data.eval_split')
  label = b.info.features[label_key(b)]
  if label.num_classes != config.model.num_classes:
    raise DataError(f'{b.name} has {label.num_classes} classes but the model has '
                    f'{config.model.num_classes}: set '
                    f'--config.model.num_classes={label.num_classes}.')
  return Dataset(b, num_train, num_eval, tuple(label.names))
