"""HVT-Ti-1 (and the DeiT-Ti baseline), the paper's recipe.

  python -m hvt_jax.main --config=configs/hvt_ti.py --workdir=/tmp/hvt_ti1

Arguments (comma separated, e.g. `configs/hvt_ti.py:data=cifar100,epochs=100`):
  model    hvt-ti-1 (default) | deit-ti (class token, no pooling: the DeiT baseline).
  data     imagenet2012 | cifar100 | hvt_digits | folder:ROOT (ROOT/train/<class>/*,
           ROOT/val/<class>/*); for eval_only also imagenet_v2 | imagenet2012_real.
           Default imagenet2012.
  recipe   paper | plain (see configs/hvt_s.py).
  epochs   override the 300 epochs.

Expected (paper, ImageNet val, 300 epochs): HVT-Ti-1 top-1 69.64 / top-5 89.40 at 0.64 GMACs;
DeiT-Ti 72.2 top-1 at 1.25 GMACs.
"""
from hvt_jax import defaults
from hvt_jax import model as model_lib
from hvt_jax.errors import UserError


def get_config(arg=None):
  arg = defaults.parse_arg(arg, model='hvt-ti-1', data='imagenet2012', recipe='paper', epochs=300)
  if arg.model not in ('hvt-ti-1', 'deit-ti'):
    raise UserError(f'model={arg.model}: choose hvt-ti-1 or deit-ti.')
  config = defaults.train_config()
  config.model = model_lib.variant(arg.model, drop_path=0.1, dtype='auto')
  defaults.use_dataset(config, arg.data)
  config.num_epochs = arg.epochs
  return defaults.use_recipe(config, arg.recipe)
