"""`python -m hvt_jax.aot`: compile the train and eval steps for a TPU slice on any machine; memory per chip, FLOPs, fit (code: `hvt_jax/training/aot.py`)."""
from hvt_jax import cli
from hvt_jax.training import aot

if __name__ == '__main__':
  cli.command(aot)
