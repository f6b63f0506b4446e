"""Errors that mean "the input is wrong": the CLI prints them as one paragraph, no traceback."""


class UserError(Exception):
    """A problem the user can fix; the message says how."""

    exit_code = 2


class RecipeError(UserError):
    """A recipe, or an override of it, is invalid (every problem is listed)."""


class DataError(UserError):
    """A data file is missing, empty or malformed."""


class RunDirError(UserError):
    """A run directory is missing, incomplete, or would be overwritten."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""

    exit_code = 3


class OutOfMemory(UserError):
    """The step did not fit in memory."""

    exit_code = 4


class Interrupted(UserError):
    """Stopped by the user (Ctrl-C) after a checkpoint was written."""

    exit_code = 130
