"""Cross-layer parameter sharing: pairs of adjacent decoder layers use one set of linear weights.

In pair ``(a, a + 1)`` the second layer gives up its own q/k/v/o/gate/up/down projections and runs the first
one's (layer repetition); its RMSNorm weights stay its own (a few hundred numbers that let the two uses
differ). The pairs are those whose second layer changes the hidden state least on calibration text, by the
block influence of ``depth.py`` (``1 - cos(h_in, h_out)``), taken greedily so no layer is in two pairs.
Weight similarity does not work for this: on the default teacher every adjacent pair is as far apart as two
unrelated matrices (relative distance 1.99-2.00), and averaging a pair, as Relaxed Recursive Transformers
initialise, took the one-shot WikiText-2 perplexity of the 60% student from 198 to 460,571 with 3 pairs
(BENCHMARKS.md).

In memory the second layer's projections are the *same* ``nn.Parameter`` objects as the first's, so training
updates them once with both layers' gradients and ``parameters()`` counts them once. On disk each shared
tensor is stored once: ``artifact.save`` leaves the duplicates out and records the pairs in the lineage
(``shared_layers``); ``minigiant.load`` ties them again. Plain transformers would leave the duplicates
randomly initialised, so such a directory needs ``minigiant.load``. Width pruning or quantizing a shared
model afterwards gives each layer its own copy again: share as the last structural step.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import BudgetError, ConfigError
from ..models.architecture import decoder_layers

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _linear(layer: nn.Module, name: str) -> nn.Linear:
    return layer.get_submodule(name)


def _same_shapes(a: nn.Module, b: nn.Module) -> bool:
    return all(_linear(a, n).weight.shape == _linear(b, n).weight.shape for n in PROJECTIONS)


def check_share_count(count: int, layers: int) -> None:
    """BudgetError when ``count`` non-overlapping pairs do not fit in ``layers`` layers."""
    if count > layers // 2:
        raise BudgetError(f"share: {count} pairs need {2 * count} layers, the model has {layers}; share at most {layers // 2}")


def choose_pairs(model, count: int, blocks: torch.Tensor, batch_size: int) -> tuple[list[tuple[int, int]], list[float]]:
    """The ``count`` non-overlapping adjacent pairs whose second layer has the least block influence on
    ``blocks``, and every layer's block influence."""
    from .depth import _cosine_table

    layers = decoder_layers(model)
    check_share_count(count, len(layers))
    cos = _cosine_table(model, blocks, batch_size, f"prune: scoring {len(layers)} layers for sharing")
    influence = [1 - cos[i, i + 1].item() for i in range(len(layers))]
    chosen: list[tuple[int, int]] = []
    used: set[int] = set()
    for b in sorted(range(1, len(layers)), key=lambda b: influence[b]):
        if len(chosen) == count:
            break
        if b in used or b - 1 in used or not _same_shapes(layers[b - 1], layers[b]):
            continue
        chosen.append((b - 1, b))
        used.update((b - 1, b))
    if len(chosen) < count:
        raise BudgetError(f"share: only {len(chosen)} adjacent pairs of equal shape can be shared, {count} asked")
    return sorted(chosen), [round(v, 5) for v in influence]


def share_layers(model, pairs: list[tuple[int, int]]) -> None:
    """Make layer ``b`` of each pair run layer ``a``'s projection Parameters, in place."""
    layers = decoder_layers(model)
    for a, b in pairs:
        for name in PROJECTIONS:
            source, target = _linear(layers[a], name), _linear(layers[b], name)
            if source.weight.shape != target.weight.shape:
                raise ConfigError(f"layers {a} and {b} cannot share {name}: its shapes differ ({tuple(source.weight.shape)} vs {tuple(target.weight.shape)}; per-layer widths); share layers of a model pruned with width_profile: uniform")
            target.weight = source.weight
            target.bias = source.bias


def duplicate_keys(model, pairs: list[tuple[int, int]]) -> set[str]:
    """State-dict keys of the second layer of each pair: the tensors not written to disk."""
    layers = decoder_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is layers)
    keys = set()
    for _, b in pairs:
        for name in PROJECTIONS:
            keys.add(f"{prefix}.{b}.{name}.weight")
            if _linear(layers[b], name).bias is not None:
                keys.add(f"{prefix}.{b}.{name}.bias")
    return keys


def shared_pairs(model) -> list[tuple[int, int]]:
    """The pairs whose projections are currently the same Parameters (what is really shared in memory)."""
    layers = decoder_layers(model)
    return [(i, i + 1) for i in range(len(layers) - 1)
            if all(_linear(layers[i], n).weight is _linear(layers[i + 1], n).weight for n in PROJECTIONS)]


__all__ = ["choose_pairs", "duplicate_keys", "share_layers", "shared_pairs"]
