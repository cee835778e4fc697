"""Weight formats as data: per-group integer codes (or codebook indices) packed into bytes, and
round-to-nearest (RTN) to make them.

A ``[rows, cols]`` weight is cut into groups of ``group_size`` consecutive columns. Each group has a scale
(``scale_dtype``, float16 by default) and reads back as:

- symmetric: ``(code - 2**(bits-1)) * scale`` (no stored zero). ``full_range`` picks the grid: false uses
  the codes ``±(2**(bits-1) - 1)`` around the middle (4-bit: -7..7, 2-bit: -1..1 = ternary); true uses
  all of them, ``-2**(bits-1)..2**(bits-1)-1``, with a signed scale (llama.cpp's Q4_0/Q5_0);
- asymmetric, ``zero_point: integer``: ``(code - zero) * scale`` with a uint8 zero point (GPTQ's grid);
- asymmetric, ``zero_point: float``: ``code * scale + min`` with a ``scale_dtype`` min (llama.cpp's Q4_1/Q5_1);
- ``codebook: group | tensor``: ``codebook[code]``, a float16 table of ``2**bits`` values per group (or
  one for the whole tensor); no scales (k-means).

Codes are packed along each row as a little-endian bit stream, the first code in the lowest bits: eight
codes fill exactly ``bits`` bytes, so 3-, 5- and 6-bit codes straddle byte boundaries and cost exactly
``bits`` per weight (rows must have a multiple of 8 columns, or of ``8 // bits`` for 1/2/4/8 bits). For 2, 4
and 8 bits this is the byte layout of ``minigiant-packed/1`` from before odd widths existed (4-bit: byte
``j`` holds column ``2j`` in bits 0-3 and ``2j + 1`` in bits 4-7). Rows stay separate so an embedding can
unpack only the rows it looks up.

Methods register in ``QUANTIZATION_METHODS``: ``method(model, targets, ctx, config) -> {name: QuantizedWeight}``
where ``targets`` is a list of ``(module name, module, WeightFormat)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch

from ..errors import ConfigError, did_you_mean
from ..progress import progress
from ..registry import Registry

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 8)

QUANTIZATION_METHODS: Registry[Callable] = Registry("quantization method")
# method name → check(config, path) raising ConfigError for settings the method cannot use (filled next to
# each method; a method without an entry takes any format).
METHOD_FORMATS: dict[str, Callable] = {}

_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class WeightFormat:
    bits: int
    group_size: int  # columns per scale; always divides the weight's column count (-1 is resolved before)
    symmetric: bool
    zero_point: str = "integer"  # asymmetric only: "integer" (uint8 code) or "float" (a stored min)
    full_range: bool = False  # symmetric only: use code -2**(bits-1) too, with a signed scale (GGUF Q4_0)
    scale_dtype: str = "float16"
    codebook: Optional[str] = None  # None, "group" or "tensor": codes index a table of 2**bits values

    def check(self, where: str = "quantize") -> None:
        """ConfigError for combinations that do not exist."""
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"{where}.bits: must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {self.bits!r}")
        if self.zero_point not in ("integer", "float"):
            raise ConfigError(f"{where}.zero_point: must be integer or float, got {self.zero_point!r}")
        if self.scale_dtype not in _SCALE_DTYPES:
            raise ConfigError(f"{where}.scale_dtype: must be one of {', '.join(_SCALE_DTYPES)}, got {self.scale_dtype!r}")
        if self.codebook not in (None, "group", "tensor"):
            raise ConfigError(f"{where}.codebook: must be null, group or tensor, got {self.codebook!r}")
        if self.symmetric and self.zero_point == "float":
            raise ConfigError(f"{where}: a symmetric grid has no zero point, so zero_point: float needs symmetric: false")
        if not self.symmetric and self.full_range:
            raise ConfigError(f"{where}: full_range applies to symmetric grids; an asymmetric grid already uses every code")
        if self.symmetric and self.bits == 1 and not self.full_range:
            raise ConfigError(f"{where}: a 1-bit symmetric grid without full_range has only the value 0; use symmetric: false (binary) or more bits")
        if self.codebook and self.bits > 4:
            raise ConfigError(f"{where}: codebooks take 1-4-bit indices (a table of 2**bits values), got bits {self.bits}")

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return _SCALE_DTYPES[self.scale_dtype]

    def storage_bits(self, rows: int = 1) -> float:
        """Bits per weight on disk, scales and zero points included (4-bit, group 128, asymmetric: 4.1875)."""
        if self.codebook == "tensor":
            return self.bits + 16 * 2**self.bits / (rows * self.group_size)  # upper bound: rows=1
        if self.codebook == "group":
            return self.bits + 16 * 2**self.bits / self.group_size
        scale_bits = torch.finfo(self.torch_scale_dtype).bits
        zero_bits = 0 if self.symmetric else (8 if self.zero_point == "integer" else scale_bits)
        return self.bits + (scale_bits + zero_bits) / self.group_size


# llama.cpp's legacy block types as formats; the k-quants (Q4_K, Q6_K) have two-level scales and are packed
# by the GGUF exporter. Q8_0 rounds with d = amax / 127 (codes -127..127), Q4_0/Q5_0 with d = max / -8 (-16),
# the signed extreme landing on the lowest code; Q4_1/Q5_1 store d and the group minimum.
FORMAT_PRESETS: dict[str, WeightFormat] = {
    "q8_0": WeightFormat(8, 32, True),
    "q5_0": WeightFormat(5, 32, True, full_range=True),
    "q5_1": WeightFormat(5, 32, False, zero_point="float"),
    "q4_0": WeightFormat(4, 32, True, full_range=True),
    "q4_1": WeightFormat(4, 32, False, zero_point="float"),
}


def preset(name: str, where: str = "quantize.format") -> WeightFormat:
    if name not in FORMAT_PRESETS:
        raise ConfigError(f"{where}: unknown format {name!r}; {did_you_mean(name, FORMAT_PRESETS)}choose one of: {', '.join(FORMAT_PRESETS)} (or leave it null and set bits/group_size/symmetric)")
    return FORMAT_PRESETS[name]


class QuantizedWeight(NamedTuple):
    qweight: torch.Tensor  # uint8 [rows, cols * bits // 8]: packed codes
    scales: torch.Tensor | None  # scale_dtype [rows, cols // group_size]; None for codebooks
    zeros: torch.Tensor | None  # uint8 zero points or scale_dtype mins [rows, groups]; None when symmetric
    codebook: torch.Tensor | None = None  # float16 [rows, groups, 2**bits] or [1, 1, 2**bits]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self if t is not None)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[rows, cols]``, each below ``2 ** bits`` → uint8 ``[rows, cols * bits // 8]``."""
    if bits == 8:
        return codes.contiguous()
    if 8 % bits == 0:
        per_byte = 8 // bits
        grouped = codes.reshape(codes.shape[0], -1, per_byte)
        packed = grouped[..., 0].clone()
        for k in range(1, per_byte):
            packed |= grouped[..., k] << (bits * k)
        return packed
    # Odd widths: 8 codes → one integer of 8 * bits ≤ 48 bits → ``bits`` little-endian bytes.
    grouped = codes.reshape(codes.shape[0], -1, 8).to(torch.int64)
    value = grouped[..., 0].clone()
    for k in range(1, 8):
        value |= grouped[..., k] << (bits * k)
    return torch.stack([(value >> (8 * j)) & 255 for j in range(bits)], dim=-1).to(torch.uint8).reshape(codes.shape[0], -1)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack``: uint8 ``[rows, bytes]`` → uint8 codes ``[rows, bytes * 8 // bits]``."""
    if bits == 8:
        return packed
    mask = 2**bits - 1
    if 8 % bits == 0:
        # One shift by a plain int per code slot: several times faster on CPU than broadcasting a shift tensor.
        codes = torch.stack([(packed >> (bits * k)) & mask for k in range(8 // bits)], dim=-1)
        return codes.reshape(packed.shape[0], -1)
    grouped = packed.reshape(packed.shape[0], -1, bits).to(torch.int64)
    value = grouped[..., 0].clone()
    for j in range(1, bits):
        value |= grouped[..., j] << (8 * j)
    codes = torch.stack([(value >> (bits * k)) & mask for k in range(8)], dim=-1)
    return codes.to(torch.uint8).reshape(packed.shape[0], -1)


def offset_form(weight: QuantizedWeight, fmt: WeightFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``(scale, base)`` per group with ``w = code * scale + base`` (non-codebook formats)."""
    scale = weight.scales.float()
    if fmt.symmetric:
        return scale, -(2 ** (fmt.bits - 1)) * scale
    if fmt.zero_point == "integer":
        return scale, -weight.zeros.float() * scale
    return scale, weight.zeros.float()


def dequantize(weight: QuantizedWeight, fmt: WeightFormat, dtype: torch.dtype) -> torch.Tensor:
    """Float ``[rows, cols]`` in ``dtype``. Codes and zero points are small integers, exact in any float
    dtype, so for integer grids the only rounding is the one multiply by the scale."""
    codes = unpack(weight.qweight, fmt.bits)
    rows, cols = codes.shape
    groups = cols // fmt.group_size
    if fmt.codebook:
        table = weight.codebook.to(dtype).expand(rows, groups, -1)
        return table.gather(-1, codes.reshape(rows, groups, fmt.group_size).long()).reshape(rows, cols)
    w = codes.reshape(rows, groups, fmt.group_size).to(dtype)
    scale = weight.scales.to(dtype).unsqueeze(-1)
    if not fmt.symmetric and fmt.zero_point == "float":
        return w.mul_(scale).add_(weight.zeros.to(dtype).unsqueeze(-1)).reshape(rows, cols)
    zero = 2 ** (fmt.bits - 1) if weight.zeros is None else weight.zeros.to(dtype).unsqueeze(-1)
    # In place: each fresh weight-sized tensor costs page faults.
    return w.sub_(zero).mul_(scale).reshape(rows, cols)


def _stored(values: torch.Tensor, dtype: torch.dtype, nonzero: bool = False) -> torch.Tensor:
    """``values`` rounded to the storage dtype (as float32). ``nonzero``: an all-zero group would divide by
    zero; the smallest normal number keeps its codes at the zero point."""
    info = torch.finfo(dtype)
    if nonzero:
        magnitude = values.abs().clamp(min=info.tiny, max=info.max)
        values = torch.where(values < 0, -magnitude, magnitude)
    return values.to(dtype).float()


def grid(w: torch.Tensor, fmt: WeightFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest grid of each group of ``w`` ``[..., group_size]``: float32 ``(scale, zero)`` of shape
    ``[..., 1]``, already rounded to what is stored, such that ``encode``/``decode`` below use them. For
    symmetric and integer grids ``zero`` is the zero point (a code); for ``zero_point: float`` it is the min."""
    dtype = fmt.torch_scale_dtype
    maxq = 2**fmt.bits - 1
    if fmt.symmetric:
        mid = 2 ** (fmt.bits - 1)
        if fmt.full_range:
            # llama.cpp: the value of largest magnitude, with its sign, maps to the lowest code -mid.
            index = w.abs().argmax(-1, keepdim=True)
            scale = _stored(w.gather(-1, index) / -mid, dtype, nonzero=True)
        else:
            scale = _stored(w.abs().amax(-1, keepdim=True) / (mid - 1), dtype, nonzero=True)
        return scale, torch.full_like(scale, mid)
    if fmt.zero_point == "float":
        low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        low = _stored(low, dtype)
        return _stored((high - low) / maxq, dtype, nonzero=True), low
    # The grid spans [min, max] stretched to include 0 (as in GPTQ), so the zero point is a valid code
    # and a weight of exactly 0 stays exactly 0.
    low, high = w.amin(-1, keepdim=True).clamp(max=0), w.amax(-1, keepdim=True).clamp(min=0)
    scale = _stored((high - low) / maxq, dtype, nonzero=True)
    return scale, (-low / scale).round().clamp(0, maxq)


def encode(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """Nearest codes (float, integral values) of ``w`` on the grid ``(scale, zero)``."""
    maxq = 2**fmt.bits - 1
    if fmt.symmetric:
        mid = 2 ** (fmt.bits - 1)
        low, high = (0, maxq) if fmt.full_range else (1, maxq)
        return ((w / scale).round() + mid).clamp(low, high)
    if fmt.zero_point == "float":
        return ((w - zero) / scale).round().clamp(0, maxq)
    return ((w / scale).round() + zero).clamp(0, maxq)


def decode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    if not fmt.symmetric and fmt.zero_point == "float":
        return codes * scale + zero
    return (codes - zero) * scale


def assemble(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: WeightFormat) -> QuantizedWeight:
    """Stored tensors from codes ``[rows, cols]`` and per-group ``scale``/``zero`` ``[rows, groups(, 1)]``."""
    rows = codes.shape[0]
    scale, zero = scale.reshape(rows, -1), zero.reshape(rows, -1)
    dtype = fmt.torch_scale_dtype
    if fmt.symmetric:
        zeros = None
    elif fmt.zero_point == "integer":
        zeros = zero.to(torch.uint8)
    else:
        zeros = zero.to(dtype)
    return QuantizedWeight(pack(codes.to(torch.uint8), fmt.bits), scale.to(dtype).contiguous(), zeros)


def quantize_rtn(weight: torch.Tensor, fmt: WeightFormat) -> QuantizedWeight:
    """Round each weight to the nearest code of its group's grid. The grid is built from the scale as
    stored, so dequantizing reproduces exactly the values chosen here."""
    if fmt.codebook:
        from .kmeans import quantize_kmeans

        return quantize_kmeans(weight, fmt)
    rows, cols = weight.shape
    w = weight.detach().float().reshape(rows, cols // fmt.group_size, fmt.group_size)
    scale, zero = grid(w, fmt)
    codes = encode(w, scale, zero, fmt)
    return assemble(codes.reshape(rows, cols), scale, zero, fmt)


@QUANTIZATION_METHODS.register("rtn")
@torch.no_grad()
def rtn(model, targets: list[tuple[str, torch.nn.Module, WeightFormat]], ctx=None, config=None) -> dict[str, QuantizedWeight]:
    """Round-to-nearest, each weight on its own; needs no calibration data."""
    out = {}
    with progress(transient=True) as bar:
        task = bar.add_task("quantize: rtn", total=len(targets), info="")
        for name, module, fmt in targets:
            out[name] = quantize_rtn(module.weight, fmt)
            bar.advance(task)
    return out
