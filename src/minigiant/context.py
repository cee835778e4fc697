"""What travels beside the model through the stages: tokenizer, teacher, seed, work dir, time scale and cap."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Context:
    tokenizer: Any = None  # the tokenizer shared by teacher and students
    teacher: Any = None  # a PreTrainedModel, needed by distill
    seed: int = 0
    work_dir: Path | None = None  # where a stage keeps checkpoints while it runs
    time_scale: float = 1.0  # multiplies every time budget (``minigiant run --minutes`` sets it)
    # The most minutes the next stage's time budget may use so that the run keeps to its planned minutes (``run``
    # sets it before each stage with a budget, ``pipeline.budget_cap``); None: the budget as planned.
    minutes_cap: float | None = None

    def require_tokenizer(self, stage: str):
        from .errors import ConfigError

        if self.tokenizer is None:
            raise ConfigError(f"{stage} needs a tokenizer: pass Context(tokenizer=...) (minigiant.load returns one)")
        return self.tokenizer
