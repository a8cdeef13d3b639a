"""`python -m hvt_jax.export`: a model dir, StableHLO, TF SavedModel or .pth of a model (code: `hvt_jax/interop/export.py`)."""
from hvt_jax import cli

if __name__ == '__main__':
  cli.quiet_native_logs()  # before jax and TensorFlow, which read their log settings when imported
  from hvt_jax.interop import export
  cli.command(export)
