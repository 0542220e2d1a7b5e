"""The errors a user can cause and fix: each says what is wrong and what to do.

The command-line tools catch `UserError` and print its message as one `error:` line, without a
traceback; any other exception is a bug and keeps its traceback.
"""


class UserError(RuntimeError):
    """A problem with the user's input, data, workdir or machine, explained in the message."""


class ConfigError(UserError, ValueError):
    """A config field has a value that is not allowed."""


class DataError(UserError):
    """The data a config asks for cannot be read; the message says why and how to fix it."""


class CheckpointError(UserError):
    """A checkpoint that was asked for is missing, damaged, or does not fit the config."""


class TrainingError(UserError):
    """Training cannot go on (a non-finite loss, an incompatible or busy workdir)."""


class DistributedError(UserError):
    """The processes of a multi-process run could not find each other in time."""


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type's name if the message is empty), for
    one-line error reports: library messages often run to many lines."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0].strip()[:limit]
