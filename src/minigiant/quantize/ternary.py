"""Ternary and binary weights with a scale per group.

``ternary`` (TWN, Li et al. 2016): each weight becomes ``-a``, ``0`` or ``+a``. Weights below a threshold
``t * mean|w|`` go to 0, the rest keep their sign, and ``a`` is the mean magnitude of those kept, the
least-squares value for that choice; ``t`` is searched per group over ``THRESHOLDS``. Stored on the
symmetric 2-bit grid (codes 1..3 around the middle code 2; code 0 unused), so it runs and saves like any
2-bit weight; 1.58 bits would need base-3 packing, which no kernel reads.

``binary``: each weight becomes one of two values per group, the means of its negative and non-negative
weights (the least-squares pair for the sign split), stored as 1-bit codes with a float scale and min
(``code * (high - low) + low``).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .formats import METHOD_FORMATS, QUANTIZATION_METHODS, QuantizedWeight, WeightFormat, _stored, assemble

THRESHOLDS = tuple(x / 20 for x in range(4, 25))  # 0.2 .. 1.2 of the group's mean magnitude


def quantize_ternary(weight: torch.Tensor, fmt: WeightFormat) -> QuantizedWeight:
    rows, cols = weight.shape
    w = weight.detach().float().reshape(rows, cols // fmt.group_size, fmt.group_size)
    magnitude = w.abs()
    mean = magnitude.mean(-1, keepdim=True)
    best_error = torch.full(mean.shape, float("inf"))
    best_scale, best_steps = torch.zeros_like(mean), torch.zeros_like(w)
    for t in THRESHOLDS:
        keep = magnitude > t * mean
        scale = _stored((magnitude * keep).sum(-1, keepdim=True) / keep.sum(-1, keepdim=True).clamp(min=1), fmt.torch_scale_dtype, nonzero=True)
        steps = torch.sign(w) * keep
        error = ((steps * scale - w) ** 2).sum(-1, keepdim=True)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
        best_steps = torch.where(better, steps, best_steps)
    mid = 2 ** (fmt.bits - 1)
    return assemble((best_steps + mid).reshape(rows, cols), best_scale, torch.full_like(best_scale, mid), fmt)


def quantize_binary(weight: torch.Tensor, fmt: WeightFormat) -> QuantizedWeight:
    rows, cols = weight.shape
    w = weight.detach().float().reshape(rows, cols // fmt.group_size, fmt.group_size)
    high_side = w >= 0
    low = (w * ~high_side).sum(-1, keepdim=True) / (~high_side).sum(-1, keepdim=True).clamp(min=1)
    high = (w * high_side).sum(-1, keepdim=True) / high_side.sum(-1, keepdim=True).clamp(min=1)
    dtype = fmt.torch_scale_dtype
    low = _stored(low, dtype)
    scale = _stored(high - low, dtype, nonzero=True)
    codes = ((w - low) / scale).round().clamp(0, 1)  # the nearer of the two stored values
    return assemble(codes.reshape(rows, cols), scale, low, fmt)


def _require(bits: int, name: str, grid: str):
    def check(config, path: str) -> None:
        if config.format is not None:
            raise ConfigError(f"{path}: method {name} has its own grid ({grid}); remove format: {config.format}")
        if config.bits != bits:
            raise ConfigError(f"{path}.bits: method {name} stores {grid} in {bits} bit(s) per weight; set bits: {bits}")

    return check


METHOD_FORMATS["ternary"] = _require(2, "ternary", "-a, 0, +a")
METHOD_FORMATS["binary"] = _require(1, "binary", "two values per group")


@QUANTIZATION_METHODS.register("ternary")
@torch.no_grad()
def ternary(model, targets, ctx=None, config=None) -> dict[str, QuantizedWeight]:
    """Ternary linear layers (the embedding keeps its integer grid, rounded to nearest)."""
    from .formats import quantize_rtn

    return {name: quantize_ternary(m.weight, fmt) if fmt.bits == 2 and fmt.symmetric else quantize_rtn(m.weight, fmt) for name, m, fmt in targets}


@QUANTIZATION_METHODS.register("binary")
@torch.no_grad()
def binary(model, targets, ctx=None, config=None) -> dict[str, QuantizedWeight]:
    """Binary linear layers (the embedding keeps its integer grid, rounded to nearest)."""
    from .formats import quantize_rtn

    return {name: quantize_binary(m.weight, fmt) if fmt.bits == 1 else quantize_rtn(m.weight, fmt) for name, m, fmt in targets}
