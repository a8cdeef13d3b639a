"""A small HVT learns handwritten digits offline on a CPU, in about 5 minutes.

  python -m hvt_jax.main --config=configs/demo.py --workdir=/tmp/hvt_demo

The data are scikit-learn's 1,797 bundled 8x8 digits as 32x32 images (the `hvt_digits` TFDS
dataset, built on first use with no download). The model: patch 4 (64 tokens), width 64,
6 blocks, pooling after blocks 0, 2 and 4 (64 -> 31 -> 15 -> 7 tokens).
Expected: 99.7% top-1 (299/300 held-out digits) after 5.5 min on a 2-core VM (README);
curves in /tmp/hvt_demo/curves.png.

Arguments: `configs/demo.py:epochs=5` for a quicker smoke run.
"""
from hvt_jax import defaults
from hvt_jax import model as model_lib


def get_config(arg=None):
  arg = defaults.parse_arg(arg, epochs=40)
  config = defaults.train_config()
  config.model = model_lib.variant('hvt-s-1', image_size=32, patch_size=4, num_heads=2,
                                   head_dim=32, depth=6, pool_every=2, drop_path=0.05)
  defaults.use_dataset(config, 'hvt_digits')
  config.data.shuffle_buffer = 2_000
  config.data.cache = True
  config.aug.update(crop_scale=(0.6, 1.0), flip=False, randaugment='', random_erase=0.0,
                    repeated_aug=1)
  config.mix.update(mixup=0.0, cutmix=0.0)
  config.batch_size = 64
  config.eval_batch_size = 100
  config.num_epochs = arg.epochs
  config.optim.update(lr=1e-3, lr_base_batch=64, weight_decay=0.05, warmup_epochs=2)
  config.ema_decay = 0.99
  config.log_every_steps = 20
  config.checkpoint_every_steps = 200
  return config
