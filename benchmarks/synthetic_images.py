"""ImageNet-sized synthetic JPEGs for the input benchmarks, in memory or as an image folder.

ImageNet's training JPEGs average about 500x375 pixels and 110 KB; decoding them is most of what
the host pipeline costs, so the benchmarks time images of that size rather than the 32x32
offline digits.
"""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image


def synthetic_jpegs(count: int = 128, size=(500, 375), seed: int = 0) -> list[bytes]:
  """Photo-like JPEGs: smooth colour fields plus fine noise, ~100 KB each at quality 90."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize(size, Image.BICUBIC), np.float32)
    pixels = np.clip(smooth + rng.normal(0, 18, smooth.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format='JPEG', quality=90)
    out.append(buf.getvalue())
  return out


def write_folder(root: str, jpegs: list[bytes], *, train: int, val: int, classes: int) -> None:
  """ROOT/train/<class>/*.jpg (`train` files) and ROOT/val/<class>/*.jpg (`val`), as
  `data=folder:ROOT` reads them, dealt round-robin over the classes.

  The files are hard links to the distinct `jpegs` (written once to ROOT/distinct, which no
  split lists): decoding costs the same whichever copy is read, and the folder takes no more
  disk than the distinct images.
  """
  distinct = os.path.join(root, 'distinct')
  os.makedirs(distinct)
  sources = []
  for i, data in enumerate(jpegs):
    sources.append(os.path.join(distinct, f'{i}.jpg'))
    with open(sources[-1], 'wb') as f:
      f.write(data)
  for split, count in (('train', train), ('val', val)):
    for c in range(classes):
      os.makedirs(os.path.join(root, split, f'class_{c:03d}'))
    for i in range(count):
      os.link(sources[i % len(sources)],
              os.path.join(root, split, f'class_{i % classes:03d}', f'{i:07d}.jpg'))
