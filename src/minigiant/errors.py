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


class TrainingError(MinigiantError):
    """Training diverged (NaN/inf loss) or could not resume."""
