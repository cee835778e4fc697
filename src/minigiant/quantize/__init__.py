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
from ..errors import ConfigError
from ..targets import matches, select_modules
from .formats import QUANTIZATION_METHODS, SUPPORTED_BITS, QuantizedWeight, WeightFormat, dequantize
from .modules import QuantEmbedding, QuantLinear, TiedQuantLinear
from .serialization import LAYOUT, is_quantized, load_quantized, module_spec, save_quantized


@dataclass
class QuantizeConfig:
    method: str = field("rtn", help="how weights are rounded: " + " | ".join(QUANTIZATION_METHODS.names()))
    bits: int = field(4, help="bits per weight of the linear layers: 8, 4 or 2")
    group_size: int = field(32, help="weights sharing one scale, along the input dimension; must divide it; -1 = one group per output row")
    symmetric: bool = field(False, help="true: a scale per group around zero; false: a scale and a uint8 zero point per group")
    embedding_bits: Optional[int] = field(8, help="bits of the input embedding (and of a head tied to it); null keeps them float")
    targets: str | list[str] = field("all-linear", help="linear layers to quantize: all-linear (an untied output head included), names like q_proj, or re:<regex>")
    ignore: list[str] = field([], help="modules to keep float (same forms as targets; wins over targets)")

    def validate(self, path: str) -> None:
        QUANTIZATION_METHODS.get(self.method)
        for name in ("bits", "embedding_bits"):
            value = getattr(self, name)
            if not (value in SUPPORTED_BITS or (name == "embedding_bits" and value is None)):
                raise ConfigError(f"{path}.{name}: must be one of {', '.join(map(str, SUPPORTED_BITS))} (codes packed into whole bytes), got {value!r}")
        if self.group_size != -1 and self.group_size < 1:
            raise ConfigError(f"{path}.group_size: must be a positive number of weights or -1 (one group per output row), got {self.group_size}")


def _format(name: str, module: nn.Module, bits: int, config: QuantizeConfig) -> WeightFormat:
    cols = module.weight.shape[1]
    group_size = cols if config.group_size == -1 else config.group_size
    if cols % group_size:
        raise ConfigError(f"quantize.group_size: {group_size} does not divide the {cols} input features of {name}; choose a divisor of {cols} or -1")
    if cols % (8 // bits):
        raise ConfigError(f"quantize: {name} has {cols} input features, which {bits}-bit codes cannot pack into whole bytes; add it to ignore")
    return WeightFormat(bits, group_size, config.symmetric)


def _plan(model: nn.Module, config: QuantizeConfig) -> tuple[list[tuple[str, nn.Module, WeightFormat]], tuple[str, str] | None]:
    """The weights to quantize with their formats, and ``(head, embedding)`` names when the head is tied."""
    names = {m: n for n, m in model.named_modules()}
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is embedding.weight
    plan = []
    if config.embedding_bits is not None and not matches(names[embedding], config.ignore):
        if type(embedding).forward is not nn.Embedding.forward:
            raise ConfigError(f"quantize: the embedding {names[embedding]} is a {type(embedding).__name__} with its own forward, which QuantEmbedding would drop; set embedding_bits: null")
        plan.append((names[embedding], embedding, _format(names[embedding], embedding, config.embedding_bits, config)))
    linears = select_modules(model, config.targets, config.ignore)
    if config.targets == "all-linear" and isinstance(head, nn.Linear) and not tied and not matches(names[head], config.ignore):
        linears.append((names[head], head))  # select_modules leaves the head out of all-linear; untied, it is one more linear
    seen = set()
    for name, module in linears:
        if (module is head and tied) or module in seen:
            continue  # a tied head follows the embedding (it is the same tensor)
        seen.add(module)
        plan.append((name, module, _format(name, module, config.bits, config)))
    tied_names = (names[head], names[embedding]) if tied and plan and plan[0][1] is embedding else None
    return plan, tied_names


def _relative_error(module: nn.Module, weight: QuantizedWeight, fmt: WeightFormat) -> float:
    original = module.weight.detach().float()
    return ((dequantize(weight, fmt, torch.float32) - original).norm() / original.norm().clamp(min=1e-12)).item()


@torch.no_grad()
def quantize(model, config: QuantizeConfig = QuantizeConfig(), ctx: Context | None = None):
    """Replace the chosen weights of ``model`` by packed quantized ones, in place, and record the stage."""
    config.validate("quantize")
    if is_quantized(model):
        raise ConfigError("this model is already quantized; quantize the float model it was made from instead")
    plan, tied = _plan(model, config)
    quantized = QUANTIZATION_METHODS.get(config.method)(model, plan, ctx or Context())

    bytes_before = sum(m.weight.numel() * m.weight.element_size() for _, m, _ in plan)
    numel = sum(m.weight.numel() for _, m, _ in plan)
    bytes_after = sum(q.nbytes() for q in quantized.values())
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

    artifact.lineage(model)["quantization"] = {
        "layout": LAYOUT,
        "method": config.method,
        "modules": specs,
        "tied_head": {"head": tied[0], "embedding": tied[1]} if tied else None,
    }
    artifact.record_stage(
        model,
        "quantize",
        settings=dataclasses.asdict(config),
        metrics={
            "weights_quantized": len(plan),
            "tied_head": tied is not None,
            "bits_per_weight": round(8 * bytes_after / max(numel, 1), 4),
            "weight_bytes_before": bytes_before,
            "weight_bytes_after": bytes_after,
            "weight_relative_error_mean": round(sum(errors) / max(len(errors), 1), 5),
        },
    )
    return model


__all__ = [
    "QUANTIZATION_METHODS", "QuantEmbedding", "QuantLinear", "QuantizeConfig", "TiedQuantLinear",
    "is_quantized", "load_quantized", "quantize", "save_quantized",
]
