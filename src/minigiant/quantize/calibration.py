"""Calibration for GPTQ, AWQ and mixed precision: text → token blocks → each decoder layer's inputs, one
layer at a time (so only one layer's activations are in memory), as GPTQ's reference implementation does.

``for_each_layer(model, ids, visit)`` captures the inputs of the first decoder layer by stopping the model
there, then for every layer calls ``visit(index, layer, run)``, where ``run()`` feeds the layer's inputs
through it (forward hooks the visitor installed see every calibration token) and returns nothing; after the
visit the layer is run once more to give the next layer its inputs, so a visitor that changed the layer's
weights (GPTQ's quantized ones) passes that change on.
"""

from __future__ import annotations

import contextlib

from typing import Callable, Iterator

import torch
from torch import nn

from ..errors import DataError
from ..models.architecture import decoder_layers
from ..progress import progress


def calibration_ids(model, config, ctx, needed: int, method: str) -> torch.Tensor:
    """``[n, calibration_block]`` token ids from ``config.calibration`` (``samples``: the model's own, sampled
    before it is quantized); DataError below ``needed`` tokens."""
    from ..data.samples import resolve_samples
    from ..data.text import sample_blocks

    tokenizer = ctx.require_tokenizer(f"quantize (method {method})")
    if config.calibration_tokens < needed:
        raise DataError(f"{method} needs at least {needed} calibration tokens for these layers, but calibration_tokens is {config.calibration_tokens}; raise calibration_tokens to {needed} or more")
    block = config.calibration_block
    text = resolve_samples(config.calibration, model, tokenizer, config.calibration_tokens, ctx.seed)
    blocks = sample_blocks(tokenizer, text, block, -(-config.calibration_tokens // block), seed=ctx.seed, what="calibration text")
    if blocks.numel() < needed:
        raise DataError(f"{method} needs at least {needed} calibration tokens for these layers, but {config.calibration} gave {blocks.numel()}; give more calibration text or a smaller calibration_block")
    return blocks


class _Stop(Exception):
    pass


def _first_layer_inputs(model: nn.Module, ids: torch.Tensor, batch: int) -> tuple[list[torch.Tensor], dict]:
    layers = decoder_layers(model)
    hidden, captured = [], {}

    def catch(module, args, kwargs):
        hidden.append(args[0] if args else kwargs.pop("hidden_states"))
        captured.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Stop

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for start in range(0, ids.shape[0], batch):
            try:
                model(input_ids=ids[start : start + batch].to(model.device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    captured.pop("past_key_values", None)
    captured.pop("past_key_value", None)
    captured["use_cache"] = False
    return hidden, captured


def _output(result) -> torch.Tensor:
    return result[0] if isinstance(result, (tuple, list)) else result


@torch.no_grad()
def for_each_layer(model: nn.Module, ids: torch.Tensor, visit: Callable, label: str, batch: int = 4) -> None:
    """Call ``visit(index, layer, run)`` for every decoder layer in order (see the module doc)."""
    # Equal batches: the captured kwargs (masks, rotary tables) belong to one batch shape.
    batch = min(batch, ids.shape[0])
    hidden, kwargs = _first_layer_inputs(model, ids[: ids.shape[0] // batch * batch], batch)
    layers = decoder_layers(model)
    with progress(transient=True) as bar:
        task = bar.add_task(f"quantize: {label}", total=len(layers), info="")
        for index, layer in enumerate(layers):
            def run(layer=layer):
                for h in hidden:
                    layer(h, **kwargs)

            visit(index, layer, run)
            hidden = [_output(layer(h, **kwargs)) for h in hidden]
            bar.advance(task)


@contextlib.contextmanager
def capturing_inputs(modules: dict[str, nn.Module], on_input: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """While inside, each module's forward calls ``on_input(name, x2d)`` with its input as ``[tokens, features]``."""
    handles = []
    for name, module in modules.items():
        def hook(mod, args, name=name):
            x = args[0]
            on_input(name, x.reshape(-1, x.shape[-1]).float())

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def layer_targets(layer: nn.Module, targets_by_module: dict) -> dict[str, nn.Module]:
    """The quantization targets (module → (name, fmt)) that live inside ``layer``, by full name."""
    inside = {id(m) for m in layer.modules()}
    return {name: module for module, (name, _) in targets_by_module.items() if id(module) in inside}


@torch.no_grad()
def input_energy(model: nn.Module, linears: dict[str, nn.Module], config, ctx, method: str) -> dict[str, torch.Tensor]:
    """``E[x_j^2]`` of every input column of each linear on calibration text (one forward pass with hooks): the
    diagonal of GPTQ's Hessian. All ones without a tokenizer (then errors are plain weight errors)."""
    energy = {name: torch.zeros(m.in_features) for name, m in linears.items()}
    if ctx is None or ctx.tokenizer is None:
        return {name: e + 1 for name, e in energy.items()}
    counts = dict.fromkeys(linears, 0)

    def accumulate(name, x):
        energy[name] += (x.float() * x.float()).sum(0)
        counts[name] += x.shape[0]

    ids = calibration_ids(model, config, ctx, 1, method)
    with capturing_inputs(linears, accumulate):
        for start in range(0, ids.shape[0], 4):
            model(input_ids=ids[start : start + 4].to(model.device), use_cache=False)
    return {name: e / max(counts[name], 1) for name, e in energy.items()}
