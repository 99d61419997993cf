"""The project's exceptions: the bottom of common/ (imports nothing of the project), so every module may
raise them without importing the command-line layer above it.

  UserError    a problem with the user's input; the message names the problem and the fix, on one line.
               `cli.run_main` prints it as `error: ...` and exits with status 2.
  Interrupted  SIGINT/SIGTERM during training, after the training state was saved; the message says how to
               resume (exit status 130).
"""


class UserError(Exception):
    """A problem with the user's input. The message names the problem and the fix, on one line."""


class Interrupted(Exception):
    """SIGINT/SIGTERM during training, after the training state was saved; the message says how to resume."""
