"""The exceptions dynbatch raises for problems of input or environment, and that the CLI turns into one line on
stderr, ``dynbatch: error: <problem>; <fix>``, with an exit code.

They are also the types a Python user expects: bad input is a ``ValueError``, a run that cannot go on a
``RuntimeError``. Only the CLI (``dynbatch.cli.main``) prints them instead of raising.
"""


class DynbatchError(Exception):
    """Base of the errors the CLI prints as one line; the message names the problem and the fix."""

    exit_code = 1


class UserError(DynbatchError, ValueError):
    """Bad input (an option, a data file, a run folder). Exit code 2."""

    exit_code = 2


class RunFailure(DynbatchError, RuntimeError):
    """The run could not go on for a reason outside its input (a full disk, a folder that became unwritable, a
    kernel fault). The last checkpoint is intact and the run resumes once the cause is fixed. Exit code 1."""

    exit_code = 1


class Diverged(DynbatchError, RuntimeError):
    """The loss, the gradient or the weights became non-finite; no such update was applied and the last
    checkpoint is intact. Exit code 3."""

    exit_code = 3
