"""Budgets: "keep N parameters / X% / Y MB" → the fraction of the decoder layers' parameters to keep, and
how a strategy splits that fraction between depth (whole layers) and width (neurons, heads).

Counts are those of ``models.architecture``: tied weights once, embeddings (and an untied head) apart. The
embeddings and the final norm are never pruned, so a budget must leave room for them.
"""

from __future__ import annotations

import math
import re

import torch

from ..errors import BudgetError, ConfigError
from ..models.architecture import decoder_layers, embedding_parameters, total_parameters

_UNITS = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9}


def decoder_parameters(model) -> int:
    """Parameters of the decoder layers, each shared tensor once (``share.py``)."""
    return sum(p.numel() for p in {id(p): p for layer in decoder_layers(model) for p in layer.parameters()}.values())


def keep_fraction(model, budget: str | int | float | None, target: float) -> float:
    """Fraction of the decoder layers' parameters to keep for ``budget`` (or ``target`` when it is None)."""
    if budget is None:
        return target
    text = str(budget).strip().upper().replace(",", "").replace("_", "")
    if text.endswith("%"):
        fraction = _number(text[:-1], budget) / 100
        if not 0 < fraction <= 1:
            raise BudgetError(f"budget {budget!r} must be a percentage in (0%, 100%]")
        return fraction
    size = re.fullmatch(r"([0-9.E+]+)\s*([KMG]?)B", text)
    if size:  # bytes in the model's dtype
        bytes_per_param = next(decoder_layers(model)[0].parameters()).element_size()
        params = _number(size.group(1), budget) * _UNITS[size.group(2)] / bytes_per_param
    else:
        count = re.fullmatch(r"([0-9.E+]+)\s*([KMB]?)", text)
        if not count:
            raise ConfigError(f"budget {budget!r}: write a parameter count ('90M', 90000000), a percentage ('60%') or a size ('300MB')")
        params = _number(count.group(1), budget) * _UNITS[count.group(2)]
    total = total_parameters(model)
    fixed = total - decoder_parameters(model)  # embeddings, head, final norm: never pruned
    if params > total:
        raise BudgetError(f"budget {budget!r} ({params:,.0f} parameters) is above the model's size ({total:,}); give a smaller budget")
    if params <= fixed:
        raise BudgetError(f"budget {budget!r} ({params:,.0f} parameters) leaves nothing for the decoder layers (embeddings and norms alone hold {fixed:,}); give a larger budget")
    return (params - fixed) / decoder_parameters(model)


def _number(text: str, budget) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"budget {budget!r}: {text!r} is not a number") from None


def sharing_budgets(model, budget: int, shared: int) -> tuple[int, float]:
    """What depth and width must keep so that the decoder holds ``budget`` parameters once ``shared`` layers
    run another layer's projections (``share.py``; their norms stay their own, so they still count):
    ``(depth budget, per-layer budget of the current layers)``. With nothing shared, ``(budget, budget / layers)``.
    Depth keeps ``shared`` whole layers more, so it lands over the budget by their norms (a few hundred
    parameters each) rather than a whole layer under it."""
    layers = decoder_layers(model)
    per_layer = sum(p.numel() for p in layers[0].parameters())
    norms = sum(p.numel() for m in layers[0].modules() if not isinstance(m, torch.nn.Linear) for p in m.parameters(recurse=False))
    from .share import check_share_count

    check_share_count(shared, len(layers))
    return budget + shared * per_layer, (budget - len(layers) * norms) / (len(layers) - shared) + norms


def depth_share(structure: str, fraction: float) -> float:
    """The fraction of decoder parameters the depth step keeps: all of the cut for ``depth``, none for ``width``,
    and half of it in log terms for ``balanced`` (depth and width each keep sqrt(fraction))."""
    return {"depth": fraction, "width": 1.0, "balanced": math.sqrt(fraction)}[structure]


__all__ = ["decoder_parameters", "depth_share", "embedding_parameters", "keep_fraction", "sharing_budgets"]
