"""Mixed precision: give each linear layer one of ``bit_choices`` so the average bits per weight (scales
included) meets ``target_bits``, with more bits where rounding hurts the layer's output most.

A layer's sensitivity at ``b`` bits is its estimated output error on calibration text relative to its output,
``sum_j E[x_j^2] |W[:, j] - Q_b(W)[:, j]|^2 / sum_j E[x_j^2] |W[:, j]|^2`` (the diagonal of GPTQ's Hessian
weighting the RTN error of each input column), measured in one forward pass with hooks on every target.
Relative, because absolute errors grow with depth as the activations do: ranked by them, every early layer
got the fewest bits. Every layer starts at the fewest bits; the upgrade with the largest error drop per extra
stored bit is taken until the next would exceed the budget (a greedy knapsack). Without a tokenizer the activations are taken as 1 (plain weight error).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..errors import BudgetError, ConfigError
from .calibration import input_energy
from .formats import dequantize, quantize_rtn


def assign_bits(model, plan, config, ctx):
    """``plan`` with each linear's format at its chosen bit width (the embedding is left as it is)."""
    if config.method in ("ternary", "binary"):
        raise ConfigError(f"quantize.target_bits: method {config.method} has a fixed width; use rtn, gptq, awq or kmeans for mixed precision")
    choices = sorted(set(config.bit_choices))
    if config.method == "kmeans":
        choices = [b for b in choices if b <= 4]
    linears = {name: m for name, m, _ in plan if isinstance(m, nn.Linear)}
    energy = input_energy(model, linears, config, ctx, "mixed precision")
    options = {}  # name → [(stored bits, error, fmt)] by increasing bits
    for name, module, fmt in plan:
        if name not in linears:
            continue
        row = []
        w = module.weight.detach().float()
        # Relative to the layer's own output energy (same diagonal estimate): absolute errors grow with depth as
        # activations do, and ranked by them every early layer fell to the fewest bits (ppl 97 → 1073 at 3.5 bits).
        signal = float((w * w * energy[name]).sum()) or 1.0
        for bits in choices:
            candidate = dataclasses.replace(fmt, bits=bits)
            delta = dequantize(quantize_rtn(w, candidate), candidate, torch.float32) - w
            row.append((candidate.storage_bits() * w.numel(), float((delta * delta * energy[name]).sum()) / signal, candidate))
        options[name] = row
    numel = sum(m.weight.numel() for m in linears.values())
    budget = config.target_bits * numel
    level = dict.fromkeys(options, 0)
    spent = sum(row[0][0] for row in options.values())
    if spent > budget:
        low = min(choices)
        raise BudgetError(f"quantize.target_bits: {config.target_bits} is below what {low}-bit layers store ({spent / numel:.3f} bits per weight with scales); raise target_bits or add smaller bit_choices")
    while True:
        best = None
        for name, row in options.items():
            i = level[name]
            for j in range(i + 1, len(row)):
                extra = row[j][0] - row[i][0]
                gain = row[i][1] - row[j][1]
                if spent + extra <= budget and gain > 0 and (best is None or gain / extra > best[0]):
                    best = (gain / extra, name, j, extra)
        if best is None:
            break
        _, name, j, extra = best
        level[name], spent = j, spent + extra
    return [(name, module, options[name][level[name]][2] if name in options else fmt) for name, module, fmt in plan]
