"""Image folders laid out as the official release keeps ImageNet: ROOT/<split>/<class>/<image>.

`data=folder:ROOT` (or `--config.data.name=folder --config.data.data_dir=ROOT`) trains from
ROOT/train and evaluates on ROOT/val (`data.train_split` / `data.eval_split` name other
folders). The classes are the sorted sub-folder names of the train folder, and every split
must have the same set. Each split is listed once per process (`os.scandir`: no per-file
`stat`), into arrays that tf.data reads from; nothing per file happens in Python afterwards.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import ml_collections
import numpy as np

from hvt_jax.errors import UserError

NAME = 'folder'
# What TensorFlow's decode_image reads; other files (README, .DS_Store, ...) are left out.
IMAGE_EXTENSIONS = ('.jpeg', '.jpg', '.png', '.gif', '.bmp', '.webp')


class FolderError(UserError):
  pass


@dataclasses.dataclass(frozen=True)
class Listing:
  """One split: every image's path and label, in a fixed order (by class, then file name)."""
  paths: np.ndarray  # str
  labels: np.ndarray  # int64
  class_names: tuple[str, ...]


def root(config: ml_collections.ConfigDict) -> str:
  if not config.data.data_dir:
    raise FolderError('data.name=folder needs the image folder: pass data=folder:ROOT or '
                      '--config.data.data_dir=ROOT (holding train/<class>/ and val/<class>/).')
  return os.path.expanduser(config.data.data_dir)


def split_dir(root_: str, split: str) -> str:
  path = os.path.join(root_, split)
  if split == 'validation' and not os.path.isdir(path):
    path = os.path.join(root_, 'val')  # the TFDS default name, as ImageNet folders call it
  return path


def class_names(root_: str, split: str) -> tuple[str, ...]:
  if not os.path.isdir(root_):
    raise FolderError(f'image folder {root_} does not exist: pass the folder that holds '
                      'train/<class>/ and val/<class>/.')
  path = split_dir(root_, split)
  if not os.path.isdir(path):
    raise FolderError(f'{path} is not a folder: the image folder needs {split}/<class>/<images> '
                      f'(set --config.data.train_split / eval_split to other folder names).')
  with os.scandir(path) as entries:
    names = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith('.'))
  if not names:
    raise FolderError(f'{path} has no class folders: put each class\'s images in '
                      f'{path}/<class name>/.')
  return tuple(names)


@functools.lru_cache(maxsize=None)
def list_split(root_: str, split: str, train_split: str) -> Listing:
  """The split's images, labelled by the classes of `train_split`; listed once per process."""
  names = class_names(root_, train_split)
  here = class_names(root_, split)
  if here != names:
    missing, extra = sorted(set(names) - set(here)), sorted(set(here) - set(names))
    raise FolderError(f'{split_dir(root_, split)} has other classes than '
                      f'{split_dir(root_, train_split)}: missing {missing[:5]}, extra '
                      f'{extra[:5]}; both need the same class folders.')
  paths, labels = [], []
  for label, name in enumerate(names):
    folder = os.path.join(split_dir(root_, split), name)
    with os.scandir(folder) as entries:
      files = sorted(e.name for e in entries
                     if e.name.lower().endswith(IMAGE_EXTENSIONS) and not e.name.startswith('.'))
    paths.extend(os.path.join(folder, f) for f in files)
    labels.extend([label] * len(files))
  if not paths:
    raise FolderError(f'{split_dir(root_, split)} holds no images ({", ".join(IMAGE_EXTENSIONS)}).')
  return Listing(np.array(paths, dtype=object), np.array(labels, np.int64), names)


def listing(config: ml_collections.ConfigDict, split: str) -> Listing:
  return list_split(root(config), split, config.data.train_split)


def dataset_info(config: ml_collections.ConfigDict) -> tuple[int, int, tuple[str, ...]]:
  """(num_train, num_eval, class names), checked as `datasets.open_dataset` checks TFDS's."""
  train = listing(config, config.data.train_split)
  num_eval = len(listing(config, config.data.eval_split).labels)
  num_classes = len(train.class_names)
  if num_classes != config.model.num_classes:
    raise FolderError(f'{root(config)} has {num_classes} classes but the model has '
                      f'{config.model.num_classes}: set --config.model.num_classes={num_classes}.')
  return len(train.labels), num_eval, train.class_names


def use(config: ml_collections.ConfigDict, root_: str) -> ml_collections.ConfigDict:
  """`data=folder:ROOT` in a config file: ROOT/train and ROOT/val, the class count from ROOT."""
  config.data.update(name=NAME, data_dir=root_, train_split='train', eval_split='val')
  config.model.num_classes = len(class_names(os.path.expanduser(root_), 'train'))
  return config


def undecodable(paths) -> list[str]:
  """The files among `paths` TensorFlow cannot decode (slow: only to name them after a failure)."""
  import tensorflow as tf  # here: the config and model paths import this module without TF
  bad = []
  for path in paths:
    try:
      tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError, tf.errors.UnknownError):
      bad.append(str(path))
  return bad
