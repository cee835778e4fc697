"""Importance of the channels width pruning can remove: MLP neurons and attention-head channels.

A channel is one input column ``j`` of an output projection (``down_proj`` for an MLP neuron, ``o_proj`` for
the channels of a head) together with row ``j`` of the projections that produce it (``gate_proj``/``up_proj``,
or ``q_proj``). A score is a function ``(out_weight [out, channels], in_weights [list of [channels, in]],
stats: InputStats of the output projection's input) -> [channels]``, higher = more important. A head scores
the sum of its channels' scores.

- ``activation`` (Minitron, Sreenivas et al. 2024): mean |x_j| over the calibration tokens.
- ``magnitude_l1`` / ``magnitude_l2``: L1 norm / squared L2 norm of every weight that belongs to the channel.
- ``wanda`` (Sun et al. 2023, structured as in Wanda-sp): sum_i |W_out[i, j]| * ||x_j||_2.
- ``taylor`` (LLM-Pruner, Ma et al. 2023, first order): |sum_t dL/dx_tj * x_tj| per sequence, summed.
- ``fluctuation`` (FLAP, An et al. 2024): Var(x_j) * ||W_out[:, j]||^2, the output variance the bias
  compensation cannot restore.
- ``obs`` (structured Optimal Brain Surgeon, as in ZipLM, Kurtic et al. 2023, and SlimGPT, Ling et al. 2024):
  channels are removed greedily, each time the one whose removal adds the least output error *once the kept
  channels are refit by least squares*; the score is the step at which a channel would go. Unlike the
  per-channel scores it sees redundancy: of two neurons that write the same direction, one can go and the
  other's refit absorbs it. It is the selection that goes with ``reconstruct: lstsq``.

Every score takes ``group_size`` (1 for neurons, ``head_dim`` for heads); only ``obs`` needs it, because
removing a head removes its channels together.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import ConfigError
from ..registry import Registry
from .calibration import InputStats

IMPORTANCE: Registry[Callable] = Registry("importance score")


@IMPORTANCE.register("activation")
def activation(out_weight, in_weights, stats: InputStats, group_size: int = 1) -> torch.Tensor:
    return stats.abs_total / stats.count


@IMPORTANCE.register("magnitude_l1")
def magnitude_l1(out_weight, in_weights, stats, group_size: int = 1) -> torch.Tensor:
    return out_weight.double().abs().sum(0) + sum(w.double().abs().sum(1) for w in in_weights)


@IMPORTANCE.register("magnitude_l2")
def magnitude_l2(out_weight, in_weights, stats, group_size: int = 1) -> torch.Tensor:
    return out_weight.double().pow(2).sum(0) + sum(w.double().pow(2).sum(1) for w in in_weights)


@IMPORTANCE.register("wanda")
def wanda(out_weight, in_weights, stats: InputStats, group_size: int = 1) -> torch.Tensor:
    return out_weight.double().abs().sum(0) * stats.gram.diagonal().sqrt()


@IMPORTANCE.register("taylor")
def taylor(out_weight, in_weights, stats: InputStats, group_size: int = 1) -> torch.Tensor:
    if stats.taylor is None:
        raise ConfigError("the taylor score needs gradients that were not collected; call prune() (it collects them) rather than the score alone")
    return stats.taylor


@IMPORTANCE.register("fluctuation")
def fluctuation(out_weight, in_weights, stats: InputStats, group_size: int = 1) -> torch.Tensor:
    return stats.variance * out_weight.double().pow(2).sum(0)


OBS_DAMP = 0.01  # ridge of the inverse Hessian, as a fraction of its mean diagonal (SparseGPT's damping)
OBS_STEPS = 64  # greedy rounds; each removes 1/64 of the channels with one block update (SlimGPT's batching)


@IMPORTANCE.register("obs")
@torch.no_grad()
def optimal_brain_surgeon(out_weight, in_weights, stats: InputStats, group_size: int = 1) -> torch.Tensor:
    """Greedy structured OBS on ``y = W x`` with ``H = E[x x^T]``: removing the group ``R`` and refitting the
    rest optimally adds ``tr(W_R (H^-1)_RR^-1 W_R^T)`` output error, after which ``W`` and ``H^-1`` are
    updated in closed form (``W -= W_R (H^-1)_RR^-1 (H^-1)_R:``, the same for ``H^-1``). Each round removes
    the cheapest ``1/OBS_STEPS`` of the groups still there, scored on the current, already-updated weights."""
    n = stats.gram.shape[0]
    if n % group_size:
        raise ConfigError(f"obs: {n} channels do not split into groups of {group_size}")
    h = stats.second_moment.clone()
    h.diagonal().add_(OBS_DAMP * h.diagonal().mean().clamp_min(1e-12))
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    w = out_weight.double().clone()
    groups = n // group_size
    channels = torch.arange(n).view(groups, group_size)
    alive = torch.ones(groups, dtype=torch.bool)
    order = torch.empty(groups, dtype=torch.float64)
    removed = 0
    per_round = max(1, -(-groups // OBS_STEPS))
    while removed < groups:
        live = alive.nonzero().flatten()
        costs = torch.stack([_removal_cost(w, hinv, channels[g]) for g in live]) if group_size > 1 else \
            w[:, live].pow(2).sum(0) / hinv.diagonal()[live].clamp_min(1e-30)
        ranked = live[costs.argsort()][: min(per_round, len(live))]
        order[ranked] = removed + torch.arange(len(ranked), dtype=torch.float64)
        removed += len(ranked)
        alive[ranked] = False
        if removed == groups:
            break
        r = channels[ranked].flatten()
        solve = torch.linalg.solve(hinv[r][:, r], hinv[r])  # (H^-1)_RR^-1 (H^-1)_R:  [|R|, n]
        w -= w[:, r] @ solve
        hinv -= hinv[:, r] @ solve
        w[:, r] = 0
        hinv[r] = 0
        hinv[:, r] = 0
        hinv[r, r] = 1  # keeps the removed block invertible; it is never read again
    return (order + 1).repeat_interleave(group_size) / group_size  # a group's channels sum to its rank


def _removal_cost(w: torch.Tensor, hinv: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    wr = w[:, r]
    return (wr @ torch.linalg.solve(hinv[r][:, r], wr.T)).trace()


def group_scores(channel_scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Scores of consecutive groups of ``group_size`` channels (e.g. the ``head_dim`` channels of a head)."""
    return channel_scores.view(-1, group_size).sum(1)
