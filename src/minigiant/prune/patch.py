"""ReplaceMe-style linear patch for depth pruning (Shopkhoev et al. 2025, "ReplaceMe: Network Simplification
via Layer Pruning and Linear Transformations").

A run of removed layers ``s..e`` is replaced by one linear map ``T`` applied to the MLP output of the last
kept layer before it (``s - 1``): with ``m`` that MLP output, ``y`` the residual it is added to and ``l`` the
teacher's hidden state after layer ``e``, ``T = argmin E||m T + y - l||^2 (+ ridge)`` in closed form from
``E[m^T m]`` and ``E[m^T (l - y)]`` on calibration activations. ``T`` is folded into that layer's
``down_proj`` (``W <- T^T W``), so the pruned model has no extra module and plain transformers loads it.
A run that starts at layer 0 has no layer to fold into and is left unpatched.
"""

from __future__ import annotations

import torch

from ..models.architecture import decoder_layers
from ..progress import progress


def removed_runs(removed: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs ``(first, last)`` of the sorted layer indices ``removed``."""
    runs: list[tuple[int, int]] = []
    for i in sorted(removed):
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


@torch.no_grad()
def linear_patches(model, removed: list[int], blocks: torch.Tensor, batch_size: int, damp: float) -> dict[int, torch.Tensor]:
    """``{kept layer index: T}`` for every run of ``removed`` layers that has a kept layer before it; computed
    on the unpruned ``model`` in one forward pass."""
    layers = decoder_layers(model)
    runs = [(s, e) for s, e in removed_runs(removed) if s > 0]
    hidden = model.config.hidden_size
    mm = {s - 1: torch.zeros(hidden, hidden, dtype=torch.float64) for s, _ in runs}
    mt = {s - 1: torch.zeros(hidden, hidden, dtype=torch.float64) for s, _ in runs}
    held: dict = {}
    handles = []
    for s, e in runs:
        before = layers[s - 1]
        handles.append(before.mlp.register_forward_hook(lambda mod, inp, out, k=s - 1: held.__setitem__(("m", k), out)))
        handles.append(before.register_forward_hook(lambda mod, inp, out, k=s - 1: held.__setitem__(("out", k), out[0] if isinstance(out, tuple) else out)))
        handles.append(layers[e].register_forward_hook(lambda mod, inp, out, k=s - 1: held.__setitem__(("l", k), out[0] if isinstance(out, tuple) else out)))
    try:
        with progress(transient=True) as bar:
            task = bar.add_task("prune: linear patches", total=blocks.shape[0], info="")
            for batch in blocks.split(batch_size):
                model(batch, use_cache=False)
                for k in mm:
                    m = held[("m", k)].reshape(-1, hidden).float()
                    y = held[("out", k)].reshape(-1, hidden).float() - m  # the residual the MLP output is added to
                    target = held[("l", k)].reshape(-1, hidden).float() - y
                    mm[k] += (m.T @ m).double()
                    mt[k] += (m.T @ target).double()
                bar.advance(task, batch.shape[0])
    finally:
        for h in handles:
            h.remove()
    patches = {}
    for k in mm:
        ridge = damp * mm[k].diagonal().mean().clamp_min(1e-12)
        patches[k] = torch.linalg.solve(mm[k] + ridge * torch.eye(hidden, dtype=torch.float64), mt[k])
    return patches


@torch.no_grad()
def fold_patch(layer, patch: torch.Tensor) -> None:
    """``down_proj(x) T`` (row vectors) becomes ``down_proj'(x)`` with ``W' = T^T W`` and ``b' = b T``."""
    down = layer.mlp.down_proj
    dtype = down.weight.dtype
    down.weight.data = (patch.T @ down.weight.data.double()).to(dtype)
    if down.bias is not None:
        down.bias.data = (down.bias.data.double() @ patch).to(dtype)
