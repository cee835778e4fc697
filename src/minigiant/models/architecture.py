"""Architecture access: the few places where model families differ, behind one small interface.

Decoder-only HF models keep their blocks in ``model.model.layers`` (llama, qwen2, mistral, gemma, phi3)
or ``model.transformer.h`` (gpt2); the config names the layer count ``num_hidden_layers`` or ``n_layer``.
"""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError

_LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers")
# The model families whose layout the paths above cover: what a user is told minigiant works with.
SUPPORTED_FAMILIES = ("llama", "qwen2", "mistral", "gemma", "phi3", "gpt2", "gpt_neox")


def _find_layers(model: nn.Module) -> tuple[nn.Module, str]:
    """The module holding the decoder layers and the attribute name they are under."""
    for dotted in _LAYER_PATHS:
        parent_path, _, attr = dotted.rpartition(".")
        try:
            parent = model.get_submodule(parent_path)
        except AttributeError:
            continue
        if isinstance(getattr(parent, attr, None), nn.ModuleList):
            return parent, attr
    raise ConfigError(f"{type(model).__name__} keeps its decoder layers in an unknown place; supported: {', '.join(_LAYER_PATHS)}")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    parent, attr = _find_layers(model)
    return getattr(parent, attr)


def keep_layers(model: nn.Module, keep: list[int]) -> None:
    """Keep only the decoder layers at indices ``keep`` (in order), fixing config and cache indices, in place."""
    layers = decoder_layers(model)
    parent, attr = _find_layers(model)
    setattr(parent, attr, nn.ModuleList([layers[i] for i in keep]))
    for new_index, layer in enumerate(getattr(parent, attr)):
        attn = getattr(layer, "self_attn", None) or getattr(layer, "attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_index  # the KV cache is indexed by position in the stack
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_index
    config = model.config
    for name in ("num_hidden_layers", "n_layer"):
        if hasattr(config, name):
            setattr(config, name, len(keep))
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) > len(keep):
        config.layer_types = [layer_types[i] for i in keep]


def mlp_widths(model: nn.Module) -> list[int] | None:
    """Each decoder layer's MLP width (``down_proj`` input channels) when the layers differ (per-layer width
    pruning, ``prune.profile``); None when they are all alike or the layers have no such MLP."""
    try:
        widths = [_mlp_width(layer.mlp) for layer in decoder_layers(model)]
    except (AttributeError, ConfigError):
        return None
    return widths if len(set(widths)) > 1 else None


def _mlp_width(mlp: nn.Module) -> int:
    down = mlp.down_proj
    return down.in_features if hasattr(down, "in_features") else down.weight.shape[1]


def set_mlp_widths(model: nn.Module, widths: list[int]) -> None:
    """Give decoder layer ``i`` an MLP of ``widths[i]`` neurons: new, uninitialised projections of the shapes
    those widths need (on the current default device: ``meta`` while a saved model is being built), for the
    saved weights to be loaded into."""
    layers = decoder_layers(model)
    if len(widths) != len(layers):
        raise ConfigError(f"{len(widths)} MLP widths for {len(layers)} decoder layers; the model's minigiant.json does not fit its config.json")
    for layer, width in zip(layers, widths):
        mlp = layer.mlp
        gate, down = mlp.gate_proj, mlp.down_proj
        hidden = gate.in_features
        mlp.gate_proj = nn.Linear(hidden, width, bias=gate.bias is not None, dtype=gate.weight.dtype)
        mlp.up_proj = nn.Linear(hidden, width, bias=mlp.up_proj.bias is not None, dtype=gate.weight.dtype)
        mlp.down_proj = nn.Linear(width, down.out_features, bias=down.bias is not None, dtype=down.weight.dtype)
        mlp.intermediate_size = width


def _count(modules, seen: set) -> int:
    """Distinct parameters of ``modules``; tied weights count once. A quantized module (packed buffers, no
    parameters) counts its logical weight size via ``logical_numel()``, deduplicated by its ``qweight``."""
    total = 0
    for module in modules:
        if hasattr(module, "logical_numel"):
            if id(module.qweight) not in seen:
                seen.add(id(module.qweight))
                total += module.logical_numel()
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def embedding_parameters(model: nn.Module) -> int:
    """Parameters of the input embedding and, when not tied to it, of the output head."""
    heads = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    return _count([sub for m in heads for sub in m.modules()], set())


def total_parameters(model: nn.Module) -> int:
    return _count(model.modules(), set())


def non_embedding_parameters(model: nn.Module) -> int:
    return total_parameters(model) - embedding_parameters(model)
