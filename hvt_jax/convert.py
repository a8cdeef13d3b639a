"""`python -m hvt_jax.convert`: convert an official PyTorch checkpoint into a model dir (code: `hvt_jax/interop/convert.py`)."""
from hvt_jax import cli

if __name__ == '__main__':
  cli.quiet_native_logs()  # before jax and TensorFlow, which read their log settings when imported
  from hvt_jax.interop import convert
  cli.command(convert)
