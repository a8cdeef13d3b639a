"""`python -m hvt_jax.convert`: convert an official PyTorch checkpoint into a model dir (code: `hvt_jax/interop/convert.py`)."""
from hvt_jax import cli
from hvt_jax.interop import convert

if __name__ == '__main__':
  cli.command(convert)
