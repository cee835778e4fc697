"""Per-layer MLP widths at the same total size (``width_profile: sensitivity``).

Uniform width pruning takes as many neurons from every layer. The layers do not suffer alike: on
SmolLM2-135M, pruning only the first MLP to 704 of its 1536 neurons moves the next-token distribution 15×
more than pruning only the 17th (KL 0.22 against 0.015 nats), and the mean output error each removal leaves
predicts this badly (a layer whose output is one huge near-constant direction keeps 99.98% of it and still
costs 0.037 nats). So the sensitivity is measured, not guessed:

1. ``layer_sensitivity``: for each layer alone, its MLP is pruned to the uniform width (same score, same
   reconstruction) and the KL(original ‖ pruned) of the model's next-token distributions is measured on a
   few calibration blocks. The original model's hidden states at every depth are kept, so layer ``l``'s
   measurement runs only layers ``l`` and after.
2. ``prefix_errors`` (``reconstruct.py``) gives each layer's output error for every width at once.
3. ``allocate_widths`` assumes a layer's KL scales with its output error, ``cost_l(w) = s_l · e_l(w) /
   e_l(uniform)``, and that the layers' costs add up (on SmolLM2 the 30 single-layer KLs sum to 1.14, all
   layers pruned together give 0.95), then removes neurons, ``multiple_of`` at a time, wherever that costs
   least until the layers hold as many neurons in all as the uniform width would. Every neuron has the same
   parameters in every layer, so the model has exactly the uniform prune's size.

Measured on SmolLM2-135M at 60% kept (64 × 512 calibration tokens, lstsq, no refit; BENCHMARKS.md): WikiText-2
one-shot 123.1 → 110.9, held-out books 88.6 → 70.7; the first layers and the last ones keep the most neurons.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F

from ..models.architecture import decoder_layers
from ..progress import progress
from .sequential import _first_layer_inputs, _layer

SENSITIVITY_BLOCKS = 4  # calibration blocks the KL is measured on: the layers differ by up to 15x, more is noise


@torch.no_grad()
def layer_sensitivity(model, blocks: torch.Tensor, prune_mlp: Callable[[int, torch.nn.Module], torch.nn.Module]) -> list[float]:
    """Per decoder layer ``l``: mean KL(model ‖ model with layer ``l``'s MLP replaced by ``prune_mlp(l, a copy
    of it)``) in nats per token over ``blocks``; the model is left as it was."""
    layers = decoder_layers(model)
    inputs = _first_layer_inputs(model, blocks, 1)
    kwargs = [kw for _, kw in inputs]
    streams = [[h for h, _ in inputs]]  # streams[l]: what layer l receives, one tensor per block
    for layer in layers:
        streams.append([_layer(layer, h, kw) for h, kw in zip(streams[-1], kwargs)])
    norm, head = model.model.norm, model.get_output_embeddings()

    def log_probs(h):
        return F.log_softmax(head(norm(h)).float(), dim=-1)

    result = []
    with progress(transient=True) as bar:
        task = bar.add_task("prune: layer sensitivity", total=len(layers), info=f"{blocks.shape[0]} blocks")
        for i, layer in enumerate(layers):
            original = layer.mlp
            layer.mlp = prune_mlp(i, copy.deepcopy(original))
            try:
                kl, tokens = 0.0, 0
                for h, kw, reference in zip(streams[i], kwargs, streams[-1]):
                    for later in layers[i:]:
                        h = _layer(later, h, kw)
                    target = log_probs(reference)
                    kl += F.kl_div(log_probs(h), target, log_target=True, reduction="sum").item()
                    tokens += h.shape[0] * h.shape[1]
            finally:
                layer.mlp = original
            result.append(kl / tokens)
            bar.advance(task)
    return result


def allocate_widths(sensitivity: list[float], errors: list[torch.Tensor], width: int, multiple_of: int, minimum: int) -> list[int]:
    """Per-layer widths holding ``len(sensitivity) * width`` neurons in all (see the module doc). ``errors[l][k]``
    is layer ``l``'s relative output error keeping its ``k`` best neurons; widths stay multiples of
    ``multiple_of`` (or the layer's full width) and at least ``minimum``."""
    full = [len(e) - 1 for e in errors]
    budget = len(full) * width

    def cost(i: int, k: int) -> float:
        return sensitivity[i] * errors[i][k].item() / max(errors[i][width].item(), 1e-12)

    def narrower(i: int, k: int) -> int | None:
        step = k - (k % multiple_of or multiple_of)
        return step if step >= minimum else None

    widths = list(full)
    while sum(widths) > budget:
        options = [(cost(i, n) - cost(i, k), i, n) for i, k in enumerate(widths) if (n := narrower(i, k)) is not None]
        if not options:
            raise ValueError(f"allocate_widths: {minimum} neurons per layer already exceed the budget of {width} per layer")
        _, i, n = min(options)
        widths[i] = n
    return widths
