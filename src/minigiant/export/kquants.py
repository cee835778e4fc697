"""Q4_K and Q6_K packing in llama.cpp's exact block layout, in numpy (the ``gguf`` package only reads them).

Both use super-blocks of 256 weights (``QK_K``) along a row.

Q4_K, 144 bytes: ``d`` (float16), ``dmin`` (float16), 12 bytes holding eight 6-bit scales and eight 6-bit
mins, 128 bytes of 4-bit codes. A super-block is 8 sub-blocks of 32; weight ``i`` of sub-block ``j`` is
``d * sc[j] * q - dmin * m[j]``. Codes: each 64 weights take 32 bytes, the first 32 in the low nibbles and the
next 32 in the high nibbles. Scales: bytes 0-3 hold ``sc[0..3]`` in their low 6 bits, bytes 4-7 ``m[0..3]``;
``sc[4..7]`` and ``m[4..7]`` keep their low 4 bits in bytes 8-11 (scale low, min high) and their top 2 bits
in the top 2 bits of bytes 0-3 (scales) and 4-7 (mins).

Q6_K, 210 bytes: 128 bytes of low 4 bits, 64 bytes of high 2 bits, 16 int8 scales, ``d`` (float16). 16
sub-blocks of 16; weight = ``d * scale[j] * (q - 32)``. Each 128 weights take 64 low-nibble bytes (byte ``l``:
weights ``l`` and ``l + 64``; byte ``l + 32``: weights ``l + 32`` and ``l + 96``) and 32 high-bit bytes
(byte ``l``: the top 2 bits of weights ``l``, ``l + 32``, ``l + 64``, ``l + 96`` from bit 0 up).

The rounding follows llama.cpp's ``quantize_row_q4_K_ref`` / ``quantize_row_q6_K_ref`` (no importance
matrix): per sub-block a small search for the scale (and min) with the least weighted squared error, then the
sub-block scales themselves rounded to 6 (Q4_K) or 8 (Q6_K) bits against one float16 super-scale. Everything
is float32, as in the C code, vectorised over all sub-blocks of a tensor at once.

Each ``quantize_*`` returns ``(packed bytes [rows, bytes per row], reference dequantization [rows, cols])``:
the float32 weights our own codes and scales stand for, which ``gguf.quants.dequantize`` of the bytes must
reproduce exactly (tests/test_export_gguf.py).
"""

from __future__ import annotations

import numpy as np

QK_K = 256
Q4_K_BYTES = 144
Q6_K_BYTES = 210
_EPS = np.float32(1e-15)  # llama.cpp's GROUP_MAX_EPS: a group below it is all zeros

f32 = np.float32


def _round(x: np.ndarray) -> np.ndarray:
    """llama.cpp's ``nearest_int``: round half to even (the 1.5 * 2^23 trick), as int32."""
    return np.rint(x).astype(np.int32)


def _fp16(x: np.ndarray) -> np.ndarray:
    """Round to float16 and back to float32: what a stored ``ggml_half`` reads back as."""
    return np.asarray(x, dtype=f32).astype(np.float16).astype(f32)


def _superblocks(weight: np.ndarray) -> np.ndarray:
    rows, cols = weight.shape
    if cols % QK_K:
        raise ValueError(f"k-quants need rows of a multiple of {QK_K} weights, got {cols}")
    return np.ascontiguousarray(weight, dtype=f32).reshape(-1, QK_K)


def _scale_min_search(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """llama.cpp's ``make_qkx2_quants`` (squared error) for every row of ``x`` [n, 32] at once.

    Returns ``(scale, minus_min)``: the affine grid ``scale * q + min`` (``min <= 0``, ``q`` in 0..nmax) with the
    least ``w``-weighted squared error among the plain min/max grid and ``nstep + 1`` stretched ones, each
    refitted by weighted least squares."""
    lo = np.minimum(x.min(axis=1), 0).astype(f32)
    hi = x.max(axis=1)
    span = hi - lo
    flat = span == 0
    span = np.where(flat, f32(1), span)
    sum_w = w.sum(axis=1, dtype=f32)
    sum_x = (w * x).sum(axis=1, dtype=f32)

    iscale = f32(nmax) / span
    scale = f32(1) / iscale
    q = np.clip(_round(iscale[:, None] * (x - lo[:, None])), 0, nmax).astype(f32)
    best = (w * (scale[:, None] * q + lo[:, None] - x) ** 2).sum(axis=1, dtype=f32)
    best_min = lo.copy()
    for step in range(nstep + 1):
        iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / span
        q = np.clip(_round(iscale[:, None] * (x - lo[:, None])), 0, nmax).astype(f32)
        sum_l = (w * q).sum(axis=1, dtype=f32)
        sum_l2 = (w * q * q).sum(axis=1, dtype=f32)
        sum_xl = (w * q * x).sum(axis=1, dtype=f32)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        det = np.where(ok, det, f32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0  # the grid must reach 0 from below: refit the scale alone
        this_scale = np.where(positive, sum_xl / np.where(sum_l2 > 0, sum_l2, f32(1)), this_scale).astype(f32)
        this_min = np.where(positive, f32(0), this_min).astype(f32)
        error = (w * (this_scale[:, None] * q + this_min[:, None] - x) ** 2).sum(axis=1, dtype=f32)
        better = ok & (error < best)
        best = np.where(better, error, best)
        scale = np.where(better, this_scale, scale)
        best_min = np.where(better, this_min, best_min)
    scale = np.where(flat, f32(0), scale)
    return scale.astype(f32), (-best_min).astype(f32)


def quantize_q4_k(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pack a float ``[rows, cols]`` weight (``cols`` a multiple of 256) as Q4_K; see the module doc."""
    rows, cols = weight.shape
    blocks = _superblocks(weight)
    nb = blocks.shape[0]
    sub = blocks.reshape(nb * 8, 32)
    av_x = np.sqrt((sub * sub).sum(axis=1, dtype=f32) / f32(32))
    importance = av_x[:, None] + np.abs(sub)
    scales, mins = _scale_min_search(sub, importance, 15, -1.0, 0.1, 20)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)

    max_scale, max_min = scales.max(axis=1), mins.max(axis=1)
    inv_scale = np.where(max_scale > 0, f32(63) / np.where(max_scale > 0, max_scale, f32(1)), f32(0))
    inv_min = np.where(max_min > 0, f32(63) / np.where(max_min > 0, max_min, f32(1)), f32(0))
    ls = np.clip(_round(inv_scale[:, None] * scales), 0, 63).astype(np.uint8)
    lm = np.clip(_round(inv_min[:, None] * mins), 0, 63).astype(np.uint8)
    d = _fp16(max_scale / f32(63))
    dmin = _fp16(max_min / f32(63))

    step = d[:, None] * ls.astype(f32)  # [nb, 8]
    offset = dmin[:, None] * lm.astype(f32)
    safe = np.where(step == 0, f32(1), step)
    x = blocks.reshape(nb, 8, 32)
    codes = np.clip(_round((x + offset[..., None]) / safe[..., None]), 0, 15).astype(np.uint8)
    codes = np.where(step[..., None] == 0, np.uint8(0), codes)  # a zero scale: every weight reads -offset

    packed_scales = np.empty((nb, 12), dtype=np.uint8)
    packed_scales[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    packed_scales[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    packed_scales[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    pairs = codes.reshape(nb, 4, 2, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(nb, 128)
    packed = np.concatenate(
        [d.astype(np.float16).view(np.uint8).reshape(nb, 2), dmin.astype(np.float16).view(np.uint8).reshape(nb, 2), packed_scales, qs],
        axis=1,
    )
    reference = (step[..., None] * codes.astype(f32) - offset[..., None]).astype(f32)
    return packed.reshape(rows, cols // QK_K * Q4_K_BYTES), reference.reshape(rows, cols)


def _symmetric_search(x: np.ndarray, nmax: int) -> np.ndarray:
    """llama.cpp's ``make_qx_quants`` with ``rmse_type=1`` (weights ``x**2``) for every row of ``x`` [n, 16]:
    the scale of the grid ``scale * l``, ``l`` in ``-nmax..nmax-1``, anchored at the largest magnitude, tried
    at 19 stretches and refitted by least squares; 0 for an all-zero row."""
    idx = np.abs(x).argmax(axis=1)  # first largest magnitude, as the C loop's strict '>'
    peak = x[np.arange(x.shape[0]), idx]
    zero = np.abs(peak) < _EPS
    peak = np.where(zero, f32(1), peak)
    w = x * x

    def fit(iscale):
        q = np.clip(_round(iscale[:, None] * x), -nmax, nmax - 1).astype(f32)
        return (w * x * q).sum(axis=1, dtype=f32), (w * q * q).sum(axis=1, dtype=f32)

    sumlx, suml2 = fit(f32(-nmax) / peak)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, f32(1)), f32(0)).astype(f32)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        sumlx, suml2 = fit(-(f32(nmax) + f32(0.1) * f32(step)) / peak)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        new_scale = sumlx / np.where(suml2 > 0, suml2, f32(1))
        scale = np.where(better, new_scale, scale).astype(f32)
        best = np.where(better, scale * sumlx, best).astype(f32)
    return np.where(zero, f32(0), scale).astype(f32)


def quantize_q6_k(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pack a float ``[rows, cols]`` weight (``cols`` a multiple of 256) as Q6_K; see the module doc."""
    rows, cols = weight.shape
    blocks = _superblocks(weight)
    nb = blocks.shape[0]
    scales = _symmetric_search(blocks.reshape(nb * 16, 16), 32).reshape(nb, 16)

    idx = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(nb), idx]
    empty = np.abs(max_scale) < _EPS  # llama.cpp writes such a super-block as all zeros
    iscale = f32(-128) / np.where(empty, f32(1), max_scale)
    d = np.where(empty, f32(0), _fp16(f32(1) / iscale))
    sc = np.minimum(127, _round(iscale[:, None] * scales))
    sc = np.where(empty[:, None], 0, sc).astype(np.int8)

    step = d[:, None] * sc.astype(f32)  # [nb, 16]
    safe = np.where(step == 0, f32(1), step)
    x = blocks.reshape(nb, 16, 16)
    codes = np.clip(_round(x / safe[..., None]), -32, 31) + 32
    codes = np.where(step[..., None] == 0, 32, codes).astype(np.uint8).reshape(nb, 2, 4, 32)  # [half, quarter, l]

    low = codes & 0xF
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)  # [nb, 2, 64]
    high = codes >> 4
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)  # [nb, 2, 32]
    packed = np.concatenate(
        [ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8), d.astype(np.float16).view(np.uint8).reshape(nb, 2)], axis=1
    )
    reference = (step[..., None] * (codes.reshape(nb, 16, 16).astype(np.int8) - np.int8(32)).astype(f32)).astype(f32)
    return packed.reshape(rows, cols // QK_K * Q6_K_BYTES), reference.reshape(rows, cols)
