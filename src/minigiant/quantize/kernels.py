"""Running packed weights fast on a CPU: the runtime layout a QuantLinear converts its stored codes into.

The stored format (``formats.py``) is what goes on disk and never changes; at the first forward a module
builds one of these runtimes from it and keeps it beside the buffers (not in the state dict):

- ``int4pack``: 2-, 3- and 4-bit codes, groups of 32/64/128/256 → PyTorch's CPU kernel
  ``aten._weight_int4pack_mm_for_cpu``. Its weight is ``(q - 8) * scale + zero`` with a float ``zero`` per
  group, so our ``(code - zero_point) * scale`` maps exactly onto it with ``zero = (8 - zero_point) * scale``.
  A 2- or 3-bit code is a 4-bit code below 4 or 8, so those grids run the same kernel: in memory they take 4
  bits a weight (on disk still 2 or 3), and they decode at int4's speed instead of the float model's.
- ``int8pack``: 8-bit codes, one group per row (per-channel) → ``aten._weight_int8pack_mm`` (int8 weight,
  one scale per row, no zero point: an asymmetric row's zero point becomes a rank-one correction
  ``- sum(x) * (zero_point - 128) * scale``).
- ``int8dynamic``: 8-bit per-channel codes → fbgemm's dynamic int8 linear (``quantized::linear_dynamic``),
  the CPU path of PyTorch's dynamic quantization: each call quantizes its activations to 7-bit integers
  (one scale and zero point per call, i.e. per token in decode; 7 bits so that AVX2's 16-bit pair sums
  cannot saturate) and multiplies int8 by int8 with int32 accumulation. It changes the numerics, so ``auto``
  never picks it; ``runtime("int8dynamic")`` opts in. Measured on AVX2 (BENCHMARKS.md): fbgemm runs the
  tied head 2x faster than int8pack (2.3 vs 4.8 ms a token), a few percent of a decode step, while its
  7-bit activations cost 2-3 decode-path perplexity points (2-3%) whenever the head runs on it, and on the
  small decoder linears its per-call activation quantization costs more than it saves.
- ``int8hilo``: 8-bit codes in groups of 32..256 (no kernel takes grouped int8): a code is ``16 * hi + lo``,
  so the layer is two int4pack matmuls, ``hi`` with scale ``16 * scale`` and ``lo`` with ``scale``.
- ``cached``: anything else (1/5/6-bit, codebooks, groups the kernels do not take): the weight is
  dequantized once into a float buffer and reused; speed of float, memory of float plus the packed codes.
- ``per-call``: dequantize on every forward (the old behaviour; memory of the packed codes only).

The kernels are fast for bfloat16 activations only (their float32 paths were 10-40x slower than a float32
matmul when measured), so the kernel runtimes compute in bfloat16 (float32 accumulation inside the kernel)
and return the input's dtype. Scales and zeros are rounded to bfloat16 too: the weights they produce differ
from the reference dequantization by at most ``2**-8`` of a group's range (tested against it).
Prefill (more than ``KERNEL_MAX_ROWS`` rows) dequantizes per call in the input's dtype: a 1,024-token
matmul amortises the dequantization, and float32 prefill keeps perplexity numbers at reference precision.

``runtime("per-call")`` (a context manager) forces one kind, for measurements and tests.
"""

from __future__ import annotations

import contextlib
import threading
import warnings

import torch
import torch.nn.functional as F


KERNEL_GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts
KERNEL_MAX_ROWS = 16  # above this many rows (prefill) a per-call float matmul is used
COMPUTE_DTYPE = torch.bfloat16
RUNTIMES = ("auto", "int4pack", "int8pack", "int8dynamic", "int8hilo", "cached", "per-call")

_forced = threading.local()


@contextlib.contextmanager
def runtime(kind: str):
    """Force every QuantLinear in this thread to run ``kind`` (one of ``RUNTIMES``) inside the block; a kernel
    kind that does not fit a module falls back to ``cached`` for it."""
    if kind not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {kind!r}")
    previous = getattr(_forced, "kind", "auto")
    _forced.kind = kind
    try:
        yield
    finally:
        _forced.kind = previous


def forced_kind() -> str:
    return getattr(_forced, "kind", "auto")


def _has_kernels() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(torch.ops.aten, "_weight_int8pack_mm")


def _has_fbgemm() -> bool:
    return hasattr(torch.ops.quantized, "linear_dynamic") and "x86" in torch.backends.quantized.supported_engines


def fits(kind: str, module) -> bool:
    """Whether the kernel runtime ``kind`` can run the module's stored format on its device."""
    fmt = module.format
    if module.qweight.device.type != "cpu" or not _has_kernels() or getattr(module, "codebook", None) is not None:
        return False
    if kind == "int4pack":  # a 2- or 3-bit code is a 4-bit code that leaves the top values unused
        return 2 <= fmt.bits <= 4 and module.group_size in KERNEL_GROUP_SIZES
    if kind == "int8pack":
        return fmt.bits == 8 and module.group_size == module.cols
    if kind == "int8dynamic":
        return (fmt.bits == 8 and module.group_size == module.cols and (fmt.symmetric or fmt.zero_point == "integer")
                and not fmt.full_range and _has_fbgemm() and bool((module.scales >= 0).all()))
    if kind == "int8hilo":
        return fmt.bits == 8 and module.group_size in KERNEL_GROUP_SIZES
    return False


def best_kind(module) -> str:
    """The fastest weight-only runtime that fits the module's stored format on its device: ``auto`` computes
    what the stored weights say (up to bf16 activations), so the perplexity the quantize stage reports is
    what decoding gets. int8dynamic (7-bit activations) is opt-in: see the module doc."""
    return next((kind for kind in ("int4pack", "int8pack", "int8hilo") if fits(kind, module)), "cached")


def _codes_and_offsets(module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int32 codes ``[rows, cols]`` and float32 ``(scale, base)`` ``[rows, groups]``: ``w = code * scale + base``."""
    from .formats import offset_form, unpack

    scale, base = offset_form(module.packed(), module.format)
    return unpack(module.qweight, module.format.bits).to(torch.int32), scale, base


def _int4pack(codes: torch.Tensor, scales: torch.Tensor, zero_floats: torch.Tensor):
    """Kernel layout: packed codes and ``[groups, rows, 2]`` (scale, zero) in the compute dtype."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
    scale_and_zero = torch.stack([scales, zero_floats], dim=-1).transpose(0, 1).contiguous().to(COMPUTE_DTYPE)
    return packed, scale_and_zero


class Int4Pack:
    """``y = x @ W.T`` with 4-bit grouped codes through ``_weight_int4pack_mm_for_cpu``."""

    def __init__(self, module):
        codes, scales, base = _codes_and_offsets(module)
        self.group_size = module.group_size
        # 2- and 3-bit codes sit in the middle of the kernel's 0..15, so its bf16 zero (the weight at q = 8) stays
        # inside the group's range and rounds as finely as for 4 bits
        shift = 8 - 2 ** (module.format.bits - 1)
        self.parts = [_int4pack(codes + shift, scales, (8 - shift) * scales + base)]

    def matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        x = x2d.to(COMPUTE_DTYPE)
        out = None
        for packed, scale_and_zero in self.parts:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, self.group_size, scale_and_zero)
            out = y if out is None else out.add_(y)
        return out


class Int8HiLo(Int4Pack):
    """8-bit grouped codes as two 4-bit halves: ``code s + b = 16 s (hi - 8) + (136 s + b) + s (lo - 8)``."""

    def __init__(self, module):
        codes, scales, base = _codes_and_offsets(module)
        self.group_size = module.group_size
        self.parts = [
            _int4pack(codes >> 4, 16 * scales, 136 * scales + base),
            _int4pack(codes & 15, scales, torch.zeros_like(scales)),
        ]


def _int8_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes → int8 ``code - 128`` (flipping the top bit is that subtraction in two's complement), with no
    wider intermediate: for the tied head a 32-bit copy alone would be 113 MB."""
    return (codes ^ 0x80).view(torch.int8)


class Int8Pack:
    """8-bit per-channel codes through ``_weight_int8pack_mm`` (plus a rank-one term for zero points)."""

    def __init__(self, module):
        from .formats import offset_form

        scales, base = offset_form(module.packed(), module.format)  # one group per row: [rows, 1]
        scales, base = scales[:, 0], base[:, 0]
        self.weight = _int8_codes(module.qweight).contiguous()
        self.scales = scales.to(COMPUTE_DTYPE)
        offset = -(128 * scales + base)  # weight = (code - 128) * s - offset
        self.offset = offset if bool(offset.any()) else None

    def matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x2d.to(COMPUTE_DTYPE), self.weight, self.scales)
        if self.offset is not None:
            y = y.float() - x2d.float().sum(-1, keepdim=True) * self.offset
        return y


class Int8Dynamic:
    """8-bit per-channel codes through fbgemm's ``quantized::linear_dynamic`` (activations quantized per call)."""

    def __init__(self, module):
        weight = module.packed()
        # fbgemm's weight is (q - z) * s with q and z int8: our (code - zero_point) * scale, shifted by 128.
        rows = weight.qweight.shape[0]
        zero = torch.full((rows,), 128) if module.format.symmetric else weight.zeros[:, 0].long()
        scales = weight.scales[:, 0].double()
        q = _int8_codes(weight.qweight)
        dead = scales == 0  # an all-zero row has scale 0, which fbgemm refuses: any scale gives it zeros
        if bool(dead.any()):
            q[dead] = (zero[dead] - 128).to(torch.int8)[:, None]
            scales = torch.where(dead, 1.0, scales)
        with warnings.catch_warnings():  # torch 2.13 marks quantized tensor creation deprecated; it still works
            warnings.simplefilter("ignore")
            qweight = torch._make_per_channel_quantized_tensor(q, scales, zero - 128, 0)
            self.packed = torch.ops.quantized.linear_prepack(qweight, None)

    def matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x2d.float().contiguous(), self.packed, True)  # reduce_range: 7-bit activations


class Cached:
    """The weight dequantized once, per dtype asked for."""

    def __init__(self, module):
        self.module = module
        self.weights: dict[torch.dtype, torch.Tensor] = {}

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self.weights:
            self.weights = {dtype: self.module.dequantize(dtype)}  # one dtype at a time: memory of one copy
        return self.weights[dtype]


KERNELS = {"int4pack": Int4Pack, "int8pack": Int8Pack, "int8dynamic": Int8Dynamic, "int8hilo": Int8HiLo}


class Runner:
    """Chooses and holds a module's runtime layouts; rebuilt when the module's buffers are replaced."""

    def __init__(self, module):
        self.key = self._key(module)
        self.layouts: dict[str, object] = {}
        self.best = best_kind(module)  # chosen once per set of buffers, not on every forward

    @staticmethod
    def _key(module):
        return tuple(None if t is None else (t.data_ptr(), t.dtype, t.device) for t in module.packed())

    def valid_for(self, module) -> bool:
        return self.key == self._key(module)

    def layout(self, kind: str, module):
        if kind not in self.layouts:
            self.layouts[kind] = KERNELS[kind](module) if kind in KERNELS else Cached(module)
        return self.layouts[kind]

    def linear(self, module, x: torch.Tensor, weight_fn, bias: torch.Tensor | None) -> torch.Tensor:
        """``weight_fn(dtype)`` dequantizes the full weight (per-call path)."""
        kind = forced_kind()
        if kind == "auto":
            kind = self.best if x.numel() // x.shape[-1] <= KERNEL_MAX_ROWS else "per-call"
        elif kind in KERNELS and not fits(kind, module):
            kind = "cached"
        if kind == "per-call":
            return F.linear(x, weight_fn(x.dtype), bias)
        if kind == "cached":
            return F.linear(x, self.layout("cached", module).weight(x.dtype), bias)
        x2d = x.reshape(-1, x.shape[-1])
        y = self.layout(kind, module).matmul(x2d).to(x.dtype).reshape(*x.shape[:-1], -1)
        return y if bias is None else y.add_(bias)
