"""A tiny fake ImageNet manual dir, laid out exactly as TFDS's `imagenet2012` builder reads it.

- ILSVRC2012_img_train.tar: one tar per class, named `<wnid>.tar`, holding `<wnid>_<i>.JPEG`.
- ILSVRC2012_img_val.tar: `ILSVRC2012_val_<8 digits>.JPEG`; the builder gives the k-th name in
  sorted order the k-th label of its bundled `validation_labels.txt`.

Every image is one flat colour that spells its example id (see `color` / `decode_ids`), so an id
survives cropping, flipping, resizing and normalizing: tests can follow each example through the
pipeline.
"""
from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

STEP = 8  # colour levels per id digit: wide enough to survive JPEG and resizing rounding
BASE = 256 // STEP
WNIDS = ('n01440764', 'n01443537', 'n01484850', 'n01491361')  # the first 4 ImageNet classes


def color(example_id: int) -> tuple[int, int, int]:
  """Red and green spell the id in base 32; blue is fixed."""
  return (STEP * (example_id % BASE), STEP * (example_id // BASE), 128)


def decode_ids(images: np.ndarray, mean, std) -> np.ndarray:
  """(N, S, S, 3) images of flat colours, uint8 or normalized with `mean`, `std` -> (N,)
  example ids.

  The median ignores a random-erasing box (at most a third of the image).
  """
  if not len(images):
    return np.zeros((0,), int)
  pixels = np.median(images, axis=(1, 2))
  if images.dtype != np.uint8:
    pixels = (pixels * np.asarray(std) + np.asarray(mean)) * 255
  digits = np.round(pixels[:, :2] / STEP).astype(int)
  return digits[:, 0] + BASE * digits[:, 1]


def _jpeg(example_id: int, rng: np.random.Generator) -> bytes:
  width, height = (int(v) for v in rng.integers(20, 48, size=2))
  buf = io.BytesIO()
  Image.new('RGB', (width, height), color(example_id)).save(buf, format='JPEG', quality=95)
  return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def validation_wnids() -> list[str]:
  path = tfds.core.tfds_path('datasets/imagenet2012/validation_labels.txt')
  return path.read_text().split()


def write(manual_dir: str, *, per_class: int = 12, num_val: int = 29, seed: int = 0) -> dict:
  """Writes both tars; returns {'train': {id: label}, 'validation': {id: label}}.

  Train ids are 0.. in class order; validation ids follow them.
  """
  rng = np.random.default_rng(seed)
  class_names = tfds.core.tfds_path('datasets/imagenet2012/labels.txt').read_text().split()
  index = {wnid: i for i, wnid in enumerate(class_names)}
  os.makedirs(manual_dir, exist_ok=True)
  expected = {'train': {}, 'validation': {}}

  next_id = 0
  with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_train.tar'), 'w') as train:
    for wnid in WNIDS:
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode='w') as class_tar:
        for i in range(per_class):
          _add(class_tar, f'{wnid}_{i}.JPEG', _jpeg(next_id, rng))
          expected['train'][next_id] = index[wnid]
          next_id += 1
      _add(train, f'{wnid}.tar', inner.getvalue())

  labels = validation_wnids()
  with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_val.tar'), 'w') as val:
    for k in range(num_val):
      _add(val, f'ILSVRC2012_val_{k + 1:08d}.JPEG', _jpeg(next_id, rng))
      expected['validation'][next_id] = index[labels[k]]
      next_id += 1
  return expected


def take(iterator, n):
  """The next `n` batches of an input iterator, as numpy."""
  return [{k: np.asarray(v) for k, v in next(iterator).items()} for _ in range(n)]


def ids_of(batches, config):
  """The example ids (`color`) read back from the pixels of every row of `batches`."""
  return np.concatenate([decode_ids(b['image'], config.eval.mean, config.eval.std)
                         for b in batches])
