"""The one base class for mistakes a user can fix: bad settings, files or inputs.

Each module raises its own subclass with a message that says what to do; command
line tools print that message as a single line (`cli.run`) instead of a traceback.
"""


class UserError(ValueError):
  pass
