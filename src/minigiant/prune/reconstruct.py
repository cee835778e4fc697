"""Compensating removed input channels of an output projection (``down_proj``, ``o_proj``) without training.

Removing channels ``R`` of ``y = W x`` leaves ``W_S x_S``; a method returns new weights for the kept
channels ``S`` and optionally a bias added to the layer's output:

- ``none``: ``W_S`` as it was.
- ``bias`` (FLAP, An et al. 2024): ``W_S`` and the bias ``W_R E[x_R]``, the removed channels' mean output.
- ``lstsq``: the ridge-regularised least-squares refit ``W' = argmin E||W x - W' x_S||^2 + λ||W'||^2``,
  solved in closed form from the calibration Gram matrix ``G = E[x x^T]``:
  ``W' = W G[:, S] (G[S, S] + λ I)^-1`` with ``λ = damp * mean(diag G[S, S])``.

``relative_error`` measures what a removal leaves: ``E||W x - (W' x_S + b)||^2 / E||W x||^2`` on the
calibration inputs, computed exactly from ``G`` and ``E[x]`` (no second pass).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..registry import Registry
from .calibration import InputStats

RECONSTRUCT: Registry[Callable] = Registry("reconstruction")


@RECONSTRUCT.register("none")
def keep_columns(weight: torch.Tensor, keep: torch.Tensor, stats: InputStats, damp: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    return weight[:, keep].clone(), None


@RECONSTRUCT.register("bias")
def bias_compensation(weight, keep, stats, damp):
    removed = _complement(keep, weight.shape[1])
    return weight[:, keep].clone(), (weight.double()[:, removed] @ stats.mean[removed]).to(weight.dtype)


@RECONSTRUCT.register("lstsq")
def least_squares(weight, keep, stats, damp):
    g = stats.second_moment
    g_kept = g[keep][:, keep]
    ridge = damp * g_kept.diagonal().mean().clamp_min(1e-12)
    a = g_kept + ridge * torch.eye(len(keep), dtype=g.dtype)
    rhs = weight.double() @ g[:, keep]  # [out, kept]
    refit = torch.linalg.solve(a, rhs.T).T  # a is symmetric
    return refit.to(weight.dtype), None


def relative_error(weight: torch.Tensor, keep: torch.Tensor, new_weight: torch.Tensor, bias: torch.Tensor | None, stats: InputStats) -> float:
    """``E||W x - (W' x_S + b)||^2 / E||W x||^2`` over the calibration inputs."""
    g = stats.second_moment
    w = weight.double()
    diff = w.clone()
    diff[:, keep] -= new_weight.double()
    err = (diff @ g * diff).sum()
    if bias is not None:  # E||D x - b||^2 = tr(D G D^T) - 2 b.(D mu) + ||b||^2
        b = bias.double()
        err = err - 2 * b @ (diff @ stats.mean) + b @ b
    ref = (w @ g * w).sum()
    return (err.clamp_min(0) / ref.clamp_min(1e-30)).item()


def prefix_errors(weight: torch.Tensor, order: torch.Tensor, stats: InputStats) -> torch.Tensor:
    """``errors[k]``: the relative output error ``relative_error`` gives when the first ``k`` channels of
    ``order`` are kept and refit by (undamped) least squares, for every ``k`` from 0 to all, in one Cholesky
    factorisation instead of one solve per ``k``.

    With ``G = L L^T`` in the order's channel order, the inputs are ``x = L z`` with uncorrelated unit ``z``,
    so the output ``W x = (W L) z`` is a sum of uncorrelated parts, one per column of ``W L``, and the first
    ``k`` channels span exactly the first ``k`` parts: the refit keeps those and loses the rest."""
    g = stats.second_moment[order][:, order]
    g = g + 1e-9 * g.diagonal().mean().clamp_min(1e-30) * torch.eye(len(order), dtype=g.dtype)  # a dead channel
    energy = (weight.double()[:, order] @ torch.linalg.cholesky(g)).pow(2).sum(0)  # [channels]: each part's E||.||^2
    lost = energy.flip(0).cumsum(0).flip(0)  # lost[k] = sum of the parts from k on
    return torch.cat([lost, lost.new_zeros(1)]) / energy.sum().clamp_min(1e-30)


def _complement(keep: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[keep] = False
    return mask.nonzero().flatten()
