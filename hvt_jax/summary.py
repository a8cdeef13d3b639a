"""`python -m hvt_jax.summary`: parameters, GMACs and tokens per stage of HVT variants (code: `hvt_jax/model/summary.py`)."""
from hvt_jax import cli
from hvt_jax.model import summary

if __name__ == '__main__':
  cli.command(summary)
