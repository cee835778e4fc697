"""Sequential pruning: layer by layer, each layer calibrated on the stream the already-pruned layers produce.

Width (``prune_width_sequential``): each pruned layer is refit towards the teacher's own hidden states.

One-shot pruning (``width.py``) scores and refits every layer on the unpruned model's activations, so each
layer preserves its own output but the errors of earlier layers add up. Here two residual streams run side
by side through the calibration tokens, one through the original layers (the teacher) and one through the
pruned ones. For every layer, the attention heads are chosen on the pruned stream and ``o_proj`` is refit so
that the pruned stream's mid-layer state matches the teacher's; then the MLP neurons likewise, with
``down_proj`` refit towards the teacher's layer output. The refit therefore also corrects what earlier
layers lost (the "error feedback" of layer-wise compression, as in SparseGPT/OBC's sequential mode).

For ``t`` the target (teacher state minus the pruned stream's residual) and ``x`` the projection's input on
the pruned stream, the methods minimise ``E||t - W' x_S - b||^2``: ``none`` keeps ``W_S`` and no bias,
``bias`` keeps ``W_S`` with the best constant ``b = E[t] - W_S E[x_S]``, ``lstsq`` solves
``W' = C_S^T (G_SS + λI)^-1`` with ``C = E[x t^T]``, ``G = E[x x^T]``.

Unstructured (``sparsify_sequential``), as the Wanda and SparseGPT papers run it: the calibration tokens pass
through the pruned layers only. Each layer's linear inputs are gathered on that stream, the layer's weights
are sparsified with those statistics, and the pruned layer's output becomes the next layer's input, so a
later layer's mask and (SparseGPT) update see the error the earlier ones left.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..models.architecture import decoder_layers
from ..progress import progress
from .calibration import InputStats
from .importance import IMPORTANCE, group_scores
from .width import _geometry, _linear, added_biases, check_architecture


class _Stop(Exception):
    pass


@torch.no_grad()
def _first_layer_inputs(model, blocks: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, dict]]:
    """The hidden states and keyword arguments (position embeddings, mask) the first decoder layer receives."""
    captured = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, {k: v for k, v in kwargs.items() if k in ("position_embeddings", "attention_mask", "position_ids")}))
        raise _Stop

    handle = decoder_layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in blocks.split(batch_size):
            try:
                model(batch, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _attention(layer, h, kwargs):
    return layer.self_attn(hidden_states=layer.input_layernorm(h), **kwargs)[0]


def _mlp(layer, h):
    return layer.mlp(layer.post_attention_layernorm(h))


@torch.no_grad()
def sparsify_sequential(model, blocks: torch.Tensor, batch_size: int, sparsify_layer) -> None:
    """``sparsify_layer(index, layer, stats)`` sparsifies one decoder layer in place from ``stats`` (the
    ``InputStats`` of each distinct linear input, keyed by the module's name inside the layer), gathered on
    the stream of the layers already sparsified."""
    check_architecture(model)
    inputs = _first_layer_inputs(model, blocks, batch_size)
    hidden, kwargs = [h for h, _ in inputs], [kw for _, kw in inputs]
    layers = decoder_layers(model)
    with progress(transient=True) as bar:
        task = bar.add_task("prune: sequential sparsity", total=len(layers), info="")
        for i, layer in enumerate(layers):
            modules = {name: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear) and shares_input_with(name) == name}
            stats = {name: InputStats.empty(m.in_features) for name, m in modules.items()}
            handles = [m.register_forward_hook(lambda mod, inp, out, s=stats[name]: s.add(inp[0])) for name, m in modules.items()]
            try:
                for h, kw in zip(hidden, kwargs):
                    _layer(layer, h, kw)
            finally:
                for handle in handles:
                    handle.remove()
            sparsify_layer(i, layer, stats)
            hidden = [_layer(layer, h, kw) for h, kw in zip(hidden, kwargs)]
            bar.advance(task)


def shares_input_with(name: str) -> str:
    """The linear whose input ``name`` reads: k/v read q's input, up reads gate's."""
    return name.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up_proj", "gate_proj")


def _layer(layer, h, kwargs):
    mid = h + _attention(layer, h, kwargs)
    return mid + _mlp(layer, mid)


class _TargetStats:
    """``InputStats`` of a projection's input ``x`` plus the cross moments with the target ``t``."""

    def __init__(self, in_dim: int, out_dim: int):
        self.x = InputStats.empty(in_dim)
        self.cross = torch.zeros(in_dim, out_dim, dtype=torch.float64)  # sum x t^T
        self.t_total = torch.zeros(out_dim, dtype=torch.float64)
        self.t_square = 0.0

    def add(self, x: torch.Tensor, t: torch.Tensor) -> None:
        x, t = x.reshape(-1, x.shape[-1]).float(), t.reshape(-1, t.shape[-1]).float()
        self.x.add(x)
        self.cross += (x.T @ t).double()
        self.t_total += t.sum(0).double()
        self.t_square += t.double().pow(2).sum().item()

    def fit(self, weight: torch.Tensor, keep: torch.Tensor, reconstruct: str, damp: float) -> tuple[torch.Tensor, torch.Tensor | None, float, float]:
        """New weight for the kept columns, a bias (or None), and the relative error before/after."""
        n = self.x.count
        g = self.x.gram[keep][:, keep] / n
        c = self.cross[keep] / n
        mu_x, mu_t = self.x.mean[keep], self.t_total / n
        dropped = weight[:, keep].double()
        if reconstruct == "none":
            new, bias = dropped, None
        elif reconstruct == "bias":
            new, bias = dropped, mu_t - dropped @ mu_x
        elif reconstruct == "lstsq":
            ridge = damp * g.diagonal().mean().clamp_min(1e-12)
            new, bias = torch.linalg.solve(g + ridge * torch.eye(len(keep), dtype=g.dtype), c).T, None
        else:
            raise ConfigError(f"unknown reconstruction {reconstruct!r}; choose one of: none, bias, lstsq")
        t_sq = self.t_square / n

        def error(w, b):
            e = t_sq - 2 * (w * c.T).sum() + (w @ g * w).sum()
            if b is not None:
                e = e - 2 * b @ mu_t + 2 * b @ (w @ mu_x) + b @ b
            return max(e.item(), 0.0) / max(t_sq, 1e-30)

        return new.to(weight.dtype), None if bias is None else bias.to(weight.dtype), round(error(dropped, None), 5), round(error(new, bias), 5)


@torch.no_grad()
def prune_width_sequential(model, blocks: torch.Tensor, batch_size: int, intermediate: int, heads_per_group: int, parts: str, importance: str, reconstruct: str, damp: float) -> list[dict]:
    """Width-prune every layer in order, refitting towards the teacher's hidden states (see module doc)."""
    check_architecture(model)
    if importance == "taylor":
        raise ConfigError("the taylor score needs gradients of the whole model and is one-shot only; use sequential: false or another importance")
    g = _geometry(model)
    score = IMPORTANCE.get(importance)
    per_group = g["heads"] // g["kv"]
    mlp_bias, attention_bias = added_biases(g, parts, reconstruct, intermediate, heads_per_group)
    inputs = _first_layer_inputs(model, blocks, batch_size)
    teacher = [h for h, _ in inputs]
    student = [h.clone() for h in teacher]
    kwargs = [kw for _, kw in inputs]
    report = []
    layers = decoder_layers(model)
    with progress(transient=True) as bar:
        task = bar.add_task("prune: sequential refit", total=len(layers), info="")
        for i, layer in enumerate(layers):
            row: dict = {"layer": i}
            attn, mlp = layer.self_attn, layer.mlp
            teacher_mid = [h + _attention(layer, h, kw) for h, kw in zip(teacher, kwargs)]
            teacher_out = [h + _mlp(layer, h) for h in teacher_mid]
            if "heads" in parts and heads_per_group < per_group:
                stats = _TargetStats(attn.o_proj.in_features, g["hidden"])
                seen = {}
                handle = attn.o_proj.register_forward_hook(lambda m, inp, out: seen.__setitem__("x", inp[0]))
                for h, kw, tm in zip(student, kwargs, teacher_mid):
                    _attention(layer, h, kw)
                    stats.add(seen["x"], tm - h - (attn.o_proj.bias if attn.o_proj.bias is not None else 0))
                handle.remove()
                head_scores = group_scores(score(attn.o_proj.weight.data, [attn.q_proj.weight.data], stats.x, group_size=g["head_dim"]).reshape(-1), g["head_dim"]).view(g["kv"], per_group)
                kept_heads = (head_scores.topk(heads_per_group, dim=1).indices.sort(dim=1).values + torch.arange(g["kv"])[:, None] * per_group).flatten()
                channels = (kept_heads[:, None] * g["head_dim"] + torch.arange(g["head_dim"])).flatten()
                new_w, bias, row["attn_error_dropped"], row["attn_error"] = stats.fit(attn.o_proj.weight.data.float(), channels, reconstruct, damp)
                old_bias = attn.o_proj.bias.data if attn.o_proj.bias is not None else None
                bias = old_bias if bias is None else (bias if old_bias is None else bias + old_bias)
                attn.o_proj = _linear(new_w, bias, attention_bias)
                attn.q_proj = _linear(attn.q_proj.weight.data[channels], None if attn.q_proj.bias is None else attn.q_proj.bias.data[channels], attention_bias)
                if attention_bias and attn.k_proj.bias is None:
                    attn.k_proj = _linear(attn.k_proj.weight.data, None, True)
                    attn.v_proj = _linear(attn.v_proj.weight.data, None, True)
                attn.num_key_value_groups = heads_per_group
                row["kept_heads"] = kept_heads.tolist()
            student_mid = [h + _attention(layer, h, kw) for h, kw in zip(student, kwargs)]
            if "mlp" in parts and intermediate < mlp.down_proj.in_features:
                stats = _TargetStats(mlp.down_proj.in_features, g["hidden"])
                seen = {}
                handle = mlp.down_proj.register_forward_hook(lambda m, inp, out: seen.__setitem__("x", inp[0]))
                for h, to in zip(student_mid, teacher_out):
                    _mlp(layer, h)
                    stats.add(seen["x"], to - h - (mlp.down_proj.bias if mlp.down_proj.bias is not None else 0))
                handle.remove()
                scores = score(mlp.down_proj.weight.data, [mlp.gate_proj.weight.data, mlp.up_proj.weight.data], stats.x)
                keep = scores.topk(intermediate).indices.sort().values
                new_w, bias, row["mlp_error_dropped"], row["mlp_error"] = stats.fit(mlp.down_proj.weight.data.float(), keep, reconstruct, damp)
                old_bias = mlp.down_proj.bias.data if mlp.down_proj.bias is not None else None
                bias = old_bias if bias is None else (bias if old_bias is None else bias + old_bias)
                mlp.down_proj = _linear(new_w, bias, mlp_bias)
                mlp.gate_proj, mlp.up_proj = (_linear(p.weight.data[keep], None if p.bias is None else p.bias.data[keep], mlp_bias) for p in (mlp.gate_proj, mlp.up_proj))
                mlp.intermediate_size = intermediate
            student = [h + _mlp(layer, h) for h in student_mid]
            teacher = teacher_out
            report.append(row)
            bar.advance(task)
    c = model.config
    c.intermediate_size = intermediate
    c.num_attention_heads = heads_per_group * g["kv"]
    c.head_dim = g["head_dim"]
    c.mlp_bias, c.attention_bias = mlp_bias, attention_bias
    return report

