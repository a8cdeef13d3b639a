"""The one base class for mistakes a user can fix: bad settings, files or inputs.

Each module raises its own subclass with a message that says what to do; command
line tools print that message as a single line (`cli.run`) instead of a traceback.
"""


class UserError(ValueError):
  pass


class InputError(UserError):
  """A batch size or setting the input pipeline cannot use; the message says what to do.

  Shared by the data modules; it lives here so that `data.feeding`, the host-to-device half,
  imports without TensorFlow (a GPU image without it runs the train feed: gpu_check.sh).
  """
