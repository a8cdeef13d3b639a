"""Fine-tune saved weights at another resolution or class count, with DeiT's fine-tune recipe.

  python -m hvt_jax.main --config=configs/finetune.py:init_from=/tmp/hvt_s1,size=384 \
      --workdir=/tmp/hvt_s1_384

The weights of `init_from` (a converted or exported model dir, or a training workdir) start
the run, and its saved model config is the architecture: position embeddings are resampled to
`size` (docs/reference.md, "Another resolution"), and a head of another class count starts fresh. The recipe is DeiT's 384 fine-tune (DeiT README:
`--lr 5e-6 --weight-decay 1e-8 --epochs 30 --min-lr 5e-6` at a global batch of 512, warmup
and augmentation as in training): a constant lr of 5e-6 per 512 images after 5 warmup epochs.

Arguments (comma separated, e.g. `configs/finetune.py:init_from=DIR,size=320,data=cifar100`):
  init_from  the weights to start from. Required.
  size       image size to fine-tune at; a multiple of the patch size. Default 384.
  data       imagenet2012 | cifar100 | hvt_digits | folder:ROOT (sets the class count).
             Default imagenet2012.
  epochs     default 30.
  accum      micro-batches per step (`accum_steps`) where 512 images at `size` do not fit.

Expected: DeiT-B gains 1.3 top-1 this way (81.8 at 224 -> 83.1 at 384, DeiT paper);
no 384 figure is published for HVT. Resampling alone, before any fine-tuning, takes the
digits demo from 99.7% held-out top-1 at 32 px to 82.0% at 48 px (README): the fine-tuning is
what adapts the model to the new scale.
"""
from hvt_jax import defaults, loading
from hvt_jax.errors import UserError


def get_config(arg=None):
  arg = defaults.parse_arg(arg, init_from='', size=384, data='imagenet2012', epochs=30, accum=1)
  if not arg.init_from:
    raise UserError('configs/finetune.py needs init_from=DIR: the model dir or workdir whose '
                    'weights to fine-tune.')
  config = defaults.train_config()
  config.model = {**loading.resolve(arg.init_from).meta['model'], 'image_size': arg.size}
  defaults.use_dataset(config, arg.data)
  config.init_from = arg.init_from
  config.num_epochs = arg.epochs
  config.batch_size = 512
  config.accum_steps = arg.accum
  config.optim.update(lr=5e-6, lr_base_batch=512, weight_decay=1e-8, min_lr=5e-6)
  return config
