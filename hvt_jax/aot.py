"""`python -m hvt_jax.aot`: compile the train and eval steps for a TPU slice on any machine; memory per chip, FLOPs, fit (code: `hvt_jax/training/aot.py`)."""
from hvt_jax import cli

if __name__ == '__main__':
  cli.quiet_native_logs()  # before jax and TensorFlow, which read their log settings when imported
  from hvt_jax.training import aot
  cli.command(aot)
