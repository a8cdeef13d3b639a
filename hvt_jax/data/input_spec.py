"""What a model's input looks like: the eval transform and normalization saved with every model.

A model dir's `model.json` carries the dict `eval_transform` returns ('preprocess'); predict,
the exported models and the input pipeline's eval side all read that dict, and the train
step normalizes with its `mean`/`std`. No TensorFlow here: the config schema (`defaults`)
and model dirs use these settings without the input pipeline.
"""
from __future__ import annotations

import math
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The recipe's eval transform on ImageNet (DeiT/timm): resize the shorter side to
# image_size / crop_pct (256 for 224), center crop, bicubic; mean/std of pixels scaled to [0, 1].
IMAGENET_EVAL = dict(crop_pct=0.875, interpolation='bicubic', mean=IMAGENET_MEAN, std=IMAGENET_STD)


def eval_transform(eval_group=None) -> dict[str, Any]:
  """The eval transform as saved with a model ('preprocess') and passed to `eval_image`.

  `eval_group`: a config's `eval` (a ConfigDict or dict); None: the recipe's ImageNet one.
  """
  e = IMAGENET_EVAL if eval_group is None else eval_group
  return dict(crop_pct=float(e['crop_pct']), interpolation=str(e['interpolation']),
              mean=[float(m) for m in e['mean']], std=[float(s) for s in e['std']])


def eval_geometry(height, width, size: int, crop_pct: float, xp):
  """(new_h, new_w, top, left): torchvision's Resize(floor(size / crop_pct)) of a height x width
  image (the shorter side becomes that, the longer one truncates), then CenterCrop(size)'s
  offsets in it, rounded half to even as torchvision rounds them. For the host's resize
  (`preprocess.eval_crop`, xp = tensorflow) and the device's (`device_resize.eval_crops`,
  xp = jax.numpy) alike, on integer scalars.
  """
  scale = int(math.floor(size / crop_pct))
  new_h = xp.where(height <= width, scale, scale * height // width)
  new_w = xp.where(height <= width, scale * width // height, scale)
  return new_h, new_w, _half_to_even(new_h - size), _half_to_even(new_w - size)


def _half_to_even(d):
  """round(d / 2), half to even, for integers d >= 0."""
  half = d // 2
  return half + d % 2 * (half % 2)
