"""Hidden-size pruning (Minitron's embedding channels): remove channels of the residual stream everywhere,
giving a config with a smaller ``hidden_size`` that plain transformers loads.

A channel of the residual stream is one column of the embedding (and of a tied head), one input column of
every q/k/v/gate/up projection, one output row of every o/down projection and one weight of every RMSNorm.
Minitron ranks channels by the activations of the normalisation layers; here the score of channel ``c`` is the
mean of |RMSNorm output| in ``c``, summed over every norm of the stack (both per layer, and the final one).

Removing channels changes what every RMSNorm divides by: the root-mean-square over the kept channels, not
over all of them. On calibration text the ratio ``rms_kept / rms_all`` is measured per norm (from the
per-channel energy of its input) and folded into that norm's weight, so a norm's output keeps its scale; a
channel that is zero everywhere is then removed with no change at all (the test plants one).

``head_dim`` is written into the config because it is no longer ``hidden_size // num_attention_heads``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import BudgetError
from ..models.architecture import decoder_layers
from .calibration import run_with_hooks


def _norms(model) -> dict[str, nn.Module]:
    found = {}
    for i, layer in enumerate(decoder_layers(model)):
        found[f"layers.{i}.input_layernorm"] = layer.input_layernorm
        found[f"layers.{i}.post_attention_layernorm"] = layer.post_attention_layernorm
    found["norm"] = model.base_model.norm
    return found


@torch.no_grad()
def hidden_statistics(model, blocks: torch.Tensor, batch_size: int) -> dict[str, dict[str, torch.Tensor]]:
    """Per RMSNorm: ``energy`` = mean over tokens of input², ``activation`` = mean |output|, per channel."""
    norms = _norms(model)
    width = model.config.hidden_size
    stats = {name: {"energy": torch.zeros(width, dtype=torch.float64), "activation": torch.zeros(width, dtype=torch.float64), "count": 0} for name in norms}

    def hook(name):
        def keep(module, args, output):
            x, y = args[0].reshape(-1, width).float(), output.reshape(-1, width).float()
            s = stats[name]
            s["energy"] += x.pow(2).sum(0).double()
            s["activation"] += y.abs().sum(0).double()
            s["count"] += x.shape[0]

        return keep

    run_with_hooks(model, blocks, batch_size, "prune: calibrating hidden channels", {m: hook(name) for name, m in norms.items()})
    for s in stats.values():
        s["energy"] /= max(1, s["count"])
        s["activation"] /= max(1, s["count"])
    return stats


def hidden_scores(stats: dict) -> torch.Tensor:
    """Importance of each residual channel: mean |RMSNorm output| summed over every norm."""
    return sum(s["activation"] for s in stats.values())


def plan_hidden(model, fraction: float, multiple_of: int) -> tuple[int, int]:
    """``(kept channels, the multiple they are rounded to)``. transformers requires a Llama hidden size that
    the number of query heads divides; quantization groups want ``multiple_of`` too. Where both together
    would cut more than 10% below the request (9 heads and 32 allow only 288 or 576), ``multiple_of`` is
    halved until they do not."""
    width, heads = model.config.hidden_size, model.config.num_attention_heads
    wanted = int(round(fraction * width))
    multiple = multiple_of
    while True:
        step = math.lcm(heads, multiple)
        kept = wanted - wanted % step
        if kept >= 0.9 * wanted or multiple == 1:
            break
        multiple = multiple // 2 if multiple % 2 == 0 else 1
    if kept < 1:
        raise BudgetError(f"hidden: {fraction} of {width} channels keeps no multiple of the {heads} attention heads; raise it")
    return kept, multiple


def _rows(linear: nn.Linear, keep: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.data[keep].clone())
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data[keep].clone())
    linear.out_features = len(keep)


def _columns(linear: nn.Linear, keep: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.data[:, keep].clone())
    linear.in_features = len(keep)


@torch.no_grad()
def prune_hidden(model, keep: torch.Tensor, stats: dict | None = None) -> dict:
    """Keep only residual channels ``keep`` (sorted indices) in place; with ``stats`` (``hidden_statistics`` of
    this model) each RMSNorm weight is rescaled for its smaller mean (see module doc). Returns per norm the
    measured ``rms_kept / rms_all``."""
    config = model.config
    width = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or width // config.num_attention_heads
    keep = torch.as_tensor(keep).sort().values
    ratios = {}
    for name, norm in _norms(model).items():
        weight = norm.weight.data[keep].clone()
        if stats is not None:
            energy = stats[name]["energy"]
            ratio = ((energy[keep].sum() / len(keep)) / (energy.sum() / width)).sqrt().item()
            weight = weight * ratio
            ratios[name] = round(ratio, 5)
        norm.weight = nn.Parameter(weight)
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    embed.weight = nn.Parameter(embed.weight.data[:, keep].clone())
    embed.embedding_dim = len(keep)
    if head is not None:
        if tied:
            head.weight = embed.weight
        else:
            _columns(head, keep)
        head.in_features = len(keep)
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        for linear in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            _columns(linear, keep)
        for linear in (attn.o_proj, mlp.down_proj):
            _rows(linear, keep)
        attn.head_dim = head_dim
        if hasattr(mlp, "hidden_size"):
            mlp.hidden_size = len(keep)
    config.hidden_size = len(keep)
    config.head_dim = head_dim
    return ratios


__all__ = ["hidden_scores", "hidden_statistics", "plan_hidden", "prune_hidden"]
