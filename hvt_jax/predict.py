"""`python -m hvt_jax.predict`: classify image files with a saved model (code: `hvt_jax/interop/predict.py`)."""
from hvt_jax import cli
from hvt_jax.interop import predict

if __name__ == '__main__':
  cli.command(predict)
