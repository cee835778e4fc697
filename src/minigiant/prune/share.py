"""Cross-layer parameter sharing: pairs of adjacent decoder layers use one set of linear weights.

The pairs are the most similar adjacent layers by weight distance, Σ‖W_a − W_b‖² / Σ(‖W_a‖² + ‖W_b‖²)/2
over their q/k/v/o/gate/up/down projections (0: equal, ~1: unrelated), taken greedily so no layer is in two
pairs. The shared weights start as the average of the two layers (the initialisation Relaxed Recursive
Transformers found best); the RMSNorm weights stay per layer (a few hundred numbers that let the two uses
differ). In memory the second layer's projections hold the *same* ``nn.Parameter`` objects as the first, so
training updates them once with both layers' gradients and ``parameters()`` counts them once.

On disk each shared tensor is stored once: ``artifact.save`` writes the weights without the duplicates and
records the pairs in the lineage (``shared_layers``); ``minigiant.load`` ties them again after loading. A
directory with shared layers needs ``minigiant.load`` (plain transformers would leave the duplicates randomly
initialised). Width pruning or quantizing a shared model afterwards unties the pairs (each layer gets its own
copy); share as the last structural step.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import BudgetError
from ..models.architecture import decoder_layers

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _linear(layer: nn.Module, name: str) -> nn.Linear:
    return layer.get_submodule(name)


def pair_distance(a: nn.Module, b: nn.Module) -> float:
    """Relative squared weight distance of two layers' projections (see module doc)."""
    diff = norms = 0.0
    for name in PROJECTIONS:
        wa, wb = _linear(a, name).weight.detach().double(), _linear(b, name).weight.detach().double()
        if wa.shape != wb.shape:
            return float("inf")
        diff += (wa - wb).pow(2).sum().item()
        norms += 0.5 * (wa.pow(2).sum() + wb.pow(2).sum()).item()
    return diff / max(norms, 1e-30)


def choose_pairs(model, count: int) -> tuple[list[tuple[int, int]], list[float]]:
    """The ``count`` most similar non-overlapping adjacent pairs, and every adjacent pair's distance."""
    layers = decoder_layers(model)
    if count > len(layers) // 2:
        raise BudgetError(f"share: {count} pairs need {2 * count} layers, the model has {len(layers)}; share at most {len(layers) // 2}")
    distances = [pair_distance(layers[i], layers[i + 1]) for i in range(len(layers) - 1)]
    chosen: list[tuple[int, int]] = []
    used: set[int] = set()
    for i in sorted(range(len(distances)), key=lambda i: distances[i]):
        if len(chosen) == count:
            break
        if i in used or i + 1 in used or distances[i] == float("inf"):
            continue
        chosen.append((i, i + 1))
        used.update((i, i + 1))
    if len(chosen) < count:
        raise BudgetError(f"share: only {len(chosen)} adjacent pairs of equal shape can be shared, {count} asked")
    return sorted(chosen), [round(d, 5) for d in distances]


def tie_layers(model, pairs: list[tuple[int, int]]) -> None:
    """Make layer ``b`` of each pair use layer ``a``'s projection Parameters (as they are, no averaging)."""
    layers = decoder_layers(model)
    for a, b in pairs:
        for name in PROJECTIONS:
            source, target = _linear(layers[a], name), _linear(layers[b], name)
            target.weight = source.weight
            if source.bias is not None:
                target.bias = source.bias


@torch.no_grad()
def share_layers(model, pairs: list[tuple[int, int]]) -> None:
    """Average each pair's projections into one set of Parameters used by both layers, in place."""
    layers = decoder_layers(model)
    for a, b in pairs:
        for name in PROJECTIONS:
            source, target = _linear(layers[a], name), _linear(layers[b], name)
            source.weight.data = 0.5 * (source.weight.data + target.weight.data)
            if source.bias is not None:
                source.bias.data = 0.5 * (source.bias.data + target.bias.data)
    tie_layers(model, pairs)


def duplicate_keys(model, pairs: list[tuple[int, int]]) -> set[str]:
    """State-dict keys of the second layer of each pair: the tensors not written to disk."""
    prefix = next(name for name, module in model.named_modules() if module is decoder_layers(model))
    keys = set()
    for _, b in pairs:
        for name in PROJECTIONS:
            keys.add(f"{prefix}.{b}.{name}.weight")
            if _linear(decoder_layers(model)[b], name).bias is not None:
                keys.add(f"{prefix}.{b}.{name}.bias")
    return keys


def shared_pairs(model) -> list[tuple[int, int]]:
    """The pairs whose projections are currently the same Parameters (what is really shared in memory)."""
    layers = decoder_layers(model)
    return [(i, i + 1) for i in range(len(layers) - 1)
            if all(_linear(layers[i], n).weight is _linear(layers[i + 1], n).weight for n in PROJECTIONS)]


__all__ = ["choose_pairs", "duplicate_keys", "pair_distance", "share_layers", "shared_pairs", "tie_layers"]
