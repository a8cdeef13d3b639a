"""Every key a training config has, set to the paper's ImageNet recipe (HVT_FACTS.md).

Config files in `configs/` start from `train_config()` and change what differs.
The returned config is locked by `main.py`, so a mistyped `--config.x=y` is an
error instead of a silently ignored setting.
"""
from __future__ import annotations

from typing import Any

import ml_collections

from hvt_jax import model as model_lib
from hvt_jax.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # All HVT fields (model.HVT); image_size and num_classes also drive the input pipeline.
  c.model = model_lib.variant('hvt-s-1', drop_path=0.1, dtype='auto')

  c.data = dict(
      name='imagenet2012',  # a TFDS image-classification dataset, or 'hvt_digits' (offline demo)
      data_dir=None,  # TFDS data_dir; None: $TFDS_DATA_DIR or ~/tensorflow_datasets
      manual_dir=None,  # imagenet2012's two tars; None: <data_dir>/downloads/manual
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
      flip=True,
      randaugment='rand-m9-mstd0.5-inc1',  # timm-style spec; '' turns it off
      random_erase=0.25,  # probability, pixel mode
      repeated_aug=3,  # each image appears this many times per epoch, differently augmented; 1: off
      mixup=0.8,  # alpha; 0: off
      cutmix=1.0,  # alpha; 0: off
      mix_prob=1.0,  # probability of mixing a batch at all
      switch_prob=0.5,  # probability of cutmix instead of mixup when both are on
      label_smoothing=0.1,
      mean=IMAGENET_MEAN,  # of pixels scaled to [0, 1]
      std=IMAGENET_STD,
      eval_crop_pct=0.875,  # eval: resize shorter side to image_size / crop_pct, center crop
  )

  c.batch_size = 1024  # global, over all processes
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
  c.mesh = (('data', -1),)  # add ('fsdp', n) to split parameters over n devices

  c.log_every_steps = 100
  c.eval_every_steps = -1  # -1: once per epoch
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3  # the latest ones, plus the best by eval top-1
  c.init_from = ''  # a model dir (converted or exported) to start from
  c.eval_only = False
  return c


def eval_preprocess(aug) -> dict[str, Any]:
  """The eval transform's settings, saved with a model so predictions use the same ones."""
  return dict(crop_pct=float(aug.eval_crop_pct), interpolation=str(aug.interpolation),
              mean=[float(m) for m in aug.mean], std=[float(s) for s in aug.std])


# Per dataset: class count and the split to evaluate on. Other TFDS datasets work too, by
# setting data.name, data.eval_split and model.num_classes directly.
DATASETS = {
    'imagenet2012': dict(num_classes=1000, eval_split='validation'),
    'cifar100': dict(num_classes=100, eval_split='test'),
    'hvt_digits': dict(num_classes=10, eval_split='test'),
}


def use_dataset(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  if name not in DATASETS:
    raise UserError(f'data={name!r}: choose one of {", ".join(DATASETS)} (or set '
                    '--config.data.name, data.eval_split and model.num_classes for another).')
  config.data.name = name
  config.data.eval_split = DATASETS[name]['eval_split']
  config.model.num_classes = DATASETS[name]['num_classes']
  return config


def use_recipe(config: ml_collections.ConfigDict, recipe: str) -> ml_collections.ConfigDict:
  """'paper': the defaults above. 'plain': same schedule, crop + flip + label smoothing only."""
  if recipe == 'plain':
    config.aug.update(randaugment='', random_erase=0.0, repeated_aug=1, mixup=0.0, cutmix=0.0)
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
