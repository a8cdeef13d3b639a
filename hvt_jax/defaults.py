"""Every key a training config has, set to the paper's ImageNet recipe (docs/architecture.md).

Config files in `configs/` start from `train_config()` and change what differs.
The returned config is locked by `main.py`, so a mistyped `--config.x=y` is an
error instead of a silently ignored setting.

The image settings come in three groups, one per place they act:
  aug   the train transforms: the crop on the host (tf.data), flip, RandAugment and erasing
        on the device, repeats;
  mix   the on-device batch mixing and the loss targets (Mixup, CutMix, label smoothing);
  eval  the model's input transform: eval crop and resize, and the normalization `mean`/`std`.
`eval.mean` and `eval.std` are the one definition of the normalization: the train transform
reads them too, since they describe what a model's inputs look like rather than an
augmentation. `data.input_spec.eval_transform` turns the `eval` group into the dict saved with
every model ('preprocess'), which predict and the input pipeline pass to `preprocess.eval_image`.
"""
from __future__ import annotations

from typing import Any

import ml_collections
from ml_collections import config_dict

from hvt_jax import model as model_lib
from hvt_jax.data import folders, input_spec
from hvt_jax.errors import UserError

# Keys that moved to another group: old -> new (the command line names the new one).
MOVED_KEYS = {
    **{f'aug.{k}': f'mix.{k}' for k in ('mixup', 'cutmix', 'mix_prob', 'switch_prob',
                                        'label_smoothing')},
    'aug.mean': 'eval.mean', 'aug.std': 'eval.std', 'aug.eval_crop_pct': 'eval.crop_pct',
}


def train_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # All HVT fields (model.HVT); image_size and num_classes also drive the input pipeline.
  c.model = model_lib.variant('hvt-s-1', drop_path=0.1, dtype='auto')

  c.data = dict(
      name='imagenet2012',  # a TFDS image-classification dataset, 'hvt_digits' (offline demo),
      # or 'folder' (ROOT/<split>/<class>/<image>, ROOT in data_dir; data/folders.py).
      # Typed placeholders, None by default, so that --config.data.data_dir=DIR can set them (a
      # plain None cannot be overridden). data_dir: TFDS's, or an image folder's root; None:
      # $TFDS_DATA_DIR or ~/tensorflow_datasets. manual_dir: the ImageNet tars; None:
      # <data_dir>/downloads/manual.
      data_dir=config_dict.placeholder(str),
      manual_dir=config_dict.placeholder(str),
      train_split='train',
      eval_split='validation',
      shuffle_buffer=25_000,  # examples per process, shuffled before decoding
      cache=False,  # keep the encoded dataset in memory (small datasets)
      prefetch=2,  # batches placed on the devices ahead of the train step
      threads=0,  # tf.data worker threads per process; 0: TensorFlow's default (all cores)
  )
  c.aug = dict(
      crop_scale=(0.08, 1.0),  # random-resized-crop area range
      crop_ratio=(3 / 4, 4 / 3),
      interpolation='bicubic',
      # Where the crop window (and the eval image) is resized to image_size: 'device' (inside
      # the train and eval steps: the host only decodes), 'host', or 'auto' (the device on GPUs
      # and TPUs, the host on CPU). For the device the host pads each window or eval image into
      # a window_canvas-sided square (uint8); larger ones are resized on the host.
      resize_on='auto',
      window_canvas=512,
      flip=True,
      randaugment='rand-m9-mstd0.5-inc1',  # timm-style spec; '' turns it off
      random_erase=0.25,  # probability, pixel mode
      repeated_aug=3,  # each image appears this many times per epoch, differently augmented; 1: off
  )
  c.mix = dict(  # on device, inside the train step (data/mixup.py)
      mixup=0.8,  # alpha; 0: off
      cutmix=1.0,  # alpha; 0: off
      mix_prob=1.0,  # probability of mixing a batch at all
      switch_prob=0.5,  # probability of cutmix instead of mixup when both are on
      label_smoothing=0.1,
  )
  # crop_pct: resize the shorter side to image_size / crop_pct, then center crop; mean and std
  # normalize the train images too.
  c.eval = dict(input_spec.IMAGENET_EVAL)

  c.batch_size = 1024  # global, over all processes
  c.accum_steps = 1  # k > 1: each step sums the gradients of k micro-batches of batch_size / k
  c.eval_batch_size = 1024
  c.num_epochs = 300
  c.max_steps = -1  # >0: stop after this many steps (schedules still follow num_epochs)
  c.optim = dict(
      lr=5e-4,  # at lr_base_batch; scaled linearly with batch_size
      lr_base_batch=512,
      weight_decay=0.025,  # not on biases, 1-D params or position embeddings
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      warmup_epochs=5,
      warmup_lr=1e-6,
      min_lr=1e-5,
      lr_per_epoch=True,  # recipe: the lr changes once per epoch; False: every step
      grad_clip=0.0,  # global-norm clip; 0: off
  )
  c.ema_decay = 0.99996  # 0: no EMA
  # A step whose loss or gradients are not finite: False stops the run before anything
  # non-finite is saved; True skips that update (counted as train/skipped_updates).
  c.skip_nonfinite = False
  c.mesh = (('data', -1),)  # add ('fsdp', n) to split parameters over n devices

  c.log_every_steps = 100
  c.eval_every_steps = -1  # -1: once per epoch
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3  # the latest ones, plus the best by eval top-1
  c.init_from = ''  # a model dir (converted or exported) to start from
  c.eval_only = False
  return c


def check_no_moved_keys(config) -> None:
  """A config file written for an older version may set a key that has moved since (e.g.
  `config.aug.mixup`): nothing reads it there, so the run would silently use the default."""
  for old, new in MOVED_KEYS.items():
    group, key = old.split('.')
    if key in config.get(group, {}):
      raise UserError(f'the config sets {old}, which has moved to {new}: set config.{new} in '
                      'the config file instead.')


def upgrade_saved(saved: dict[str, Any]) -> dict[str, Any]:
  """A config saved as JSON (a workdir's config.json) by a version that kept the mixing, loss
  and eval settings in `aug`, regrouped as today, so that its run can still be resumed."""
  if 'aug' not in saved or 'mix' in saved:
    return saved
  aug = dict(saved['aug'])
  # aug.interpolation served train and eval alike.
  regrouped = {'mix': {}, 'eval': {'interpolation': aug.get('interpolation')}}
  for old, new in MOVED_KEYS.items():
    (_, old_key), (group, key) = old.split('.'), new.split('.')
    if old_key in aug:
      regrouped[group][key] = aug.pop(old_key)
  return {**saved, 'aug': aug, **regrouped}


# Per dataset: class count and the split to evaluate on, and for images of one small size the
# canvas that holds any crop of them (aug.window_canvas). Other TFDS datasets work too, by
# setting data.name, data.eval_split and model.num_classes directly.
DATASETS = {
    'imagenet2012': dict(num_classes=1000, eval_split='validation'),
    'cifar100': dict(num_classes=100, eval_split='test', window_canvas=32),
    'hvt_digits': dict(num_classes=10, eval_split='test', window_canvas=32),
    # ImageNet's other test sets, for eval_only with ImageNet weights.
    'imagenet_v2': dict(num_classes=1000, eval_split='test'),
    'imagenet2012_real': dict(num_classes=1000, eval_split='validation'),
}


def use_dataset(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  if name.startswith('folder:'):  # an image folder: ROOT/train/<class>/*, ROOT/val/<class>/*
    return folders.use(config, name.partition(':')[2])
  if name not in DATASETS:
    raise UserError(f'data={name!r}: choose one of {", ".join(DATASETS)}, folder:ROOT (or set '
                    '--config.data.name, data.eval_split and model.num_classes for another).')
  config.data.name = name
  config.data.eval_split = DATASETS[name]['eval_split']
  config.model.num_classes = DATASETS[name]['num_classes']
  if 'window_canvas' in DATASETS[name]:
    config.aug.window_canvas = DATASETS[name]['window_canvas']
  return config


def use_recipe(config: ml_collections.ConfigDict, recipe: str) -> ml_collections.ConfigDict:
  """'paper': the defaults above. 'plain': same schedule, crop + flip + label smoothing only."""
  if recipe == 'plain':
    config.aug.update(randaugment='', random_erase=0.0, repeated_aug=1)
    config.mix.update(mixup=0.0, cutmix=0.0)
  elif recipe != 'paper':
    raise UserError(f'recipe={recipe!r}: choose paper or plain.')
  return config


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """`'stages=2,data=cifar100'` -> ConfigDict, typed like `defaults`; unknown keys are errors."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if not sep or key not in defaults:
      raise UserError(f'config argument {item!r}: expected key=value with key one of '
                      f'{sorted(defaults)}.')
    kind = type(defaults[key])
    try:
      out[key] = value.lower() in ('1', 'true', 'yes') if kind is bool else kind(value)
    except ValueError:
      raise UserError(f'config argument {item!r}: {value!r} is not a {kind.__name__}.') from None
  return out
