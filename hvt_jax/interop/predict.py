"""Classify image files with a saved model: top-5 classes with probabilities.

  python -m hvt_jax.predict --model=/tmp/hvt_ti_1 cat.jpg dog.png

`--model` is any model dir or training workdir `hvt_jax.load` accepts, or the
name of a published model (`hvt-s-1`: downloaded and converted once, then read
from the cache; `hvt_jax/interop/weights.py`). Images get
the eval transform saved with the model (for ImageNet: resize 256, center crop
224, bicubic). A 1000-class model names ImageNet classes; other models use the
class names saved at training time. A file that cannot be read gets one error
line and the others are still classified; the exit status is 1 if any failed.
`--image_size=S` runs the model at S, its position embeddings resampled.
"""
from __future__ import annotations

import re
import sys

from absl import flags
import jax
import numpy as np
import tensorflow as tf

from hvt_jax import loading, model_dir
from hvt_jax.data import input_spec, preprocess
from hvt_jax.errors import UserError

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Only when run as a program: importing the module defines no flags."""
  flags.DEFINE_string('model', None, 'model dir, training workdir or published name (hvt-s-1)')
  flags.DEFINE_bool('ema', False, 'for a workdir: use the EMA weights')
  flags.DEFINE_integer('top', 5, 'how many classes to print per image')
  flags.DEFINE_integer('batch', 32, 'images per forward pass')
  flags.DEFINE_integer('image_size', None, 'run the model at this size, its position '
                       'embeddings resampled from the saved ones (default: its own size)')
  flags.mark_flags_as_required(['model'])


class ImageError(UserError):
  """A file given to predict is missing or not a decodable image."""


def class_names(meta: dict, num_classes: int) -> list[str]:
  if meta.get('class_names') and len(meta['class_names']) == num_classes:
    return list(meta['class_names'])
  if num_classes == 1000:
    # TFDS ships the 1000 ImageNet class names in label order.
    from tensorflow_datasets.datasets.siscore import labels
    return list(labels.IMAGENET_LABELS_LIST)
  return [f'class {i}' for i in range(num_classes)]


def load_image(path: str, size: int, settings: dict) -> np.ndarray:
  """The eval transform of one file; raises UserError with the reason if it is unreadable."""
  try:
    data = tf.io.read_file(path)
    image = preprocess.eval_image(data, size=size, **settings)
    return image.numpy()
  except (tf.errors.NotFoundError, tf.errors.InvalidArgumentError, tf.errors.UnknownError,
          tf.errors.FailedPreconditionError) as e:
    reason = 'no such file' if isinstance(e, tf.errors.NotFoundError) else 'not a readable image'
    # Without TF's op names around the reason: `{{function_node ...}} why [Op:DecodeImage] name:`.
    detail = re.sub(r'^\{\{.*?\}\}|\[Op:.*$', '', e.message.splitlines()[0]).strip()
    raise ImageError(f'{path}: {reason} ({detail[:120]})') from None


def predict(model_path: str, paths: list[str], *, ema: bool = False, top: int = 5, batch: int = 32,
            image_size: int | None = None):
  """Yields (path, [(class name, probability), ...]) or (path, error message) per file."""
  saved = loading.resolve(model_path, ema=ema)
  model, params = model_dir.restore(saved, image_size=image_size)
  meta = saved.meta
  settings = meta.get('preprocess') or input_spec.eval_transform()
  names = class_names(meta, model.num_classes)
  forward = jax.jit(lambda p, x: jax.nn.softmax(model.apply({'params': p}, x)))
  for start in range(0, len(paths), batch):
    chunk, images = [], []
    for path in paths[start:start + batch]:
      try:
        images.append(load_image(path, model.image_size, settings))
        chunk.append(path)
      except ImageError as e:
        yield path, str(e)
    if not chunk:
      continue
    x = np.stack(images)
    # Pad to a fixed batch so every chunk reuses one compiled program.
    padded = np.concatenate([x, np.zeros((batch - len(x),) + x.shape[1:], x.dtype)])
    probs = np.asarray(forward(params, padded))[:len(x)]
    k = min(top, model.num_classes)
    for path, p in zip(chunk, probs):
      best = np.argsort(-p)[:k]
      yield path, [(names[i], float(p[i])) for i in best]


def main(argv):
  paths = argv[1:]
  if not paths:
    raise UserError('give one or more image files after the flags.')
  failed = 0
  for path, result in predict(FLAGS.model, paths, ema=FLAGS.ema, top=FLAGS.top, batch=FLAGS.batch,
                              image_size=FLAGS.image_size):
    if isinstance(result, str):
      failed += 1
      print(f'predict: error: {result}', file=sys.stderr)
      continue
    print(path)
    for name, prob in result:
      print(f'  {prob:7.2%}  {name}')
  if failed:
    sys.exit(1)

