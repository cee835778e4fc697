"""k-means codebooks: each group (``codebook: group``; ``group_size: -1`` = one per row) or the whole tensor
(``codebook: tensor``) gets a table of ``2**bits`` float16 values, and every weight stores the index of its
nearest table entry (nearest-neighbour assignment), 1-4 bits.

Lloyd's algorithm, vectorised over groups: centroids start at evenly spaced quantiles of each group's
sorted weights; an empty cluster is moved onto the weight farthest from its centroid, so a group with at
most ``2**bits`` distinct values ends with each value as its own centroid and is reproduced exactly. The
table is rounded to float16 before the final assignment, so stored indices and stored table agree.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .formats import METHOD_FORMATS, QUANTIZATION_METHODS, QuantizedWeight, WeightFormat, pack, quantize_rtn

ITERATIONS = 25


def _assign(values: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid index and squared distance: values ``[..., n]``, centroids ``[..., k]``."""
    distance = (values.unsqueeze(-1) - centroids.unsqueeze(-2)) ** 2
    best, index = distance.min(-1)
    return index, best


def lloyd(values: torch.Tensor, k: int, iterations: int = ITERATIONS) -> torch.Tensor:
    """Centroids ``[..., k]`` of the rows ``values`` ``[..., n]``."""
    ordered = values.sort(-1).values
    n = values.shape[-1]
    positions = ((torch.arange(k) + 0.5) * n / k).long().clamp(max=n - 1)
    centroids = ordered[..., positions].clone()
    for _ in range(iterations):
        index, distance = _assign(values, centroids)
        onehot = torch.nn.functional.one_hot(index, k).to(values.dtype)  # [..., n, k]
        counts = onehot.sum(-2)
        sums = (onehot * values.unsqueeze(-1)).sum(-2)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        empty = counts == 0
        if empty.any():
            # One empty cluster per group per iteration takes the worst-served weight.
            far = values.gather(-1, distance.argmax(-1, keepdim=True))  # [..., 1]
            first_empty = empty & (empty.cumsum(-1) == 1)
            centroids = torch.where(first_empty, far.expand_as(centroids), centroids)
    return centroids


def quantize_kmeans(weight: torch.Tensor, fmt: WeightFormat) -> QuantizedWeight:
    rows, cols = weight.shape
    k = 2**fmt.bits
    w = weight.detach().float()
    if fmt.codebook == "tensor":
        values = w.reshape(1, 1, -1)
        # A 2**bits-point fit needs no more than a sample of a large tensor; the assignment uses all of it.
        sample = values[..., torch.randperm(values.shape[-1], generator=torch.Generator().manual_seed(0))[:65536]]
        centroids = lloyd(sample, k)
    else:
        values = w.reshape(rows, cols // fmt.group_size, fmt.group_size)
        centroids = lloyd(values, k)
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
    """k-means codebooks for the linear layers (the embedding keeps its integer grid, rounded to nearest)."""
    return {name: quantize_kmeans(m.weight, fmt) if fmt.codebook else quantize_rtn(m.weight, fmt) for name, m, fmt in targets}
