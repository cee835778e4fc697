"""llama.cpp's legacy block layouts: ``pack_blocks`` writes given codes and scales (Q8_0, Q5_0, Q5_1, Q4_0, Q4_1;
the exporter uses it for GPTQ/AWQ codes planned on those grids), and Q8_0/Q5_0/Q4_0 with a searched scale.

Opt-in (``ExportConfig(rounding="search")``): measured on the distilled SmolLM2 student, less weight error
gave WORSE WikiText-2 perplexity than llama.cpp's absmax rounding (docs/export.md), so it is kept as a
measured alternative and a packer for other rounding rules, not as the default.

llama.cpp's reference quantizers (and the ``gguf`` package's copies of them) take each block's scale from its
largest magnitude: Q4_0 maps the extreme weight to -8 exactly, which wastes most of the grid on one outlier.
Here each block of 32 tries 32 grids whose end code lands between 0.6x and 1.15x the largest magnitude
(clipping an outlier to spend the grid on the rest, as llama.cpp's k-quant ``make_qx_quants`` does in a
narrower range), refits each scale by least squares on its codes, and keeps the grid with the least squared
error; the float16 scale it stores is then used to round every weight
to its nearest code. Same bytes per block, same decoder: llama.cpp runs these files unchanged.

Layouts (32 weights a block, ``d`` a float16 first): Q8_0 ``int8 qs[32]``, weight ``d * q``; Q4_0 16 bytes of
nibbles (byte ``j``: weight ``j`` low, ``j + 16`` high), weight ``d * (q - 8)``; Q5_0 a little-endian
``uint32`` of fifth bits (bit ``j`` for weight ``j``) then the Q4_0 nibbles, weight ``d * (q - 16)``; Q4_1 and
Q5_1 put a float16 ``m`` after ``d``, weight ``d * q + m``.

Each ``quantize_*`` returns ``(packed bytes [rows, bytes per row], reference dequantization [rows, cols])``,
like ``kquants``.
"""

from __future__ import annotations

import numpy as np

from .kquants import _fp16, _round

f32 = np.float32
QK = 32
STRETCHES = np.linspace(0.6, 1.15, 32, dtype=f32)  # a distilled SmolLM2 MLP weight, Q5_0: 12% less error than absmax, 3% less than 0.89-1.11


def _search_scale(x: np.ndarray, low: int, high: int, anchor: int) -> np.ndarray:
    """Per row of ``x`` [n, 32]: the float16 scale ``d`` (as float32) whose codes ``l`` in ``low..high`` give the
    least squared error, among llama.cpp's own grid (``peak / anchor``) and refitted stretched ones, each judged
    after float16 rounding and final rounding, so no block ends up worse than llama.cpp's."""
    idx = np.abs(x).argmax(axis=1)
    peak = x[np.arange(x.shape[0]), idx]
    zero = peak == 0
    peak = np.where(zero, f32(1), peak)

    def error(d):
        safe = np.where(d == 0, f32(1), d)
        q = np.clip(_round(x / safe[:, None]), low, high).astype(f32)
        return ((x - d[:, None] * q) ** 2).sum(axis=1, dtype=f32)

    best_scale = _fp16(peak / f32(anchor))
    best_err = error(best_scale)
    for stretch in STRETCHES:
        iscale = f32(anchor) * stretch / peak
        q = np.clip(_round(iscale[:, None] * x), low, high).astype(f32)
        sum_lx, sum_l2 = (q * x).sum(axis=1, dtype=f32), (q * q).sum(axis=1, dtype=f32)
        scale = _fp16(np.where(sum_l2 > 0, sum_lx / np.where(sum_l2 > 0, sum_l2, f32(1)), f32(0)))
        err = error(scale)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
    return np.where(zero, f32(0), best_scale).astype(f32)


def _codes(weight: np.ndarray, low: int, high: int, anchor: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(blocks [n, 32], d as stored (float32 of a float16) [n], signed codes int [n, 32])``."""
    rows, cols = weight.shape
    if cols % QK:
        raise ValueError(f"32-weight block types need rows of a multiple of {QK} weights, got {cols}")
    x = np.ascontiguousarray(weight, dtype=f32).reshape(-1, QK)
    d = _search_scale(x, low, high, anchor)
    safe = np.where(d == 0, f32(1), d)
    q = np.clip(_round(x / safe[:, None]), low, high)
    return x, d, np.where(d[:, None] == 0, 0, q)


def _finish(d: np.ndarray, body: np.ndarray, q: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = shape
    packed = np.concatenate([_half(d), body], axis=1)
    reference = (d[:, None] * q.astype(f32)).astype(f32)
    return packed.reshape(rows, -1), reference.reshape(rows, cols)


def _half(x: np.ndarray) -> np.ndarray:
    """float16 bytes ``[n, 2]`` of ``x`` ``[n]``."""
    return x.astype(np.float16).view(np.uint8).reshape(-1, 2)


def _nibbles(u: np.ndarray) -> np.ndarray:
    return ((u[:, :16] & 0xF) | ((u[:, 16:] & 0xF) << 4)).astype(np.uint8)


def _fifth_bits(u: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1's ``qh``: bit ``j`` of a little-endian uint32 is bit 4 of code ``j``."""
    high = ((u.astype(np.uint32) >> 4) << np.arange(QK, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)
    return high.astype("<u4").view(np.uint8).reshape(-1, 4)


def pack_blocks(kind: str, codes: np.ndarray, d: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
    """GGUF blocks of ``kind`` (Q8_0, Q5_0, Q5_1, Q4_0, Q4_1) from unsigned codes ``[n, 32]`` as llama.cpp
    stores them (Q8_0: ``q + 128``, Q4_0: ``q + 8``, Q5_0: ``q + 16``; Q4_1/Q5_1 weight ``d * code + m``),
    their scales ``d`` ``[n]`` and, for the ``_1`` types, mins ``m`` ``[n]``: ``uint8 [n, bytes per block]``."""
    u = codes.astype(np.uint8)
    if kind == "Q8_0":
        return np.concatenate([_half(d), (u.astype(np.int16) - 128).astype(np.int8).view(np.uint8)], axis=1)
    head = [_half(d)] if kind in ("Q4_0", "Q5_0") else [_half(d), _half(m)]
    if kind in ("Q5_0", "Q5_1"):
        head.append(_fifth_bits(u))
    return np.concatenate([*head, _nibbles(u)], axis=1)


def quantize_q8_0(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    _, d, q = _codes(weight, -127, 127, 127)
    return _finish(d, q.astype(np.int8).view(np.uint8), q, weight.shape)


def quantize_q4_0(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    _, d, q = _codes(weight, -8, 7, -8)
    return _finish(d, _nibbles((q + 8).astype(np.uint8)), q, weight.shape)


def quantize_q5_0(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    _, d, q = _codes(weight, -16, 15, -16)
    u = (q + 16).astype(np.uint8)
    return _finish(d, np.concatenate([_fifth_bits(u), _nibbles(u)], axis=1), q, weight.shape)


SEARCHED = {"Q8_0": quantize_q8_0, "Q5_0": quantize_q5_0, "Q4_0": quantize_q4_0}
