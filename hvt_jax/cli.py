"""What every `python -m hvt_jax.<tool>` shares: quiet libraries and one-line errors."""
from __future__ import annotations

import logging as py_logging
import sys
from typing import Callable

from absl import app, logging

from hvt_jax.errors import UserError


class _DropLibraryChatter(py_logging.Filter):
  """Orbax and TFDS log every file they touch at INFO; keep only their warnings."""
  NOISY = ('/orbax/', '/tensorflow_datasets/', '/jax/_src/', '/etils/')

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or not any(
        part in record.pathname for part in self.NOISY)


def quiet_libraries() -> None:
  logging.get_absl_handler().addFilter(_DropLibraryChatter())
  py_logging.getLogger('absl').addFilter(_DropLibraryChatter())


def run(main: Callable[[list[str]], None]) -> None:
  """`app.run(main)` that ends on a `UserError` with the line `<tool>: error: <message>`.

  Anything else is a bug and keeps its traceback.
  """
  tool = sys.argv[0].rsplit('/', 1)[-1].removesuffix('.py')

  def wrapped(argv):
    quiet_libraries()
    try:
      main(argv)
    except UserError as e:
      sys.exit(f'{tool}: error: {e}')

  app.run(wrapped)
