"""A quantized or sparse model on disk, and back, bit for bit.

The directory is a Hugging Face one: ``config.json`` (the float architecture), ``generation_config.json``
and ``minigiant-packed.safetensors``, whose tensors are the model's state dict: packed ``qweight`` (uint8), float16
``scales``, uint8 ``zeros`` for every quantized module, and every other parameter as it was. A tensor
shared by two names (a float tied head) is written once; the safetensors metadata says which name repeats
which. ``minigiant.json`` has a ``quantization`` entry listing each quantized module (kind, has_bias and its
``WeightFormat`` fields: bits, group_size, symmetric, zero_point, full_range, scale_dtype, codebook) and the tied head, which is enough to rebuild the module tree.

Sparse matrices (unstructured or N:M pruning) are stored as a bitmask of their nonzeros plus the nonzero
values in row-major order (``SPARSE_LAYOUT``), wherever that takes at most ``SPARSE_SAVING`` of the dense
bytes: at 50% density a float32 matrix then needs 53% of its dense size. ``minigiant.json`` has a
``sparse_storage`` entry; a float model with no such matrix is saved by transformers as usual.

Loading follows gpt-fast: build the float architecture on the meta device (no memory, no init), swap in
empty quantized modules, densify the sparse matrices, then ``load_state_dict(assign=True)`` takes the
file's tensors as they are.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError
from .formats import WeightFormat
from .modules import PACKED_MODULES, QuantEmbedding, QuantLinear, TiedQuantLinear

# Not "model.safetensors": plain transformers would then load this directory with random float weights
# (it ignores an unknown quantization_config); without that file it refuses with "no file named model.safetensors".
WEIGHTS_FILE = "minigiant-packed.safetensors"
LAYOUT = "minigiant-packed/1"  # the packing described in formats.py; bump it if that ever changes
_ALIASES_KEY = "minigiant.aliases"  # safetensors metadata: {name not written: name holding the same tensor}
# {packed module: the float dtype it returns, non-persistent buffer: its dtype}, both changed by model.to(dtype)
_DTYPES_KEY = "minigiant.dtypes"
SPARSE_LAYOUT = "minigiant-sparse/1"  # bit k of mask byte i is element 8i+k of the flattened matrix; values follow its order
_SPARSE_KEY = "minigiant.sparse"  # safetensors metadata: {matrix stored as NAME.sparse_mask + NAME.sparse_values: its shape}
SPARSE_SAVING = 0.9  # store a matrix sparse only where that takes at most 90% of its dense bytes
_BITS = torch.tensor([1 << k for k in range(8)], dtype=torch.uint8)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, PACKED_MODULES) for m in model.modules())


def module_spec(name: str, module: nn.Module) -> dict:
    """The lineage entry for one quantized module: what ``load_packed`` needs to rebuild it."""
    kind = "embedding" if isinstance(module, QuantEmbedding) else "linear"
    return {"name": name, "kind": kind, **dataclasses.asdict(module.format), "has_bias": getattr(module, "bias", None) is not None}


def _unique_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop names whose tensor is already stored under an earlier name (safetensors refuses shared storage)."""
    tensors, aliases, first = {}, {}, {}
    for name, tensor in state.items():
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
            tensors[name] = tensor.detach().contiguous().cpu()
    return tensors, aliases


def _sparse_bytes(tensor: torch.Tensor) -> int:
    return -(-tensor.numel() // 8) + int(torch.count_nonzero(tensor)) * tensor.element_size()


def sparse_matrices(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the float matrices that are smaller as bitmask + nonzero values than dense."""
    return [name for name, t in tensors.items()
            if t.dim() == 2 and t.is_floating_point() and _sparse_bytes(t) <= SPARSE_SAVING * t.numel() * t.element_size()]


def pack_sparse(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, values)``: the nonzeros of ``tensor`` as packed bits (uint8) and their values, in row-major order."""
    flat = tensor.reshape(-1)
    nonzero = flat != 0
    bits = torch.nn.functional.pad(nonzero, (0, -flat.numel() % 8)).view(-1, 8).to(torch.uint8)
    return (bits * _BITS).sum(1, dtype=torch.uint8), flat[nonzero].clone()


def unpack_sparse(mask: torch.Tensor, values: torch.Tensor, shape: list[int]) -> torch.Tensor:
    numel = math.prod(shape)
    nonzero = ((mask.unsqueeze(1) & _BITS) != 0).reshape(-1)[:numel]
    if int(nonzero.sum()) != values.numel():
        raise ValueError(f"the mask has {int(nonzero.sum())} nonzeros but {values.numel()} values are stored")
    dense = torch.zeros(numel, dtype=values.dtype)
    dense[nonzero] = values
    return dense.reshape(shape)


def save_packed(model: nn.Module, directory: str | os.PathLike) -> dict | None:
    """Write ``model`` (quantized modules and/or sparse matrices) as ``WEIGHTS_FILE`` with its configs.
    Returns the ``sparse_storage`` lineage entry, or None when no matrix is stored sparse."""
    from safetensors.torch import save_file

    directory = Path(directory)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        # transformers would read it as one of its own quantizers; our format is described in minigiant.json
        del config.quantization_config
    config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    tensors, aliases = _unique_tensors(model.state_dict())
    dtypes = {name: m.dtype for name, m in model.named_modules() if isinstance(m, (QuantEmbedding, QuantLinear))}
    dtypes.update(_non_persistent_buffers(model))
    dtypes = {name: str(dtype).removeprefix("torch.") for name, dtype in dtypes.items()}
    sparse, dense_bytes, stored_bytes = {}, 0, 0
    for name in sparse_matrices(tensors):
        tensor = tensors.pop(name)
        mask, values = pack_sparse(tensor)
        tensors[f"{name}.sparse_mask"], tensors[f"{name}.sparse_values"] = mask, values
        sparse[name] = list(tensor.shape)
        dense_bytes += tensor.numel() * tensor.element_size()
        stored_bytes += mask.numel() + values.numel() * values.element_size()
    metadata = {"format": "pt", _ALIASES_KEY: json.dumps(aliases), _DTYPES_KEY: json.dumps(dtypes), _SPARSE_KEY: json.dumps(sparse)}
    save_file(tensors, directory / WEIGHTS_FILE, metadata=metadata)
    if not sparse:
        return None
    return {"layout": SPARSE_LAYOUT, "matrices": len(sparse), "dense_bytes": dense_bytes, "stored_bytes": stored_bytes}


def _non_persistent_buffers(model: nn.Module) -> dict[str, torch.dtype]:
    return {
        f"{prefix}.{name}" if prefix else name: module._buffers[name].dtype
        for prefix, module in model.named_modules()
        for name in module._non_persistent_buffers_set
        if module._buffers.get(name) is not None
    }


def _quantized_module(spec: dict, float_module: nn.Module, dtype: torch.dtype) -> nn.Module:
    # Fields added after minigiant-packed/1 first shipped have defaults, so older directories still load.
    fmt = WeightFormat(**{f.name: spec[f.name] for f in dataclasses.fields(WeightFormat) if f.name in spec})
    if spec["kind"] == "embedding":
        return QuantEmbedding(float_module.num_embeddings, float_module.embedding_dim, fmt, dtype)
    return QuantLinear(float_module.in_features, float_module.out_features, fmt, spec["has_bias"], dtype)


def _materialize_non_persistent_buffers(model: nn.Module, dtypes: dict[str, str]) -> None:
    """Non-persistent buffers (rotary ``inv_freq``) are not in the file; compute them on the CPU the way
    ``from_pretrained`` does (an empty tensor, then the model's own ``_init_weights`` for its module), then
    cast them to the dtype they had when saved (``model.to(torch.bfloat16)`` rounds ``inv_freq`` too)."""
    for prefix, module in model.named_modules():
        names = [n for n in module._non_persistent_buffers_set if module._buffers.get(n) is not None]
        if not names:
            continue
        for name in names:
            module._buffers[name] = torch.empty_like(module._buffers[name], device="cpu")
        model._init_weights(module)  # its parameters are still on meta here: initialising them is a no-op
        for name in names:
            saved = dtypes.get(f"{prefix}.{name}" if prefix else name)
            if saved:
                module._buffers[name] = module._buffers[name].to(getattr(torch, saved))


def _retie(model: nn.Module, aliases: dict[str, str]) -> None:
    for name, source in aliases.items():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        source_owner_name, _, source_attr = source.rpartition(".")
        tensor = getattr(model.get_submodule(source_owner_name), source_attr)
        if attr in owner._parameters:
            owner._parameters[attr] = tensor
        else:
            owner._buffers[attr] = tensor


def load_packed(path: str | os.PathLike, lineage: dict) -> nn.Module:
    """Rebuild the model ``save_packed`` wrote at ``path``; its outputs equal the saved model's exactly."""
    import safetensors
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    spec = lineage.get("quantization") or {"modules": []}
    if lineage.get("quantization") and spec.get("layout") != LAYOUT:
        raise ModelLoadError(f"{path} holds quantized weights in layout {spec.get('layout')!r}; this minigiant reads {LAYOUT!r}, so upgrade minigiant or re-quantize the float model")
    sparse_layout = (lineage.get("sparse_storage") or {}).get("layout")
    if sparse_layout not in (None, SPARSE_LAYOUT):
        raise ModelLoadError(f"{path} holds sparse weights in layout {sparse_layout!r}; this minigiant reads {SPARSE_LAYOUT!r}, so upgrade minigiant")
    try:
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        file = safe_open(path / WEIGHTS_FILE, framework="pt")
        metadata = file.metadata() or {}
        sparse = json.loads(metadata.get(_SPARSE_KEY, "{}"))
        packed = {f"{name}.sparse_{part}" for name in sparse for part in ("mask", "values")}
        state = {name: file.get_tensor(name) for name in file.keys() if name not in packed}
    except Exception as exc:
        raise ModelLoadError(f"could not read the packed model in {path} ({type(exc).__name__}: {exc})") from None
    aliases = json.loads(metadata.get(_ALIASES_KEY, "{}"))
    dtypes = json.loads(metadata.get(_DTYPES_KEY, "{}"))
    try:
        for name, shape in sparse.items():
            # One matrix's mask and values at a time: all of them next to the dense matrices raised the
            # peak memory of a 40%-sparse student's evaluation above the dense teacher's (1304 vs 1051 MB).
            state[name] = unpack_sparse(file.get_tensor(f"{name}.sparse_mask"), file.get_tensor(f"{name}.sparse_values"), shape)
    except (KeyError, ValueError, RuntimeError, safetensors.SafetensorError) as exc:
        raise ModelLoadError(f"{path}/{WEIGHTS_FILE}: a sparse matrix is incomplete ({type(exc).__name__}: {exc}); re-save the model") from None
    finally:
        del file

    try:
        with torch.device("meta"):
            if lineage.get("mlp_widths"):
                from ..models.architecture import set_mlp_widths

                set_mlp_widths(model, lineage["mlp_widths"])
            for entry in spec["modules"]:
                dtype = getattr(torch, dtypes.get(entry["name"], "float32"))
                model.set_submodule(entry["name"], _quantized_module(entry, model.get_submodule(entry["name"]), dtype))
        tied = spec.get("tied_head")
        if tied:
            model.set_submodule(tied["head"], TiedQuantLinear(model.get_submodule(tied["embedding"])))
    except (AttributeError, KeyError) as exc:
        raise ModelLoadError(f"the quantization entry of {path}/minigiant.json does not fit its config.json ({type(exc).__name__}: {exc}); re-save the model") from None
    _materialize_non_persistent_buffers(model, dtypes)

    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # shape mismatches
        raise ModelLoadError(f"{path}/{WEIGHTS_FILE} does not match its config.json and minigiant.json ({exc}); re-save the model") from None
    missing = [name for name in missing if name not in aliases]
    if missing or unexpected:
        raise ModelLoadError(f"{path}/{WEIGHTS_FILE} does not match its config.json and minigiant.json (missing {missing[:3]}, unexpected {unexpected[:3]}); re-save the model")
    _retie(model, aliases)
    still_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise ModelLoadError(f"{path}: {still_meta[0]} was neither saved nor recomputed; this architecture is not supported by load_packed")
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.minigiant_lineage = lineage
    return model.eval()
