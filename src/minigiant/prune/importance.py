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
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import ConfigError
from ..registry import Registry
from .calibration import InputStats

IMPORTANCE: Registry[Callable] = Registry("importance score")


@IMPORTANCE.register("activation")
def activation(out_weight, in_weights, stats: InputStats) -> torch.Tensor:
    return stats.abs_total / stats.count


@IMPORTANCE.register("magnitude_l1")
def magnitude_l1(out_weight, in_weights, stats) -> torch.Tensor:
    return out_weight.double().abs().sum(0) + sum(w.double().abs().sum(1) for w in in_weights)


@IMPORTANCE.register("magnitude_l2")
def magnitude_l2(out_weight, in_weights, stats) -> torch.Tensor:
    return out_weight.double().pow(2).sum(0) + sum(w.double().pow(2).sum(1) for w in in_weights)


@IMPORTANCE.register("wanda")
def wanda(out_weight, in_weights, stats: InputStats) -> torch.Tensor:
    return out_weight.double().abs().sum(0) * stats.gram.diagonal().sqrt()


@IMPORTANCE.register("taylor")
def taylor(out_weight, in_weights, stats: InputStats) -> torch.Tensor:
    if stats.taylor is None:
        raise ConfigError("the taylor score needs gradients that were not collected; call prune() (it collects them) rather than the score alone")
    return stats.taylor


@IMPORTANCE.register("fluctuation")
def fluctuation(out_weight, in_weights, stats: InputStats) -> torch.Tensor:
    return stats.variance * out_weight.double().pow(2).sum(0)


def group_scores(channel_scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Scores of consecutive groups of ``group_size`` channels (e.g. the ``head_dim`` channels of a head)."""
    return channel_scores.view(-1, group_size).sum(1)
