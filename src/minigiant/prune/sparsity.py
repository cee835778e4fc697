"""Unstructured and semi-structured (N:M) sparsity: single weights of every decoder linear set to zero.

Shapes do not change, so the model is not smaller or faster on a CPU: dense kernels multiply the zeros too.
The metrics report the density of every layer; no speed-up is claimed.

Methods (``PruneConfig.sparsity_method``), each per layer at the target sparsity:
- ``magnitude``: the smallest |W| of the whole matrix go.
- ``wanda`` (Sun et al. 2023): score |W_ij| * ||x_j||_2, compared within each output row.
- ``sparsegpt`` (Frantar & Alistarh 2023): the OBS mask and weight update from the calibration Hessian
  ``H = X^T X`` (damped), processed in blocks of 128 columns; the surviving weights absorb the error of the
  removed ones.

Statistics come from the unpruned model in one pass, or, with ``sequential: true``, from each layer's input
on the already-sparsified prefix (``sequential.sparsify_sequential``), as both papers run them.

N:M (``nm: "2:4"``): in every M consecutive input weights of a row exactly N stay nonzero (for
``sparsegpt``: the N with the largest OBS saliency).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import ConfigError
from ..registry import Registry
from .calibration import InputStats

SPARSITY_METHODS: Registry[Callable] = Registry("sparsity method")


def parse_nm(nm: str | int, path: str = "prune.nm") -> tuple[int, int]:
    if isinstance(nm, int):  # YAML 1.1 reads an unquoted 2:4 as the base-60 number 2*60+4 = 124
        nm = f"{nm // 60}:{nm % 60}"
    try:
        n, m = (int(x) for x in str(nm).split(":"))
    except ValueError:
        raise ConfigError(f"{path}: expected 'N:M' such as '2:4', got {nm!r}") from None
    if not 0 < n < m:
        raise ConfigError(f"{path}: N:M needs 0 < N < M (N nonzeros in every M weights), got {nm!r}")
    return n, m


def check_nm(weight: torch.Tensor, m: int, name: str) -> None:
    if weight.shape[1] % m:
        raise ConfigError(f"{name} has {weight.shape[1]} input features, not divisible by M={m}; choose an M that divides every layer's input size")


def _nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True where a weight is kept: the ``n`` highest scores in each group of ``m`` consecutive inputs."""
    out, cols = scores.shape
    groups = scores.reshape(out, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(n, dim=2).indices, True)
    return keep.reshape(out, cols)


def _keep_top(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    if per_row:
        k = int(scores.shape[1] * sparsity)
        keep = torch.ones_like(scores, dtype=torch.bool)
        if k:
            keep.scatter_(1, scores.topk(k, dim=1, largest=False).indices, False)
        return keep
    k = int(scores.numel() * sparsity)
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    if k:
        keep[scores.flatten().topk(k, largest=False).indices] = False
    return keep.view_as(scores)


@SPARSITY_METHODS.register("magnitude")
def magnitude(weight: torch.Tensor, stats: InputStats | None, sparsity: float, nm: tuple[int, int] | None, damp: float) -> torch.Tensor:
    scores = weight.abs()
    keep = _nm_mask(scores, *nm) if nm else _keep_top(scores, sparsity, per_row=False)
    return weight * keep


@SPARSITY_METHODS.register("wanda")
def wanda(weight, stats, sparsity, nm, damp):
    scores = weight.abs() * stats.gram.diagonal().sqrt().to(weight.dtype)
    keep = _nm_mask(scores, *nm) if nm else _keep_top(scores, sparsity, per_row=True)
    return weight * keep


@SPARSITY_METHODS.register("sparsegpt")
def sparsegpt(weight, stats, sparsity, nm, damp, block: int = 128):
    w = weight.clone().float()
    h = stats.second_moment.clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    # Upper Cholesky factor of H^-1: row i holds the OBS update for column i given the columns before it.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    cols = w.shape[1]
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        d = hinv1.diagonal()
        if nm is None:
            saliency = w1**2 / d[None, :] ** 2
            pruned = ~_keep_top(saliency, sparsity, per_row=False)
        else:
            pruned = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                saliency = w1[:, i : i + nm[1]] ** 2 / d[None, i : i + nm[1]] ** 2
                pruned[:, i : i + nm[1]] = ~_nm_mask(saliency, *nm)
            col = w1[:, i]
            q = torch.where(pruned[:, i], torch.zeros_like(col), col)
            e = (col - q) / d[i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w.to(weight.dtype)
