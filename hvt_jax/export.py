"""`python -m hvt_jax.export`: export a model from a training workdir (code: `hvt_jax/interop/export.py`)."""
from hvt_jax import cli
from hvt_jax.interop import export

if __name__ == '__main__':
  cli.command(export)
