"""`python -m hvt_jax.export`: a model dir, StableHLO, TF SavedModel or .pth of a model (code: `hvt_jax/interop/export.py`)."""
from hvt_jax import cli
from hvt_jax.interop import export

if __name__ == '__main__':
  cli.command(export)
