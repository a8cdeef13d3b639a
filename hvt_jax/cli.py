"""What every `python -m hvt_jax.<tool>` shares: quiet libraries and one-line errors."""
from __future__ import annotations

import logging as py_logging
import os
import sys
import threading
from typing import Callable

from absl import app, flags, logging

from hvt_jax.errors import UserError


def quiet_native_logs() -> None:
  """TensorFlow's and XLA's C++ start-up notices (CPU features, "All log messages before
  absl::InitializeLog()") and per-op warnings ("OP_REQUIRES failed") are for developers.

  Both read the environment once, when first imported (jax even sets its own default), so
  each command module (`python -m hvt_jax.<command>`) calls this before importing either; this
  module imports neither. Importing `hvt_jax` as a library leaves the environment alone. An
  explicit setting or a --verbosity flag keeps them.
  """
  if any(a.startswith(('--verbosity', '-v')) for a in sys.argv[1:]):
    return
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  # TF 2.21 prints its oneDNN notice whatever the log level; the oneDNN kernels serve matmuls
  # and convolutions, which the input pipeline (image ops) does not run, so turn them off.
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')


class _DropLibraryChatter(py_logging.Filter):
  """Orbax and TFDS log every file they touch at INFO; keep only their warnings."""
  NOISY = ('/orbax/', '/tensorflow_datasets/', '/jax/_src/', '/etils/')
  # Warnings about what this project does on purpose: saves between evaluations carry no
  # metric; a dataset prepared for the first time has no dataset_info.json yet.
  EXPECTED = ('Requested `tracked_metric`; did not provide metrics', 'has no dataset_info.json')

  # Orbax's background save threads log each failure, then re-raise it in the main thread,
  # where it becomes the run's one line (a full disk) or its traceback.
  REPEATED = ('raised an exception', 'in background save thread', 'Finalize thread')

  def filter(self, record):
    if record.levelno >= py_logging.WARNING:
      message = record.getMessage()
      if '/orbax/' in record.pathname and any(text in message for text in self.REPEATED):
        return False
      return not any(text in message for text in self.EXPECTED)
    return not any(part in record.pathname for part in self.NOISY)


class _PlainFormatter(py_logging.Formatter):
  """`warning: message`, without absl's time, thread and file:line prefix."""

  def format(self, record):
    return f'{record.levelname.lower()}: {record.getMessage()}'


def quiet_console() -> None:
  """The default console: absl's warnings only, as plain lines; `console` prints progress."""
  logging.set_verbosity(logging.WARNING)
  logging.get_absl_handler().setFormatter(_PlainFormatter())


def quiet_libraries() -> None:
  logging.get_absl_handler().addFilter(_DropLibraryChatter())
  py_logging.getLogger('absl').addFilter(_DropLibraryChatter())


def flag_error_line(e: flags.Error) -> str:
  """A flag error on one line; for a config file that raised, just the flag and its exception."""
  lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
  if any(line.startswith('Traceback') for line in lines):
    flag = lines[0].split(': Error whilst parsing config file')[0]
    exception = lines[-1].split(': ', 1)[-1]  # drop the exception's class path
    return f'{flag}: {exception}'
  if lines and lines[0].startswith('Failed loading config file'):
    return f'cannot load the config file: {lines[-1]}'
  return ' '.join(lines)


def override_error_line(e: Exception, argv: list[str]) -> str:
  """One line for a `--config.key=value` naming no key: the new name of a moved key, else the
  unknown key (config_flags raises AttributeError or KeyError, with a traceback)."""
  overrides = [a.split('=')[0].removeprefix('--config.') for a in argv if a.startswith('--config.')]
  for key in overrides:
    from hvt_jax import defaults  # here: importing it loads jax, after quiet_native_logs
    if key in defaults.MOVED_KEYS:
      return f'config key {key} moved: use --config.{defaults.MOVED_KEYS[key]}'
  detail = e
  while isinstance(detail, BaseException) and detail.args:  # AttributeError wraps a KeyError
    detail = detail.args[0]
  missing, _, hint = str(detail).strip(chr(34)).partition('\n')  # hint: "Did you mean ...?"
  given = ', '.join(f'--config.{key}' for key in overrides)
  return f'no config key {missing} (in {given}); {hint or "the config file lists the valid keys."}'


def config(name: str = 'config'):
  """The value of a config_flags flag; a config file that cannot be loaded is a UserError."""
  value = getattr(flags.FLAGS, name)
  try:
    if value is not None:
      value.keys()  # a config that failed to load raises on first use, not on access
    return value
  except OSError as e:  # config_flags loads the file lazily and reports failures as OSError
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    raise UserError(f'cannot load --{name}: {lines[-1] if lines else e}') from None


def _drop_closed_loop_noise() -> None:
  """Orbax leaves TensorStore callbacks pending when a restore fails; at exit they hit a closed
  asyncio loop and print tracebacks after our one-line error. Those carry no information."""
  def is_noise(exc):
    return isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed'

  previous_unraisable = sys.unraisablehook
  sys.unraisablehook = lambda u: None if is_noise(u.exc_value) else previous_unraisable(u)
  previous_thread = threading.excepthook
  threading.excepthook = lambda a: None if is_noise(a.exc_value) else previous_thread(a)


def run(main: Callable[[list[str]], None]) -> None:
  """`app.run(main)` that ends on a `UserError` with the line `<tool>: error: <message>`.

  Anything else is a bug and keeps its traceback.
  """
  tool = sys.argv[0].rsplit('/', 1)[-1].removesuffix('.py')

  def wrapped(argv):
    quiet_libraries()
    if not flags.FLAGS['verbosity'].present:  # --verbosity=0 brings back the full absl log
      quiet_console()
    _drop_closed_loop_noise()
    try:
      main(argv)
    except UserError as e:
      # The failure is reported; the same failure in Orbax's other background writes would
      # otherwise reach asyncio's logger as "Task exception was never retrieved" at exit.
      py_logging.getLogger('asyncio').addFilter(
          lambda record: 'exception was never retrieved' not in record.getMessage())
      sys.exit(f'{tool}: error: {e}')
    except flags.Error as e:  # config_flags loads a config file when it is first read
      sys.exit(f'{tool}: error: {flag_error_line(e)}')

  def parse_flags(argv):
    # Flag and config-file mistakes would otherwise surface as multi-line tracebacks.
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      sys.exit(f'{tool}: error: {flag_error_line(e)}')
    except (AttributeError, KeyError) as e:  # config_flags: an override names no existing key
      sys.exit(f'{tool}: error: {override_error_line(e, argv)}')

  app.run(wrapped, flags_parser=parse_flags)


def command(module) -> None:
  """Runs a command module's `main` with its flags: what `python -m hvt_jax.<tool>` does."""
  module.define_flags()
  run(module.main)
