"""A llama-architecture model (float or minigiant-quantized) as one GGUF file: metadata, tokenizer, tensors.

Tensors are named by ``gguf``'s own Hugging Face → GGUF name map. A quantized minigiant module whose format
is exactly the GGUF block type its tensor gets (``minigiant quantize --gguf TYPE`` plans them so: GPTQ or AWQ
codes on llama.cpp's own Q4_0/Q5_0/Q8_0/... grids) is written code for code, scales as stored; any other
quantized module is dequantized to float32 and rounded again to the GGUF type, which adds a second rounding
(the report counts those tensors). ``q_proj`` and ``k_proj`` rows are permuted the way llama.cpp's
``convert_hf_to_gguf.py`` does for llama (its RoPE pairs neighbouring dimensions, Hugging Face's pairs the two
halves of each head); transformers' GGUF loader undoes it, so an export loads back with the same logits.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from .kquants import KQUANTS
from .tensor_types import ExportType, tensor_type
from .vocab import gguf_vocab

ARCHITECTURES = {"llama": "llama", "mistral": "llama"}  # Hugging Face model_type → GGUF architecture we write


def check_architecture(config) -> None:
    """ConfigError naming what GGUF's llama architecture cannot describe in ``config``."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ConfigError(f"export: the {model_type!r} architecture cannot be written as GGUF by minigiant; export supports {', '.join(ARCHITECTURES)} models")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise ConfigError(f"export: this {model_type} model has {flag}=true, which GGUF's llama architecture as transformers reads it does not describe; export a model without biases")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ConfigError(f"export: hidden_act {config.hidden_act!r} is not llama's silu; GGUF's llama architecture cannot describe it")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (None, "default"):
        raise ConfigError(f"export: RoPE scaling {rope_type!r} is not supported by minigiant's GGUF export yet; only plain RoPE (rope_type default) exports")
    if getattr(config, "sliding_window", None):
        raise ConfigError("export: a sliding attention window cannot be described by GGUF's llama architecture; export a model without sliding_window")


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def permute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's llama Q/K permutation: within each head, rows (half 0, half 1) interleave."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _gguf_name(name_map, hf_name: str) -> str:
    gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if gguf_name is None:
        raise ConfigError(f"export: the tensor {hf_name} has no place in GGUF's llama architecture; this model is not a plain llama")
    return gguf_name


def gguf_types(model, kind: ExportType) -> dict[str, object]:
    """The GGUF type (``GGMLQuantizationType``) each 2-D weight of the float ``model`` gets in an export of
    ``kind``, keyed by parameter name (a tied head is not listed: the embedding serves as both)."""
    import gguf

    check_architecture(model.config)
    n_layers = model.config.num_hidden_layers
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    params = dict(model.named_parameters())  # deduplicated: a tied head is not listed
    tied = "lm_head.weight" not in params
    return {name: tensor_type(_gguf_name(name_map, name), tuple(p.shape), kind, n_layers, tied) for name, p in params.items() if p.dim() == 2}


def _packed_modules(model) -> dict[str, torch.nn.Module]:
    """Weight name → minigiant packed module (QuantLinear, QuantEmbedding)."""
    return {f"{name}.weight": m for name, m in model.named_modules() if name and hasattr(m, "qweight") and callable(getattr(m, "dequantize", None))}


def exact_blocks(module, qtype, n_head: int | None = None) -> np.ndarray | None:
    """``module``'s own codes and scales as GGUF ``qtype`` blocks (rows permuted per ``n_head`` heads when
    given), or None when its format is not exactly that block type (the codes would need a new rounding)."""
    from ..quantize.formats import FORMAT_PRESETS, unpack
    from .blockquants import QK, pack_blocks

    if module.fmt != FORMAT_PRESETS.get(qtype.name.lower()):
        return None
    codes = unpack(module.qweight, module.fmt.bits).numpy()
    scales = module.scales.float().numpy()
    mins = None if module.zeros is None else module.zeros.float().numpy()
    if n_head is not None:
        codes, scales = permute_rows(codes, n_head), permute_rows(scales, n_head)
        mins = None if mins is None else permute_rows(mins, n_head)
    rows = codes.shape[0]
    blocks = pack_blocks(qtype.name, codes.reshape(-1, QK), scales.reshape(-1), None if mins is None else mins.reshape(-1))
    return blocks.reshape(rows, -1)


@torch.no_grad()
def float_weights(model) -> dict[str, np.ndarray]:
    """Every weight of ``model`` as float32 numpy, quantized modules dequantized; a tied head is left out."""
    out: dict[str, np.ndarray] = {}
    for name, module in model.named_modules():
        dequantize = getattr(module, "dequantize", None)
        if name and callable(dequantize) and hasattr(module, "qweight"):  # a minigiant packed module
            out[f"{name}.weight"] = dequantize(torch.float32).float().numpy()
    for name, param in model.named_parameters():  # deduplicated: a float tied head is not listed
        if name not in out:
            out[name] = param.detach().float().cpu().numpy()
    return out


def _encode(data: np.ndarray, qtype, rounding: str) -> tuple[np.ndarray, object]:
    """``(array to write, raw dtype or None)`` for ``data`` (float32) stored as ``qtype``; ``rounding`` is
    ``search`` (our scale search where we have one) or ``llama.cpp`` (its reference rounding)."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    from .blockquants import SEARCHED

    if qtype == T.F32:
        return data.astype(np.float32), None
    if qtype == T.F16:
        return data.astype(np.float16), None
    if qtype.name in KQUANTS:
        return KQUANTS[qtype.name](data)[0], qtype
    if rounding == "search" and qtype.name in SEARCHED:
        return SEARCHED[qtype.name](data)[0], qtype
    return quantize(data, qtype), qtype


def write_gguf(model, tokenizer, path: str | os.PathLike, kind: ExportType, name: str | None = None, rounding: str = "llama.cpp") -> dict:
    """Write ``model`` as a GGUF file at ``path`` (atomically); return what was written (types, sizes)."""
    import gguf

    from .. import artifact

    config = model.config
    check_architecture(config)
    from ..models.architecture import mlp_widths

    if mlp_widths(model):
        # llama.cpp's llama architecture builds every layer's MLP from one feed_forward_length
        raise ConfigError("export: this model's layers have MLPs of different widths (width_profile: sensitivity), which GGUF's llama architecture cannot describe; prune with width_profile: uniform to export it")
    n_layers, head_dim = config.num_hidden_layers, _head_dim(config)
    weights = float_weights(model)
    vocab_size = weights["model.embed_tokens.weight"].shape[0]
    tied = "lm_head.weight" not in weights
    vocab = gguf_vocab(tokenizer, vocab_size)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, "llama")
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or path.stem)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(n_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_rope_freq_base(_rope_theta(config))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_rope_dimension_count(head_dim)
        if head_dim * config.num_attention_heads != config.hidden_size:  # pruned heads: say the head size
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        writer.add_vocab_size(vocab_size)
        writer.add_file_type(kind.file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(vocab.pre)
        writer.add_token_list(vocab.tokens)
        writer.add_token_types(vocab.types)
        writer.add_token_merges(vocab.merges)
        for kind_name, token_id in vocab.special_ids.items():
            getattr(writer, {"bos": "add_bos_token_id", "eos": "add_eos_token_id", "unk": "add_unk_token_id", "pad": "add_pad_token_id"}[kind_name])(token_id)
        writer.add_add_bos_token(vocab.add_bos)
        if vocab.chat_template:
            writer.add_chat_template(vocab.chat_template)
        writer.add_string("minigiant.lineage", json.dumps(artifact.lineage(model), default=str))

        types: dict[str, str] = {}
        exact, rerounded = [], []
        data_bytes = elements = 0
        packed = _packed_modules(model)
        for hf_name, data in weights.items():
            gguf_name = _gguf_name(name_map, hf_name)
            n_head = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(gguf_name.split(".")[-2])
            if n_head is not None:
                data = permute_rows(data, n_head)
            qtype = tensor_type(gguf_name, data.shape, kind, n_layers, tied)
            encoded = exact_blocks(packed[hf_name], qtype, n_head) if hf_name in packed else None
            if encoded is not None:
                raw_dtype = qtype
                exact.append(hf_name)
            else:
                encoded, raw_dtype = _encode(np.ascontiguousarray(data, dtype=np.float32), qtype, rounding)
                if hf_name in packed:
                    rerounded.append(hf_name)
            writer.add_tensor(gguf_name, encoded, raw_dtype=raw_dtype)
            types[gguf_name] = qtype.name
            data_bytes += encoded.nbytes
            elements += data.size
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    return {
        "path": str(path),
        "file_bytes": path.stat().st_size,
        "tensor_bytes": data_bytes,
        "bits_per_weight": round(8 * data_bytes / elements, 4),
        "parameters": elements,
        "tensor_types": counts,
        "types": types,
        "exact_tensors": len(exact),  # quantized tensors written code for code
        "rerounded_tensors": rerounded,  # quantized tensors whose format is not their GGUF type: rounded twice
        "tied_embeddings": tied,
    }
