"""Errors a user can act on. Each carries one sentence that says what is wrong and what to do.

The CLI prints ``str(error)`` and exits non-zero without a traceback (``MINIGIANT_DEBUG=1`` shows one).
"""


class MinigiantError(Exception):
    """Base class: anything the user can fix by changing their input."""


class ConfigError(MinigiantError):
    """A recipe, config field or CLI flag is unknown or has the wrong type or value."""


class ModelLoadError(MinigiantError):
    """A model path is missing, is not a model, or its weight file is corrupt."""


class DataError(MinigiantError):
    """Training, calibration or evaluation data is missing, empty or too short."""


class BudgetError(MinigiantError):
    """A size or parameter budget cannot be met (e.g. pruning would remove every layer)."""


class OutputError(MinigiantError):
    """An output path would replace an input or a user's files, or cannot be written."""


class TrainingError(MinigiantError):
    """Training diverged (NaN/inf loss) or could not resume."""


def did_you_mean(word, choices) -> str:
    """``"did you mean 'x'? "`` for the closest of ``choices`` to ``word``, or ``""`` when none is close."""
    import difflib

    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f"did you mean {close[0]!r}? " if close else ""
