"""The exceptions the CLI turns into one line on stderr, ``dynbatch: error: <problem>; <fix>``, and an exit code.

Library code raises these only where the problem is the user's input or the run's environment; the CLI is the one
place that prints them.
"""


class UserError(Exception):
    """Bad input from the user: the message names the problem and the fix, on one line. Exit code 2."""

    exit_code = 2


class RunFailure(UserError):
    """The run could not go on for a reason outside its input (a full disk, a folder that became unwritable).
    The last checkpoint is intact and the run resumes once the cause is fixed. Exit code 1."""

    exit_code = 1


class Diverged(UserError):
    """The loss or the gradient became non-finite; the optimizer never applied it and the last checkpoint is
    intact. Exit code 3."""

    exit_code = 3
