"""GPTQ (Frantar et al., 2022): quantize a linear layer column by column, spreading each column's rounding
error over the columns not yet quantized so that the layer's output on calibration inputs moves least.

For a layer with inputs ``X`` (``[tokens, cols]``) the output error of weights ``Q`` is
``tr((W - Q) H (W - Q)^T)`` with the Hessian ``H = 2 X^T X / tokens``. Columns are visited in order of
decreasing ``diag(H)`` (``act_order``); after rounding column ``i`` the remaining columns absorb its error
through the Cholesky factor of ``H^-1`` (``damping`` × mean diagonal added first so it exists). Updates are
applied lazily in blocks of ``gptq_block`` columns. With ``act_order`` the group grids are fixed from the
unquantized weight before the columns are visited ("static groups"), because stored groups are runs of
consecutive original columns; without it each group's grid is fitted to the updated weights when its first
column is reached, as in the paper.

Layers run one after another on the calibration text (``calibration.for_each_layer``); each layer's
Hessians come from inputs that already passed through the quantized layers before it. Targets outside the
decoder layers (the embedding, an untied head) are rounded to nearest.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .calibration import calibration_ids, for_each_layer, capturing_inputs, layer_targets
from .formats import QUANTIZATION_METHODS, QuantizedWeight, WeightFormat, assemble, decode, dequantize, encode, grid, quantize_rtn


def hessian_tokens_needed(targets) -> int:
    """Calibration tokens GPTQ asks for: twice the widest input, so ``X^T X`` has full rank with margin."""
    return 2 * max((m.weight.shape[1] for _, m, _ in targets), default=0)


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, fmt: WeightFormat, damping: float = 0.01, act_order: bool = True, block: int = 128) -> QuantizedWeight:
    """GPTQ for one ``[rows, cols]`` weight given ``H = 2 X^T X / n`` (``[cols, cols]``)."""
    if fmt.codebook:
        raise ConfigError("quantize: gptq rounds to integer grids; use method kmeans for codebook formats")
    W = weight.detach().float().clone()
    rows, cols = W.shape
    H = hessian.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    gs = fmt.group_size
    groups = cols // gs

    if act_order:
        static_scale, static_zero = grid(W.reshape(rows, groups, gs), fmt)  # [rows, groups, 1]
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    else:
        perm = None
        static_scale = torch.empty(rows, groups, 1)
        static_zero = torch.empty(rows, groups, 1)
    H += damping * torch.mean(torch.diag(H)) * torch.eye(cols)
    try:
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError:
        raise ConfigError("quantize: gptq's Hessian is not positive definite even after damping; raise damping (e.g. 0.1) or give more calibration text") from None

    codes = torch.zeros_like(W)
    column_group = (perm if perm is not None else torch.arange(cols)) // gs
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = int(column_group[col])
            if perm is None and col % gs == 0:
                # Dynamic groups: fit this group's grid to its (already updated) weights.
                group_w = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :gs] if i2 - col < gs else W1[:, i : i + gs]
                static_scale[:, g], static_zero[:, g] = (t[:, 0] for t in grid(group_w.unsqueeze(1), fmt))
            scale, zero = static_scale[:, g], static_zero[:, g]  # [rows, 1]
            w = W1[:, i : i + 1]
            q_codes = encode(w, scale, zero, fmt)
            codes[:, col : col + 1] = q_codes
            err = (w - decode(q_codes, scale, zero, fmt)) / Hinv1[i, i]
            W1[:, i:] -= err @ Hinv1[i : i + 1, i:]
            Err1[:, i : i + 1] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return assemble(codes, static_scale, static_zero, fmt)


class LayerByLayer:
    """GPTQ's rounding as the calibration pass walks the layers: each rounded weight is put in place at once, so
    the next layers calibrate on what this one will really output; ``finish()`` puts the float weights back
    at the end (``quantize()`` measures the error against them). ``codes``: name → ``QuantizedWeight``."""

    def __init__(self, config):
        self.config = config
        self.codes: dict[str, QuantizedWeight] = {}
        self.originals: dict = {}

    def round(self, name: str, module, hessian: torch.Tensor, fmt: WeightFormat) -> None:
        config = self.config
        self.codes[name] = gptq_quantize(module.weight, hessian, fmt, config.damping, config.act_order, config.gptq_block)
        self.originals[module] = module.weight.data
        module.weight.data = dequantize(self.codes[name], fmt, module.weight.dtype)

    def finish(self, targets) -> dict[str, QuantizedWeight]:
        """Put the float weights back and return every target's codes: GPTQ's where it rounded, else to nearest."""
        for module, weight in self.originals.items():
            module.weight.data = weight
        return {name: self.codes[name] if name in self.codes else quantize_rtn(module.weight, fmt) for name, module, fmt in targets}


@QUANTIZATION_METHODS.register("gptq")
@torch.no_grad()
def gptq(model, targets, ctx, config) -> dict[str, QuantizedWeight]:
    """GPTQ on every target inside a decoder layer; the rest rounded to nearest."""
    by_module = {module: (name, fmt) for name, module, fmt in targets}
    ids = calibration_ids(model, config, ctx, hessian_tokens_needed([t for t in targets if t[1].__class__.__name__ != "Embedding"]), "gptq")
    rounding = LayerByLayer(config)

    def visit(index, layer, run):
        inside = layer_targets(layer, by_module)
        hessians = {name: torch.zeros(m.weight.shape[1], m.weight.shape[1]) for name, m in inside.items()}
        counts = dict.fromkeys(inside, 0)

        def accumulate(name, x):
            n = x.shape[0]
            total = counts[name] + n
            hessians[name].mul_(counts[name] / total).addmm_(x.T, x, alpha=2 / total)
            counts[name] = total

        with capturing_inputs(inside, accumulate):
            run()
        for name, module in inside.items():
            rounding.round(name, module, hessians[name], by_module[module][1])

    for_each_layer(model, ids, visit, "gptq")
    return rounding.finish(targets)
