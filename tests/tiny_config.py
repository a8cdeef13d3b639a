"""The demo recipe shrunk for tests: a 4-block HVT on 16x16 digits (16 -> 7 -> 3 tokens).

Blocks 0 and 3 pool; blocks 1 and 2 run as one scan on CPU, so runs keep them stacked.

  python -m hvt_jax.main --config=tests/tiny_config.py --workdir=/tmp/tiny
"""
import importlib.util
import os

from hvt_jax import model as model_lib


def get_config(arg=None):
  path = os.path.join(os.path.dirname(__file__), '..', 'configs', 'demo.py')
  spec = importlib.util.spec_from_file_location('demo_config', path)
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  config = demo.get_config(arg)
  config.model = model_lib.variant('hvt-s-1', image_size=16, patch_size=4, num_heads=2,
                                   head_dim=16, depth=4, pool_every=3, num_classes=10)
  config.batch_size = 32
  config.eval_batch_size = 128
  config.num_epochs = 3
  config.optim.update(lr=2e-3, lr_base_batch=32, warmup_epochs=0, lr_per_epoch=False)
  config.log_every_steps = 4
  config.checkpoint_every_steps = 4
  config.eval_every_steps = 8
  return config
