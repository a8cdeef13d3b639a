"""HVT-S with 0-4 pooling stages (HVT-S-0 ... HVT-S-4), the paper's recipe.

  python -m hvt_jax.main --config=configs/hvt_s.py:stages=1 --workdir=/tmp/hvt_s1

Arguments (comma separated, e.g. `configs/hvt_s.py:stages=2,data=cifar100`):
  stages   0..4: HVT-S-<stages> (0 = DeiT-S without class token, no pooling). Default 1.
  data     imagenet2012 | cifar100 | hvt_digits | folder:ROOT (ROOT/train/<class>/*,
           ROOT/val/<class>/*); for eval_only also imagenet_v2 | imagenet2012_real.
           Default imagenet2012.
  recipe   paper: 300 epochs, DeiT augmentation, mixup/cutmix, EMA (the published runs);
           plain: the same schedule without RandAugment, erasing, mixup/cutmix and repeats.
  epochs   override the 300 epochs.

Expected (paper, ImageNet val, 8x128 images per step, 300 epochs): top-1 80.39 (S-0),
78.00 (S-1), 77.36 (S-2), 76.32 (S-3), 75.23 (S-4). Each step at 224 px costs
4.57 / 2.40 / 1.94 / 1.62 / 1.39 GMACs per image (`python -m hvt_jax.summary`).
"""
from hvt_jax import defaults
from hvt_jax import model as model_lib
from hvt_jax.errors import UserError


def get_config(arg=None):
  arg = defaults.parse_arg(arg, stages=1, data='imagenet2012', recipe='paper', epochs=300)
  if not 0 <= arg.stages <= 4:
    raise UserError(f'stages={arg.stages}: HVT-S has 0 to 4 pooling stages.')
  config = defaults.train_config()
  config.model = model_lib.variant(f'hvt-s-{arg.stages}', drop_path=0.1, dtype='auto')
  defaults.use_dataset(config, arg.data)
  config.num_epochs = arg.epochs
  return defaults.use_recipe(config, arg.recipe)
