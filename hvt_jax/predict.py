"""`python -m hvt_jax.predict`: classify image files with a saved model (code: `hvt_jax/interop/predict.py`)."""
from hvt_jax import cli

if __name__ == '__main__':
  cli.quiet_native_logs()  # before jax and TensorFlow, which read their log settings when imported
  from hvt_jax.interop import predict
  cli.command(predict)
