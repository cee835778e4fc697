"""The verbs a recipe can name: each is a config dataclass and a function ``verb(model, config, ctx)``.

A new stage kind is one entry here; its config class drives recipe validation and its CLI flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .registry import Registry


@dataclass(frozen=True)
class Stage:
    config: type
    apply: Callable  # (model, config, ctx) -> model
    makes_model: bool = True  # False for stages that only measure (evaluate)


STAGES: Registry[Callable[[], Stage]] = Registry("stage")


@STAGES.register("prune")
def _prune() -> Stage:
    from .prune import PruneConfig, prune

    return Stage(PruneConfig, prune)


@STAGES.register("distill")
def _distill() -> Stage:
    from .distill import DistillConfig, distill

    return Stage(DistillConfig, distill)


@STAGES.register("quantize")
def _quantize() -> Stage:
    from .quantize import QuantizeConfig, quantize

    return Stage(QuantizeConfig, quantize)


@STAGES.register("evaluate")
def _evaluate() -> Stage:
    from .evaluate import EvaluateConfig

    return Stage(EvaluateConfig, None, makes_model=False)


@STAGES.register("select")
def _select() -> Stage:
    from .select import SelectConfig

    return Stage(SelectConfig, None, makes_model=False)


def stage(name: str) -> Stage:
    return STAGES.get(name)()
