"""`hvt_digits`: an offline demo dataset, a real TFDS builder around scikit-learn's digits.

scikit-learn ships 1797 handwritten digits (8x8, values 0..16, 10 classes) inside the
package, so this builds with no network. Each image is upsampled to 32x32 RGB uint8 and
stored as JPEG, so it goes through exactly the decode-and-crop path ImageNet takes.

Upsampling is smooth (bicubic), not nearest: a blocky 4x4-pixel image has hard edges that
JPEG rings on and that no random-resized-crop of a photo looks like; a smooth image is the
closer stand-in for a natural low-resolution picture, and the information is the same.

Split: a fixed, stratified 1497 / 300 train / test split (seeded), so every build of every
version of this code gives the same examples in each split.

Defining the class registers it with TFDS; `hvt_jax.data.datasets` imports this module, so
`tfds.builder('hvt_digits', data_dir=...)` and `config.data.name='hvt_digits'` work anywhere.
"""
from __future__ import annotations

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

IMAGE_SIZE = 32
NUM_TEST = 300
SPLIT_SEED = 0
JPEG_QUALITY = 95


def _images_and_labels() -> tuple[np.ndarray, np.ndarray]:
  """(1797, 32, 32, 3) uint8 digits (bright ink on black) and (1797,) int labels."""
  from sklearn.datasets import load_digits  # deferred: sklearn is slow to import
  digits = load_digits()
  small = np.round(digits.images * (255 / 16)).astype(np.uint8)
  big = np.stack([
      np.asarray(Image.fromarray(im, 'L').resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC))
      for im in small
  ])
  return np.repeat(big[..., None], 3, axis=-1), digits.target.astype(np.int64)


def split_indices() -> dict[str, np.ndarray]:
  """Stratified, seeded: the test split holds 300 of the 1797, about 30 of each class."""
  from sklearn.model_selection import train_test_split
  from sklearn.datasets import load_digits
  labels = load_digits().target
  train, test = train_test_split(np.arange(len(labels)), test_size=NUM_TEST, stratify=labels,
                                 random_state=SPLIT_SEED)
  return {'train': np.sort(train), 'test': np.sort(test)}


def _jpeg(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='JPEG', quality=JPEG_QUALITY)
  return buf.getvalue()


class HvtDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's handwritten digits as 32x32 RGB JPEGs (offline demo dataset)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release: bicubic 32x32, stratified 1497/300 split.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description='scikit-learn handwritten digits, upsampled to 32x32 RGB (offline demo).',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
                                         encoding_format='jpeg'),
            'label': tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    images, labels = _images_and_labels()
    return {name: self._generate_examples(images[idx], labels[idx], idx)
            for name, idx in split_indices().items()}

  def _generate_examples(self, images, labels, indices):
    for image, label, index in zip(images, labels, indices):
      # Encoded here (not by TFDS) so the stored bytes depend only on the pinned Pillow.
      yield int(index), {'image': _jpeg(image), 'label': int(label)}
