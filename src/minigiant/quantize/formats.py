"""Weight formats: per-group integer codes packed into bytes, and round-to-nearest (RTN) to make them.

A ``[rows, cols]`` weight is cut into groups of ``group_size`` consecutive columns. Each group has a
float16 scale and, when asymmetric, a uint8 zero point; a weight is stored as an unsigned ``bits``-bit
code and read back as ``(code - zero) * scale``. Symmetric groups have no stored zero point: it is
``2 ** (bits - 1)``, the middle code. Codes are packed along each row, ``8 // bits`` to a byte, the first
code in the low bits (4-bit: byte ``j`` holds column ``2j`` in bits 0-3 and ``2j + 1`` in bits 4-7). Rows
stay separate so an embedding can unpack only the rows it looks up.

Methods register in ``QUANTIZATION_METHODS``: ``method(model, targets, ctx) -> {name: QuantizedWeight}``
where ``targets`` is a list of ``(module name, module, WeightFormat)``. RTN looks at each weight alone;
GPTQ or AWQ would run calibration text through ``model`` first (``ctx`` has the tokenizer), so they get the
whole model rather than one tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from ..progress import progress
from ..registry import Registry

SUPPORTED_BITS = (2, 4, 8)  # whole codes per byte; 3-bit codes would straddle bytes

QUANTIZATION_METHODS: Registry[Callable] = Registry("quantization method")


@dataclass(frozen=True)
class WeightFormat:
    bits: int
    group_size: int  # columns per scale; always divides the weight's column count (-1 is resolved before)
    symmetric: bool

    def storage_bits(self) -> float:
        """Bits per weight on disk, scales and zero points included (4-bit, group 128, asymmetric: 4.1875)."""
        return self.bits + (16 + (0 if self.symmetric else 8)) / self.group_size


class QuantizedWeight(NamedTuple):
    qweight: torch.Tensor  # uint8 [rows, cols * bits // 8]: packed codes
    scales: torch.Tensor  # float16 [rows, cols // group_size]
    zeros: torch.Tensor | None  # uint8 [rows, cols // group_size]; None when symmetric

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self if t is not None)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[rows, cols]``, each below ``2 ** bits`` → uint8 ``[rows, cols * bits // 8]``."""
    if bits == 8:
        return codes.contiguous()
    per_byte = 8 // bits
    grouped = codes.reshape(codes.shape[0], -1, per_byte)
    packed = grouped[..., 0].clone()
    for k in range(1, per_byte):
        packed |= grouped[..., k] << (bits * k)
    return packed


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack``: uint8 ``[rows, bytes]`` → uint8 codes ``[rows, bytes * 8 // bits]``."""
    if bits == 8:
        return packed
    mask = 2**bits - 1
    # One shift by a plain int per code slot: several times faster on CPU than broadcasting a shift tensor.
    codes = torch.stack([(packed >> (bits * k)) & mask for k in range(8 // bits)], dim=-1)
    return codes.reshape(packed.shape[0], -1)


def dequantize(weight: QuantizedWeight, fmt: WeightFormat, dtype: torch.dtype) -> torch.Tensor:
    """Float ``[rows, cols]`` in ``dtype``. Codes and zero points are small integers, exact in any float
    dtype, so the only rounding is the one multiply by the scale."""
    codes = unpack(weight.qweight, fmt.bits)
    rows, cols = codes.shape
    w = codes.reshape(rows, cols // fmt.group_size, fmt.group_size).to(dtype)
    zero = 2 ** (fmt.bits - 1) if weight.zeros is None else weight.zeros.to(dtype).unsqueeze(-1)
    # In place: this runs on every forward, and each fresh weight-sized tensor costs page faults.
    return w.sub_(zero).mul_(weight.scales.to(dtype).unsqueeze(-1)).reshape(rows, cols)


def _fp16_scales(scales: torch.Tensor) -> torch.Tensor:
    # An all-zero group would divide by zero; the smallest normal float16 keeps its codes at the zero point.
    info = torch.finfo(torch.float16)
    return scales.clamp(min=info.tiny, max=info.max).to(torch.float16)


def quantize_rtn(weight: torch.Tensor, fmt: WeightFormat) -> QuantizedWeight:
    """Round each weight to the nearest code of its group's grid. The grid is built from the float16 scale
    as stored, so dequantizing reproduces exactly the values chosen here."""
    rows, cols = weight.shape
    w = weight.detach().float().reshape(rows, cols // fmt.group_size, fmt.group_size)
    if fmt.symmetric:
        qmax = 2 ** (fmt.bits - 1) - 1  # 4-bit: steps -7..7 around the middle code 8; code 0 is unused
        scales = _fp16_scales(w.abs().amax(-1) / qmax)
        steps = (w / scales.float().unsqueeze(-1)).round().clamp(-qmax - 1, qmax)
        codes, zeros = steps + (qmax + 1), None
    else:
        # The grid spans [min, max] stretched to include 0 (as in GPTQ), so the zero point is a valid code
        # and a weight of exactly 0 stays exactly 0.
        maxq = 2**fmt.bits - 1
        low, high = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        scales = _fp16_scales((high - low) / maxq)
        zeros = (-low / scales.float()).round().clamp(0, maxq)
        codes = ((w / scales.float().unsqueeze(-1)).round() + zeros.unsqueeze(-1)).clamp(0, maxq)
        zeros = zeros.to(torch.uint8)
    return QuantizedWeight(pack(codes.to(torch.uint8).reshape(rows, cols), fmt.bits), scales, zeros)


@QUANTIZATION_METHODS.register("rtn")
@torch.no_grad()
def rtn(model, targets: list[tuple[str, torch.nn.Module, WeightFormat]], ctx=None) -> dict[str, QuantizedWeight]:
    """Round-to-nearest, each weight on its own; needs no calibration data."""
    out = {}
    with progress(transient=True) as bar:
        task = bar.add_task("quantize: rtn", total=len(targets), info="")
        for name, module, fmt in targets:
            out[name] = quantize_rtn(module.weight, fmt)
            bar.advance(task)
    return out
