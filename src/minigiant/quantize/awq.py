"""AWQ (Lin et al., 2023): before rounding, multiply each input channel of a linear layer by a scale that
grows with how large that channel's activations are, and divide the op that produces those activations by
the same scale, so the float model computes exactly the same function while the channels that matter most
are rounded with a finer relative step.

Per group of linears sharing one input (``ScaleGroup`` below: the attention norm → q/k/v, the MLP norm →
gate/up, v_proj → o_proj when their shapes match, up_proj → down_proj), the scale is
``s = mean|x|^alpha`` (normalised to geometric mean 1) with ``alpha`` searched over ``awq_grid`` values in
[0, 1); the error minimised is the groups' output error on calibration inputs, ``tr(ΔW H ΔW^T)`` with
``H = X^T X``, which is exact and costs no more tokens than the Hessian holds. ``alpha = 0`` is plain RTN,
so the chosen scales never do worse than RTN on the calibration data.

What rounds the scaled weights is ``awq_rounding``: ``rtn`` (the paper) or ``gptq``. With ``gptq`` the same
calibration pass also collects every target's Hessian; after a layer's scales are folded, each target's inputs
are its original inputs divided by its group's ``s``, so its Hessian becomes ``H / (s s^T)`` and GPTQ rounds
the scaled weight against it (the two methods compose as in llm-compressor's AWQ-then-GPTQ recipes). As in
GPTQ, the next layers then calibrate on what the quantized layer outputs. At 4 bits (group 32) with damping
0.1, WikiText-2's change on three distilled students was 1.7-4.3 ppl smaller than with rounding to nearest;
with GPTQ's usual 0.01 one student got worse, which looks like fitting the calibration books too closely
(BENCHMARKS.md, 2026-12-07).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import DataError
from .calibration import calibration_ids, for_each_layer, capturing_inputs, layer_targets
from .formats import QUANTIZATION_METHODS, QuantizedWeight, WeightFormat, dequantize, quantize_rtn
from .gptq import LayerByLayer, hessian_tokens_needed


@dataclass(frozen=True)
class ScaleGroup:
    previous: str  # the op whose output channels feed the linears (relative to the decoder layer)
    linears: tuple[str, ...]


SCALE_GROUPS = (
    ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",)),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",)),
)


def _scales_output(previous: nn.Module, width: int) -> bool:
    """Whether dividing ``previous.weight`` by ``s`` divides its output channels by ``s`` (a linear's rows; a
    norm that multiplies by its weight, checked on a random input: Gemma's ``1 + weight`` would fail)."""
    weight = getattr(previous, "weight", None)
    if isinstance(previous, nn.Linear):
        return previous.out_features == width and previous.bias is None
    if weight is None or weight.shape != (width,):
        return False
    x = torch.randn(2, width, generator=torch.Generator().manual_seed(0), dtype=weight.dtype)
    s = torch.rand(width, generator=torch.Generator().manual_seed(1), dtype=weight.dtype) + 0.5
    with torch.no_grad():
        before = previous(x)
        weight.div_(s)
        after = previous(x)
        weight.mul_(s)
    return torch.allclose(after * s, before, rtol=1e-4, atol=1e-5)


def resolve_groups(layer: nn.Module, target_names: dict[nn.Module, str]) -> list[tuple[nn.Module, list[nn.Module]]]:
    """The scale groups of ``layer`` whose linears are all quantization targets and whose previous op can
    absorb a scale."""
    groups = []
    for group in SCALE_GROUPS:
        try:
            previous = layer.get_submodule(group.previous)
            linears = [layer.get_submodule(name) for name in group.linears]
        except AttributeError:
            continue
        if not all(isinstance(m, nn.Linear) and m in target_names for m in linears):
            continue
        width = linears[0].in_features
        if all(m.in_features == width for m in linears) and _scales_output(previous, width):
            groups.append((previous, linears))
    return groups


@torch.no_grad()
def apply_scales(previous: nn.Module, linears: list[nn.Module], scales: torch.Tensor) -> None:
    """Fold ``scales`` (``[width]``): the previous op's output channels divided, the linears' inputs multiplied."""
    if isinstance(previous, nn.Linear):
        previous.weight.div_(scales.unsqueeze(1).to(previous.weight.dtype))
    else:
        previous.weight.div_(scales.to(previous.weight.dtype))
    for linear in linears:
        linear.weight.mul_(scales.to(linear.weight.dtype))


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(ΔW H ΔW^T)``: the summed squared output error over the calibration inputs."""
    return float(((delta @ hessian) * delta).sum())


@torch.no_grad()
def search_scales(linears: list[nn.Module], formats: list[WeightFormat], hessian: torch.Tensor, mean_abs: torch.Tensor, grid: int) -> tuple[torch.Tensor, float, float]:
    """The best ``s`` for these linears, its output error, and plain RTN's (``alpha = 0``)."""
    best, best_error, rtn_error = torch.ones_like(mean_abs), float("inf"), float("inf")
    weights = [m.weight.detach().float() for m in linears]
    for k in range(grid):
        alpha = k / grid
        s = mean_abs.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        error = 0.0
        for w, fmt in zip(weights, formats):
            restored = dequantize(quantize_rtn(w * s, fmt), fmt, torch.float32) / s
            error += output_error(restored - w, hessian)
        if k == 0:
            rtn_error = error
        if error < best_error:
            best, best_error = s, error
    return best, best_error, rtn_error


@QUANTIZATION_METHODS.register("awq")
@torch.no_grad()
def awq(model, targets, ctx, config) -> dict[str, QuantizedWeight]:
    """Search and fold AWQ scales layer by layer, then round every target (``config.awq_rounding``)."""
    target_names = {module: name for name, module, _ in targets}
    formats = {module: fmt for _, module, fmt in targets}
    by_module = {module: (name, fmt) for name, module, fmt in targets}
    by_gptq = config.awq_rounding == "gptq"
    linear_targets = [t for t in targets if isinstance(t[1], nn.Linear)]
    width = max((m.weight.shape[1] for _, m, _ in linear_targets), default=0)
    ids = calibration_ids(model, config, ctx, hessian_tokens_needed(linear_targets) if by_gptq else width, "awq")
    rounding = LayerByLayer(config)

    def visit(index, layer, run):
        groups = resolve_groups(layer, target_names)
        # Inputs of the first linear of each group (the group shares them), or of every target for GPTQ.
        watched = layer_targets(layer, by_module) if by_gptq else {}
        watched.update({target_names[linears[0]]: linears[0] for _, linears in groups})
        stats = {name: [torch.zeros(m.in_features, m.in_features), torch.zeros(m.in_features), 0] for name, m in watched.items()}

        def accumulate(name, x):
            hessian, mean_abs, count = stats[name]
            hessian.addmm_(x.T, x)
            mean_abs.add_(x.abs().sum(0))
            stats[name][2] = count + x.shape[0]

        with capturing_inputs(watched, accumulate):
            run()
        input_scale = {}
        for previous, linears in groups:
            hessian, mean_abs, count = stats[target_names[linears[0]]]
            if count == 0:
                raise DataError("awq saw no calibration tokens reach a layer; give more calibration text")
            scales, _, _ = search_scales(linears, [formats[m] for m in linears], hessian / count, mean_abs / count, config.awq_grid)
            apply_scales(previous, linears, scales)
            input_scale.update({m: scales for m in linears})
        if by_gptq:
            for name, module in watched.items():
                hessian, _, count = stats[name]
                s = input_scale.get(module)
                hessian = 2 * hessian / max(count, 1)  # GPTQ's H = 2 X^T X / n, of the unscaled inputs
                if s is not None:
                    hessian = hessian / torch.outer(s, s)  # the inputs are x / s now
                rounding.round(name, module, hessian, formats[module])

    for_each_layer(model, ids, visit, "awq")
    return rounding.finish(targets)  # codes of the scaled float weights, which compute what the model did
