"""Width pruning: remove MLP neurons and attention heads from every decoder layer, giving a genuinely smaller
config (``intermediate_size``, ``num_attention_heads`` + ``head_dim``) that plain transformers loads.

Every layer keeps the same number of query heads per key/value group, and by default the same number of
neurons, because a Llama config has one ``intermediate_size`` and one head count for all layers. Per-layer
widths (``profile.py``) are stored in the lineage (``mlp_widths``, the config keeping the widest) and need
``minigiant.load``. Grouped-query attention is
respected by keeping ``k`` query heads in every KV group (the K/V projections stay whole): kept heads are
renumbered group by group, so head ``h'`` still reads KV group ``h' // k``.

Which neurons/heads go is decided by an importance score (``importance.py``) computed per layer; the output
projection then compensates the removal (``reconstruct.py``), and the relative output error each removal left
is returned per layer (before = columns simply dropped, after = with the chosen reconstruction).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import BudgetError, ConfigError
from ..models.architecture import decoder_layers
from .calibration import InputStats
from .importance import IMPORTANCE, group_scores
from .reconstruct import RECONSTRUCT, keep_columns, relative_error

SUPPORTED_ARCHITECTURES = ("llama",)  # Llama-style blocks with config fields mlp_bias / attention_bias (SmolLM, Llama, TinyLlama)


def check_architecture(model) -> None:
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(f"width pruning does not know the {model_type!r} architecture (supported: {', '.join(SUPPORTED_ARCHITECTURES)}); use structure: depth or unstructured for it")


def output_projections(model, parts: str) -> dict[str, nn.Linear]:
    """The output projections whose input channels width pruning removes, by a stable name."""
    found = {}
    for i, layer in enumerate(decoder_layers(model)):
        if "mlp" in parts:
            found[f"layers.{i}.mlp.down_proj"] = layer.mlp.down_proj
        if "heads" in parts:
            found[f"layers.{i}.self_attn.o_proj"] = layer.self_attn.o_proj
    return found


def _geometry(model) -> dict:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return dict(hidden=c.hidden_size, intermediate=c.intermediate_size, heads=c.num_attention_heads, kv=c.num_key_value_heads, head_dim=head_dim,
                mlp_bias=bool(getattr(c, "mlp_bias", False)), attention_bias=bool(getattr(c, "attention_bias", False)))


def _linear_params(g: dict, intermediate: int, heads: int, mlp_bias: bool, attention_bias: bool) -> int:
    h, kv, hd = g["hidden"], g["kv"], g["head_dim"]
    attn = 2 * h * heads * hd + 2 * h * kv * hd + attention_bias * (heads * hd + 2 * kv * hd + h)
    mlp = 3 * h * intermediate + mlp_bias * (2 * intermediate + h)
    return attn + mlp


def plan_width(model, layer_budget: float, parts: str, heads: float | None, reconstruct: str, target: float, multiple_of: int = 1) -> tuple[int, int]:
    """``(intermediate_size, query heads per KV group)`` so that one layer has at most ``layer_budget``
    parameters; heads follow ``heads`` (or ``target``) to the nearest whole head, neurons fill the rest,
    rounded down to a multiple of ``multiple_of`` (where at least that many remain)."""
    g = _geometry(model)
    layer = decoder_layers(model)[0]
    other = sum(p.numel() for p in layer.parameters()) - _linear_params(g, g["intermediate"], g["heads"], g["mlp_bias"], g["attention_bias"])  # norms
    mlp_bias = g["mlp_bias"] or (reconstruct == "bias" and "mlp" in parts)
    attention_bias = g["attention_bias"] or (reconstruct == "bias" and "heads" in parts)
    per_group = g["heads"] // g["kv"]
    if "heads" in parts:
        k = max(1, min(per_group, round((heads if heads is not None else target) * per_group)))
    else:
        k = per_group
    if k == per_group and _linear_params(g, g["intermediate"], g["heads"], g["mlp_bias"], g["attention_bias"]) + other <= layer_budget:
        return g["intermediate"], k  # nothing to remove (and no bias to add)
    if parts == "heads":
        while k > 1 and _linear_params(g, g["intermediate"], k * g["kv"], mlp_bias, attention_bias) + other > layer_budget:
            k -= 1
        if _linear_params(g, g["intermediate"], k * g["kv"], mlp_bias, attention_bias) + other > layer_budget:
            raise BudgetError(f"removing heads alone cannot reach this budget (one head per KV group still leaves {_linear_params(g, g['intermediate'], g['kv'], mlp_bias, attention_bias) + other:,} parameters per layer); use width_parts: mlp+heads")
        return g["intermediate"], k
    rest = _linear_params(g, 0, k * g["kv"], mlp_bias, attention_bias) + other + mlp_bias * g["hidden"]
    per_neuron = 3 * g["hidden"] + 2 * mlp_bias
    intermediate = min(g["intermediate"], int((layer_budget - rest) // per_neuron))
    if intermediate >= multiple_of > 1:
        # A width that quantization groups (32) and CPU kernels divide: the default run's 716 neurons
        # could not be quantized with group 32 at all.
        intermediate -= intermediate % multiple_of
    if intermediate < 1:
        raise BudgetError(f"the budget leaves no MLP neuron ({layer_budget:,.0f} parameters per layer, {rest:,} needed without the MLP); raise the target or remove heads too")
    return intermediate, k


def added_biases(g: dict, parts: str, reconstruct: str, intermediate: int, heads_per_group: int) -> tuple[bool, bool]:
    """Whether the pruned MLP / attention carry biases: as before, or because bias compensation needs one."""
    mlp = g["mlp_bias"] or (reconstruct == "bias" and "mlp" in parts and intermediate < g["intermediate"])
    attention = g["attention_bias"] or (reconstruct == "bias" and "heads" in parts and heads_per_group < g["heads"] // g["kv"])
    return mlp, attention


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, with_bias: bool) -> nn.Linear:
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=with_bias, dtype=weight.dtype, device=weight.device)
    layer.weight.data.copy_(weight)
    if with_bias:
        layer.bias.data.copy_(bias if bias is not None else torch.zeros(out_features))
    return layer


@torch.no_grad()
def _prune_channels(out_proj: nn.Linear, in_projs: list[nn.Linear], keep: torch.Tensor, stats: InputStats, reconstruct: str, damp: float, with_bias: bool) -> tuple[nn.Linear, list[nn.Linear], float, float]:
    """New (output projection, input projections) keeping channels ``keep``; and the relative output errors
    of the output projection (columns dropped, after reconstruction)."""
    w = out_proj.weight.data.float()
    removed_any = len(keep) < w.shape[1]
    dropped, _ = keep_columns(w, keep, stats, 0.0)
    error_none = relative_error(w, keep, dropped, None, stats) if removed_any else 0.0
    if removed_any:
        new_w, delta = RECONSTRUCT.get(reconstruct)(w, keep, stats, damp)
    else:  # nothing removed: leave the weights exactly as they were
        new_w, delta = dropped, None
    error = relative_error(w, keep, new_w, delta, stats) if removed_any else 0.0
    bias = out_proj.bias.data.float() if out_proj.bias is not None else None
    if delta is not None:
        bias = delta if bias is None else bias + delta
    dtype = out_proj.weight.dtype
    new_out = _linear(new_w.to(dtype), None if bias is None else bias.to(dtype), with_bias)
    new_in = [_linear(p.weight.data[keep], None if p.bias is None else p.bias.data[keep], with_bias) for p in in_projs]
    return new_out, new_in, error_none, error


def neuron_order(mlp, stats: InputStats, importance: str) -> torch.Tensor:
    """The MLP's neurons, most important first."""
    scores = IMPORTANCE.get(importance)(mlp.down_proj.weight.data, [mlp.gate_proj.weight.data, mlp.up_proj.weight.data], stats)
    return scores.argsort(descending=True, stable=True)


def prune_mlp(mlp, stats: InputStats, width: int, importance: str, reconstruct: str, damp: float, with_bias: bool) -> tuple[float, float]:
    """Keep the ``width`` most important neurons of ``mlp`` (in place), the output projection compensating;
    returns its relative output error with the columns dropped and after the reconstruction."""
    keep = neuron_order(mlp, stats, importance)[:width].sort().values
    mlp.down_proj, (mlp.gate_proj, mlp.up_proj), error_dropped, error = _prune_channels(
        mlp.down_proj, [mlp.gate_proj, mlp.up_proj], keep, stats, reconstruct, damp, with_bias)
    mlp.intermediate_size = width
    return error_dropped, error


def prune_width(model, stats: dict[str, InputStats], intermediate: int | list[int], heads_per_group: int, parts: str, importance: str, reconstruct: str, damp: float) -> list[dict]:
    """Shrink every layer to ``intermediate`` neurons (or ``intermediate[i]`` in layer ``i``) and
    ``heads_per_group`` query heads per KV group, in place. Returns per layer the relative output error of
    each pruned projection (before / after reconstruction)."""
    check_architecture(model)
    g = _geometry(model)
    score = IMPORTANCE.get(importance)
    per_group = g["heads"] // g["kv"]
    layers = decoder_layers(model)
    widths = [intermediate] * len(layers) if isinstance(intermediate, int) else list(intermediate)
    mlp_bias, attention_bias = added_biases(g, parts, reconstruct, min(widths), heads_per_group)
    report = []
    for i, layer in enumerate(layers):
        row: dict = {"layer": i}
        if "mlp" in parts:
            row["mlp_error_dropped"], row["mlp_error"] = prune_mlp(layer.mlp, stats[f"layers.{i}.mlp.down_proj"], widths[i], importance, reconstruct, damp, mlp_bias)
        attn = layer.self_attn
        if "heads" in parts:
            s = stats[f"layers.{i}.self_attn.o_proj"]
            head_scores = group_scores(score(attn.o_proj.weight.data, [attn.q_proj.weight.data], s, group_size=g["head_dim"]).reshape(-1), g["head_dim"]).view(g["kv"], per_group)
            kept_heads = (head_scores.topk(heads_per_group, dim=1).indices.sort(dim=1).values + torch.arange(g["kv"])[:, None] * per_group).flatten()
            channels = (kept_heads[:, None] * g["head_dim"] + torch.arange(g["head_dim"])).flatten()
            attn.o_proj, (attn.q_proj,), row["attn_error_dropped"], row["attn_error"] = _prune_channels(
                attn.o_proj, [attn.q_proj], channels, s, reconstruct, damp, attention_bias)
            if attention_bias and attn.k_proj.bias is None:
                attn.k_proj = _linear(attn.k_proj.weight.data, None, True)
                attn.v_proj = _linear(attn.v_proj.weight.data, None, True)
            attn.num_key_value_groups = heads_per_group
            attn.head_dim = g["head_dim"]
            row["kept_heads"] = kept_heads.tolist()
        report.append({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()})
    c = model.config
    c.intermediate_size = max(widths)
    c.num_attention_heads = heads_per_group * g["kv"]
    c.head_dim = g["head_dim"]  # no longer hidden_size // num_attention_heads once heads are removed
    c.mlp_bias, c.attention_bias = mlp_bias, attention_bias
    return report
