"""Quantize: store weights in fewer bits. Weight-only, per-group, packed for real (4-bit is half a byte per
weight on disk), run by modules that dequantize on the fly; loading restores the same outputs bit for bit.

    quantize(model, QuantizeConfig(bits=4, group_size=32))   # in place; returns the model

Which weights: the linear layers chosen by ``targets``/``ignore``, the input embedding at ``embedding_bits``,
and the output head: tied to the embedding it shares the embedding's quantized tensors (whatever
``targets`` and ``ignore`` say of it); untied it is one more linear layer at ``bits``. How they are rounded: ``method``, a name in ``QUANTIZATION_METHODS`` (``rtn``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .. import artifact
from ..config import field
from ..context import Context
from ..errors import ConfigError, did_you_mean
from ..targets import matches, select_modules
from . import awq, gptq, kmeans, mixed, ternary  # noqa: F401  (each registers its method)
from .formats import FORMAT_PRESETS, METHOD_FORMATS, QUANTIZATION_METHODS, SUPPORTED_BITS, QuantizedWeight, WeightFormat, dequantize, preset
from .modules import QuantEmbedding, QuantLinear, TiedQuantLinear
from .serialization import LAYOUT, is_quantized, load_packed, module_spec, save_packed


@dataclass
class QuantizeConfig:
    method: str = field("rtn", help="how weights are rounded: " + " | ".join(QUANTIZATION_METHODS.names()))
    format: Optional[str] = field(None, help="a named grid that sets bits/group_size/symmetric/zero_point for the linear layers: " + " | ".join(FORMAT_PRESETS) + " (llama.cpp's block types); null: use the fields below")
    gguf: Optional[str] = field(None, help="a GGUF export type (q4_k_m, q4_0, q8_0, ...): every weight, the embedding included, takes the block grid llama.cpp's llama-quantize gives its tensor, so `minigiant export --type` of the same name writes these codes unchanged; tensors it gives a k-quant stay float (export rounds them the llama.cpp way). Replaces format/bits/group_size/embedding_bits (null embedding_bits still keeps the embedding float); rtn, gptq or awq")
    bits: int = field(4, help="bits per weight of the linear layers: " + ", ".join(map(str, SUPPORTED_BITS)) + " (3, 5, 6 straddle bytes; stored at exactly that many bits)")
    group_size: int = field(32, help="weights sharing one scale, along the input dimension; must divide it; -1 = one group per output row")
    symmetric: bool = field(False, help="true: a scale per group around zero; false: a scale and a zero point per group")
    zero_point: str = field("integer", help="asymmetric grids: integer (a uint8 zero point, GPTQ style) or float (a stored group minimum, llama.cpp Q4_1 style)")
    scale_dtype: str = field("float16", help="dtype of stored scales (and float zero points): float16 | bfloat16 | float32")
    codebook: str = field("group", help="kmeans only: one codebook of 2**bits values per group (group_size -1: per row) or per tensor")
    embedding_bits: Optional[int] = field(8, help="bits of the input embedding (and of a head tied to it); null keeps them float")
    embedding_group_size: Optional[int] = field(None, help="group size of the embedding (and tied head); null: group_size; -1: one scale per row, which at 8 bits runs the int8 kernels (the tied head is a decode step's largest matmul)")
    target_bits: Optional[float] = field(None, help="mixed precision: an average bits per weight (scales included) over the linear layers; each layer gets one of bit_choices, more to the most sensitive; null: every layer at bits")
    bit_choices: list[int] = field([2, 3, 4, 5, 6, 8], help="mixed precision: the bit widths a layer may get")
    calibration: str = field("corpus:train", help="gptq/awq/mixed precision: text the activations come from (corpus, corpus:train, a .txt file or folder, samples: the model's own free-running samples, or a mix such as corpus:train+samples)")
    calibration_tokens: int = field(16384, help="gptq/awq/mixed precision: tokens of calibration text (GPTQ needs several times a layer's input width)")
    calibration_block: int = field(512, help="tokens per calibration sequence")
    damping: float = field(0.01, help="gptq (and awq_rounding gptq): added to the Hessian diagonal, as a fraction of its mean")
    act_order: bool = field(True, help="gptq: quantize columns in order of decreasing Hessian diagonal (largest activations first)")
    gptq_block: int = field(128, help="gptq: columns updated together before the lazy update of the rest")
    awq_grid: int = field(20, help="awq: scale exponents alpha tried in [0, 1) per block")
    awq_rounding: str = field("rtn", help="awq: what rounds the scaled weights: rtn (the paper) or gptq (GPTQ against the scaled Hessian, in the same calibration pass: smaller error, about a quarter more time)")
    ppl_text: Optional[str] = field("corpus:heldout", help="text on which the ppl change is measured after quantizing (needs a tokenizer); null skips it")
    ppl_windows: int = field(4, help="windows of ppl_window tokens for the ppl change")
    ppl_window: int = field(512, help="tokens per ppl window")
    targets: str | list[str] = field("all-linear", help="linear layers to quantize: all-linear (an untied output head included), names like q_proj, or re:<regex>")
    ignore: list[str] = field([], help="modules to keep float (same forms as targets; wins over targets)")

    def weight_format(self, bits: int | None = None, group_size: int | None = None) -> WeightFormat:
        """The format of the linear layers (``bits``/``group_size`` override; -1 is resolved by the caller)."""
        if self.format is not None:
            base = preset(self.format)
            return dataclasses.replace(base, **({} if bits is None else {"bits": bits}))
        bits = bits if bits is not None else self.bits
        group_size = group_size if group_size is not None else self.group_size
        if self.method == "kmeans":
            return WeightFormat(bits, group_size, True, "integer", False, self.scale_dtype, self.codebook)
        if self.method == "ternary" or (self.method == "binary" and bits > 1):
            return WeightFormat(bits, group_size, True, "integer", False, self.scale_dtype)
        if self.method == "binary":
            return WeightFormat(bits, group_size, False, "float", False, self.scale_dtype)
        return WeightFormat(bits, group_size, self.symmetric, "integer" if self.symmetric else self.zero_point, False, self.scale_dtype)

    def validate(self, path: str) -> None:
        QUANTIZATION_METHODS.get(self.method)
        if self.gguf is not None:
            from ..export.tensor_types import EXPORT_TYPES

            if self.gguf.lower() not in EXPORT_TYPES:
                raise ConfigError(f"{path}.gguf: unknown GGUF type {self.gguf!r}; {did_you_mean(self.gguf, EXPORT_TYPES)}choose one of {', '.join(EXPORT_TYPES)}")
            if self.method not in GGUF_METHODS:
                raise ConfigError(f"{path}.gguf: method {self.method} does not round onto GGUF's block grids; use one of {', '.join(GGUF_METHODS)}")
            for other in ("format", "target_bits"):
                if getattr(self, other) is not None:
                    raise ConfigError(f"{path}: gguf already sets each weight's grid; remove {other}")
        if self.format is not None:
            preset(self.format, f"{path}.format")
        if self.embedding_bits is not None and self.embedding_bits not in SUPPORTED_BITS:
            raise ConfigError(f"{path}.embedding_bits: must be one of {', '.join(map(str, SUPPORTED_BITS))} or null, got {self.embedding_bits!r}")
        for name in ("group_size", "embedding_group_size"):
            value = getattr(self, name)
            if value is not None and value != -1 and value < 1:
                raise ConfigError(f"{path}.{name}: must be a positive number of weights or -1 (one group per output row), got {value}")
        if self.codebook not in ("group", "tensor"):
            raise ConfigError(f"{path}.codebook: must be group or tensor, got {self.codebook!r}")
        if self.symmetric and self.zero_point == "float":
            raise ConfigError(f"{path}: a symmetric grid has no zero point, so zero_point: float needs symmetric: false")
        self.weight_format(group_size=1).check(path)
        requirement = METHOD_FORMATS.get(self.method)
        if requirement is not None:
            requirement(self, path)
        if self.target_bits is not None:
            bad = [b for b in self.bit_choices if b not in SUPPORTED_BITS]
            if bad or not self.bit_choices:
                raise ConfigError(f"{path}.bit_choices: must be a non-empty list of {', '.join(map(str, SUPPORTED_BITS))}, got {self.bit_choices!r}")
        for name in ("calibration_tokens", "calibration_block", "gptq_block", "awq_grid", "ppl_window"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{path}.{name}: must be a positive integer, got {getattr(self, name)}")
        if self.awq_rounding not in ("rtn", "gptq"):
            raise ConfigError(f"{path}.awq_rounding: must be rtn or gptq, got {self.awq_rounding!r}")
        if self.awq_rounding != "rtn" and self.method != "awq":
            raise ConfigError(f"{path}.awq_rounding: applies to method awq only (method is {self.method}); remove it or set method: awq")
        if not 0 <= self.damping < 1:
            raise ConfigError(f"{path}.damping: must be in [0, 1), got {self.damping}")


GGUF_METHODS = ("rtn", "gptq", "awq")  # the methods whose codes are plain integer grids like GGUF's blocks


def gguf_formats(model: nn.Module, config: QuantizeConfig) -> dict[str, WeightFormat | None]:
    """Module name → the minigiant format equal to the GGUF block type ``config.gguf`` gives its weight, or
    None where that type has no minigiant grid (k-quants, F16)."""
    from ..export.gguf_file import gguf_types
    from ..export.tensor_types import export_type

    types = gguf_types(model, export_type(config.gguf))
    return {name.removesuffix(".weight"): FORMAT_PRESETS.get(qtype.name.lower()) for name, qtype in types.items()}


def _format(name: str, module: nn.Module, fmt: WeightFormat) -> WeightFormat:
    cols = module.weight.shape[1]
    group_size = cols if fmt.group_size == -1 else fmt.group_size
    if cols % group_size:
        raise ConfigError(f"quantize.group_size: {group_size} does not divide the {cols} input features of {name}; choose a divisor of {cols} or -1")
    per_byte = 8 // fmt.bits if 8 % fmt.bits == 0 else 8
    if cols % per_byte:
        raise ConfigError(f"quantize: {name} has {cols} input features, which {fmt.bits}-bit codes cannot pack into whole bytes (needs a multiple of {per_byte}); add it to ignore")
    return dataclasses.replace(fmt, group_size=group_size)


def _plan(model: nn.Module, config: QuantizeConfig) -> tuple[list[tuple[str, nn.Module, WeightFormat]], tuple[str, str] | None, list[str]]:
    """The weights to quantize with their formats, ``(head, embedding)`` names when the head is tied, and the
    targets left float because their GGUF type (``config.gguf``) has no minigiant grid."""
    names = {m: n for n, m in model.named_modules()}
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is embedding.weight
    grids = gguf_formats(model, config) if config.gguf else None
    plan, left_float = [], []
    if config.embedding_bits is not None and not matches(names[embedding], config.ignore):
        if type(embedding).forward is not nn.Embedding.forward:
            raise ConfigError(f"quantize: the embedding {names[embedding]} is a {type(embedding).__name__} with its own forward, which QuantEmbedding would drop; set embedding_bits: null")
        # The embedding keeps the plain integer grid of the linear layers' group size (a codebook or ternary
        # grid for a lookup table is not what those methods are for).
        linear = config.weight_format()
        group_size = linear.group_size if config.embedding_group_size is None else config.embedding_group_size
        fmt = WeightFormat(config.embedding_bits, group_size, linear.symmetric, linear.zero_point, linear.full_range and config.embedding_bits > 1, linear.scale_dtype)
        if grids is not None:
            fmt = grids[names[embedding]]
        if fmt is None:
            left_float.append(names[embedding])
        else:
            plan.append((names[embedding], embedding, _format(names[embedding], embedding, fmt)))
    linears = select_modules(model, config.targets, config.ignore)
    if config.targets == "all-linear" and isinstance(head, nn.Linear) and not tied and not matches(names[head], config.ignore):
        linears.append((names[head], head))  # select_modules leaves the head out of all-linear; untied, it is one more linear
    seen = set()
    for name, module in linears:
        if (module is head and tied) or module in seen:
            continue  # a tied head follows the embedding (it is the same tensor)
        seen.add(module)
        if grids is not None and grids.get(name) is None:
            left_float.append(name)  # a k-quant or F16 tensor: the exporter rounds it
            continue
        plan.append((name, module, _format(name, module, config.weight_format() if grids is None else grids[name])))
    tied_names = (names[head], names[embedding]) if tied and plan and plan[0][1] is embedding else None
    return plan, tied_names, left_float


def _relative_error(module: nn.Module, weight: QuantizedWeight, fmt: WeightFormat) -> float:
    original = module.weight.detach().float()
    return ((dequantize(weight, fmt, torch.float32) - original).norm() / original.norm().clamp(min=1e-12)).item()


def _ppl(model, config: QuantizeConfig, ctx: Context) -> float | None:
    """Perplexity on ``ppl_text`` (None without a tokenizer, text or windows): the change quantization made."""
    if ctx.tokenizer is None or not config.ppl_text or config.ppl_windows < 1:
        return None
    from ..data.text import load_documents, tokenize_documents
    from ..evaluate.perplexity import perplexity

    ids = tokenize_documents(ctx.tokenizer, load_documents(config.ppl_text), max_tokens=config.ppl_windows * config.ppl_window)
    if ids.numel() < config.ppl_window:
        return None
    return perplexity(model, ids, window=config.ppl_window, max_windows=config.ppl_windows)["ppl"]


def _stored_bytes(model: nn.Module) -> int:
    """Bytes of the tensors ``save_packed`` writes (the weights file, less its small JSON header)."""
    from .serialization import _unique_tensors

    tensors, _ = _unique_tensors(model.state_dict())
    return sum(t.numel() * t.element_size() for t in tensors.values())


@torch.no_grad()
def quantize(model, config: QuantizeConfig = QuantizeConfig(), ctx: Context | None = None):
    """Replace the chosen weights of ``model`` by packed quantized ones, in place, and record the stage."""
    config.validate("quantize")
    ctx = ctx or Context()
    if is_quantized(model):
        raise ConfigError("this model is already quantized; quantize the float model it was made from instead")
    plan, tied, left_float = _plan(model, config)
    if config.target_bits is not None:
        from .mixed import assign_bits

        plan = assign_bits(model, plan, config, ctx)
    ppl_before = _ppl(model, config, ctx)
    quantized = QUANTIZATION_METHODS.get(config.method)(model, plan, ctx, config)

    bytes_before = sum(m.weight.numel() * m.weight.element_size() for _, m, _ in plan)
    numel = sum(m.weight.numel() for _, m, _ in plan)
    bytes_after = sum(q.nbytes() for q in quantized.values())
    linear_numel = sum(m.weight.numel() for _, m, _ in plan if not isinstance(m, nn.Embedding))
    linear_bytes = sum(quantized[n].nbytes() for n, m, _ in plan if not isinstance(m, nn.Embedding))
    errors = [_relative_error(m, quantized[n], fmt) for n, m, fmt in plan]
    specs = []
    for name, module, fmt in plan:
        if isinstance(module, nn.Embedding):
            new = QuantEmbedding.from_embedding(module, quantized[name], fmt)
        else:
            new = QuantLinear.from_linear(module, quantized[name], fmt)
        model.set_submodule(name, new)
        specs.append(module_spec(name, new))
    if tied:
        head, embedding = tied
        model.set_submodule(head, TiedQuantLinear(model.get_submodule(embedding)))
    ppl_after = _ppl(model, config, ctx) if ppl_before is not None else None

    artifact.lineage(model)["quantization"] = {
        "layout": LAYOUT,
        "method": config.method,
        "modules": specs,
        "tied_head": {"head": tied[0], "embedding": tied[1]} if tied else None,
    }
    metrics = {
        "weights_quantized": len(plan),
        "tied_head": tied is not None,
        "bits_per_weight": round(8 * bytes_after / max(numel, 1), 4),
        "linear_bits_per_weight": round(8 * linear_bytes / max(linear_numel, 1), 4),
        "weight_bytes_before": bytes_before,
        "weight_bytes_after": bytes_after,
        "stored_bytes": _stored_bytes(model),
        "weight_relative_error_mean": round(sum(errors) / max(len(errors), 1), 5),
    }
    if config.gguf:
        metrics["gguf_left_float"] = left_float
    if ppl_before is not None:
        metrics.update({"ppl_text": config.ppl_text, "ppl_before": round(ppl_before, 4), "ppl_after": round(ppl_after, 4), "ppl_change": round(ppl_after - ppl_before, 4)})
    artifact.record_stage(model, "quantize", settings=dataclasses.asdict(config), metrics=metrics)
    return model


__all__ = [
    "QUANTIZATION_METHODS", "QuantEmbedding", "QuantLinear", "QuantizeConfig", "TiedQuantLinear",
    "is_quantized", "load_packed", "quantize", "save_packed",
]
