"""Which GGUF type each tensor gets for an export type, following llama.cpp's ``llama-quantize`` rules
(``src/llama-quant.cpp``: ``llama_tensor_get_type_impl`` and ``tensor_type_fallback``) for a dense llama model.

- 1-D tensors (norms) stay F32; every 2-D weight takes the export type's base type, except:
- the output head (or, when the head is tied, the token embedding, which serves as both) takes Q6_K
  unless the base type is Q8_0 (or F16/F32);
- with ``tq2_0`` an untied token embedding takes Q4_K;
- ``q4_k_m`` and ``q5_k_m``: ``attn_v`` and ``ffn_down`` take Q6_K in the layers ``use_more_bits`` picks (the
  first and last eighth of the layers and every third one between);
- ``q3_k_m``: ``attn_v`` takes Q5_K in the first two layers and Q4_K after, ``ffn_down`` Q5_K in the first
  sixteenth of the layers and Q4_K after, ``attn_output`` Q4_K; only q, k, gate and up stay Q3_K;
- a row length that the chosen type's block does not divide falls back: Q4_K→Q5_0, Q5_K→Q5_1, Q6_K→Q8_0,
  TQ2_0/Q3_K→Q4_0; a row that not even 32 divides is stored F16 (SmolLM2's hidden size 576 = 2.25 x 256
  sends every 576-wide k-quant tensor to its fallback, exactly as llama-quantize does).
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, LlamaFileType

from ..errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class ExportType:
    base: T
    file_type: LlamaFileType
    mixture: str = ""  # llama.cpp's *_K_M bumps: "q3_k_m" | "q4_k_m" | "q5_k_m"


EXPORT_TYPES: dict[str, ExportType] = {
    "f32": ExportType(T.F32, LlamaFileType.ALL_F32),
    "f16": ExportType(T.F16, LlamaFileType.MOSTLY_F16),
    "bf16": ExportType(T.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": ExportType(T.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q5_1": ExportType(T.Q5_1, LlamaFileType.MOSTLY_Q5_1),
    "q5_0": ExportType(T.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "q4_1": ExportType(T.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "q4_0": ExportType(T.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q6_k": ExportType(T.Q6_K, LlamaFileType.MOSTLY_Q6_K),
    "q5_k_m": ExportType(T.Q5_K, LlamaFileType.MOSTLY_Q5_K_M, "q5_k_m"),
    "q4_k_m": ExportType(T.Q4_K, LlamaFileType.MOSTLY_Q4_K_M, "q4_k_m"),
    "q3_k_m": ExportType(T.Q3_K, LlamaFileType.MOSTLY_Q3_K_M, "q3_k_m"),
    "tq2_0": ExportType(T.TQ2_0, LlamaFileType.MOSTLY_TQ2_0),
}

FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0, T.Q3_K: T.Q4_0, T.Q2_K: T.Q4_0, T.TQ2_0: T.Q4_0, T.TQ1_0: T.Q4_0}


def export_type(name: str) -> ExportType:
    try:
        return EXPORT_TYPES[name.lower()]
    except KeyError:
        raise ConfigError(f"export.type: unknown GGUF type {name!r}; {did_you_mean(name, EXPORT_TYPES)}choose one of {', '.join(EXPORT_TYPES)}") from None


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits in the *_K_M mixtures."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def block_size(qtype: T) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def with_fallback(qtype: T, cols: int) -> T:
    """The type a ``cols``-wide row can actually be stored in (llama.cpp's ``tensor_type_fallback``)."""
    if cols % block_size(qtype) == 0:
        return qtype
    fallback = FALLBACK.get(qtype, qtype)
    return fallback if cols % block_size(fallback) == 0 else T.F16


def tensor_type(name: str, shape: tuple[int, ...], kind: ExportType, n_layers: int, tied: bool) -> T:
    """The GGUF type of tensor ``name`` (GGUF naming, numpy shape ``[rows, cols]``) in an export of ``kind``."""
    if len(shape) < 2:
        return T.F32
    base = kind.base
    if base in (T.F32, T.F16, T.BF16):
        return base
    chosen = base
    cols = shape[-1]
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        if cols % block_size(base):
            chosen = T.Q8_0
        elif base != T.Q8_0:
            chosen = T.Q6_K
    elif name == "token_embd.weight":
        if base == T.TQ2_0:
            chosen = T.Q4_K
    elif kind.mixture and name.startswith("blk."):
        chosen = mixture_type(kind.mixture, name.split(".")[2], int(name.split(".")[1]), n_layers, base)
    return with_fallback(chosen, cols)


def mixture_type(mixture: str, tensor: str, layer: int, n_layers: int, base: T) -> T:
    """The type llama.cpp's ``*_K_M`` mixture gives the layer tensor ``tensor`` (``attn_v``, ``ffn_down``, ...)."""
    if mixture in ("q4_k_m", "q5_k_m"):
        if tensor in ("attn_v", "ffn_down") and use_more_bits(layer, n_layers):
            return T.Q6_K
    elif mixture == "q3_k_m":
        if tensor == "attn_v":
            return T.Q5_K if layer < 2 else T.Q4_K
        if tensor == "ffn_down":
            return T.Q5_K if layer < n_layers // 16 else T.Q4_K
        if tensor == "attn_output":
            return T.Q4_K
    return base
