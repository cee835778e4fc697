"""k-means codebooks: each group (``codebook: group``; ``group_size: -1`` = one per row) or the whole tensor
(``codebook: tensor``) gets a table of ``2**bits`` float16 values, and every weight stores the index of its
nearest table entry (nearest-neighbour assignment), 1-4 bits.

Lloyd's algorithm, vectorised over groups: centroids start at evenly spaced quantiles of each group's
sorted weights; an empty cluster is moved onto the weight farthest from its centroid, so a group with at
most ``2**bits`` distinct values ends with each value as its own centroid and is reproduced exactly. The
table is rounded to float16 before the final assignment, so stored indices and stored table agree.

With calibration text each weight counts by its input column's energy ``E[x_j^2]`` (SqueezeLLM weights its
k-means by sensitivity the same way): plain k-means minimises weight error, places the table where weights
are dense and rounds the rare large weights (the ones that matter most) onto it; on the default student
a per-row 4-bit codebook then lost to per-channel round-to-nearest (ppl change +211 vs +65, BENCHMARKS.md).
The assignment is unchanged (the nearest entry), only the centroids move.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .calibration import input_energy
from .formats import METHOD_FORMATS, QUANTIZATION_METHODS, QuantizedWeight, WeightFormat, pack, quantize_rtn

ITERATIONS = 25


def _assign(values: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid index and squared distance: values ``[..., n]``, centroids ``[..., k]``."""
    distance = (values.unsqueeze(-1) - centroids.unsqueeze(-2)) ** 2
    best, index = distance.min(-1)
    return index, best


def lloyd(values: torch.Tensor, k: int, iterations: int = ITERATIONS, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Centroids ``[..., k]`` of the rows ``values`` ``[..., n]``, each value counted by ``weights``
    (broadcastable to ``values``; default 1)."""
    weights = torch.ones_like(values) if weights is None else weights.expand_as(values)
    ordered = values.sort(-1).values
    n = values.shape[-1]
    positions = ((torch.arange(k) + 0.5) * n / k).long().clamp(max=n - 1)
    centroids = ordered[..., positions].clone()
    for _ in range(iterations):
        index, distance = _assign(values, centroids)
        onehot = torch.nn.functional.one_hot(index, k).to(values.dtype)  # [..., n, k]
        counts = onehot.sum(-2)
        mass = (onehot * weights.unsqueeze(-1)).sum(-2)
        sums = (onehot * (weights * values).unsqueeze(-1)).sum(-2)
        centroids = torch.where(mass > 0, sums / mass.clamp(min=1e-30), centroids)
        empty = counts == 0
        if empty.any():
            # One empty cluster per group per iteration takes the worst-served weight.
            far = values.gather(-1, distance.argmax(-1, keepdim=True))  # [..., 1]
            first_empty = empty & (empty.cumsum(-1) == 1)
            centroids = torch.where(first_empty, far.expand_as(centroids), centroids)
    return centroids


def quantize_kmeans(weight: torch.Tensor, fmt: WeightFormat, column_weights: torch.Tensor | None = None) -> QuantizedWeight:
    """``column_weights`` ``[cols]``: how much each input column's error counts (its ``E[x_j^2]``); default 1."""
    rows, cols = weight.shape
    k = 2**fmt.bits
    w = weight.detach().float()
    per_column = torch.ones(cols) if column_weights is None else column_weights.float().clamp(min=0) + 1e-12
    if fmt.codebook == "tensor":
        values = w.reshape(1, 1, -1)
        # A 2**bits-point fit needs no more than a sample of a large tensor; the assignment uses all of it.
        picked = torch.randperm(values.shape[-1], generator=torch.Generator().manual_seed(0))[:65536]
        centroids = lloyd(values[..., picked], k, weights=per_column[picked % cols])  # flat index i is column i % cols
    else:
        values = w.reshape(rows, cols // fmt.group_size, fmt.group_size)
        centroids = lloyd(values, k, weights=per_column.reshape(1, cols // fmt.group_size, fmt.group_size))
    table = centroids.sort(-1).values.to(torch.float16)
    index, _ = _assign(values, table.float())
    codes = index.reshape(rows, cols).to(torch.uint8)
    return QuantizedWeight(pack(codes, fmt.bits), None, None, table.contiguous())


def _check(config, path: str) -> None:
    if config.format is not None:
        raise ConfigError(f"{path}: method kmeans stores codebook indices, not the {config.format} grid; remove format or use rtn/gptq/awq")
    if config.bits > 4:
        raise ConfigError(f"{path}.bits: kmeans takes 1-4-bit indices (a table of 2**bits values), got {config.bits}")


METHOD_FORMATS["kmeans"] = _check


@QUANTIZATION_METHODS.register("kmeans")
@torch.no_grad()
def kmeans(model, targets, ctx=None, config=None) -> dict[str, QuantizedWeight]:
    """k-means codebooks for the linear layers, weighted by calibration activations when there is a tokenizer
    (the embedding keeps its integer grid, rounded to nearest)."""
    linears = {name: m for name, m, fmt in targets if fmt.codebook and isinstance(m, nn.Linear)}
    energy = input_energy(model, linears, config, ctx, "kmeans") if linears and config is not None else {}
    return {name: quantize_kmeans(m.weight, fmt, energy.get(name)) if fmt.codebook else quantize_rtn(m.weight, fmt) for name, m, fmt in targets}
