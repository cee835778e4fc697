"""Q3_K, Q4_K, Q5_K and Q6_K packing in llama.cpp's exact block layout, in numpy (the ``gguf`` package only
reads them).

All use super-blocks of 256 weights (``QK_K``) along a row.

Q4_K, 144 bytes: ``d`` (float16), ``dmin`` (float16), 12 bytes holding eight 6-bit scales and eight 6-bit
mins, 128 bytes of 4-bit codes. A super-block is 8 sub-blocks of 32; weight ``i`` of sub-block ``j`` is
``d * sc[j] * q - dmin * m[j]``. Codes: each 64 weights take 32 bytes, the first 32 in the low nibbles and the
next 32 in the high nibbles. Scales: bytes 0-3 hold ``sc[0..3]`` in their low 6 bits, bytes 4-7 ``m[0..3]``;
``sc[4..7]`` and ``m[4..7]`` keep their low 4 bits in bytes 8-11 (scale low, min high) and their top 2 bits
in the top 2 bits of bytes 0-3 (scales) and 4-7 (mins).

Q5_K, 176 bytes: as Q4_K with 5-bit codes: ``d``, ``dmin``, the same 12 scale bytes, 32 bytes ``qh`` holding
the fifth bits (bit ``g`` of byte ``l``: weight ``l`` of sub-block ``g``), then the low 4 bits as Q4_K's codes.

Q3_K, 110 bytes: 32 bytes ``hmask`` (bit ``b`` of byte ``l``: the third bit of weight ``32 b + l``), 64 bytes
of low 2 bits (byte ``32 h + l``: weights ``128 h + l``, ``+ 32``, ``+ 64``, ``+ 96`` from bit 0 up), 12
bytes of sixteen signed 6-bit scales (stored + 32: low nibbles in bytes 0-7, sub-blocks 8-15 in the high
nibbles; the top 2 bits of scale ``j`` in byte ``8 + j % 4`` at bit ``2 (j // 4)``), ``d`` (float16). 16
sub-blocks of 16, symmetric: weight = ``d * scale[j] * (q - 4)``, ``q`` in 0..7.

Q6_K, 210 bytes: 128 bytes of low 4 bits, 64 bytes of high 2 bits, 16 int8 scales, ``d`` (float16). 16
sub-blocks of 16; weight = ``d * scale[j] * (q - 32)``. Each 128 weights take 64 low-nibble bytes (byte ``l``:
weights ``l`` and ``l + 64``; byte ``l + 32``: weights ``l + 32`` and ``l + 96``) and 32 high-bit bytes
(byte ``l``: the top 2 bits of weights ``l``, ``l + 32``, ``l + 64``, ``l + 96`` from bit 0 up).

The rounding follows llama.cpp's ``quantize_row_q{3,4,5,6}_K_ref`` (no importance matrix): per sub-block a
small search for the scale (and min) with the least weighted squared error, then the sub-block scales
themselves rounded to 6 (Q3_K, Q4_K, Q5_K) or 8 (Q6_K) bits against one float16 super-scale. Everything
is float32, as in the C code, vectorised over all sub-blocks of a tensor at once.

Each ``quantize_*`` returns ``(packed bytes [rows, bytes per row], reference dequantization [rows, cols])``:
the float32 weights our own codes and scales stand for, which ``gguf.quants.dequantize`` of the bytes must
reproduce exactly (tests/test_export_gguf.py).
"""

from __future__ import annotations

import numpy as np

QK_K = 256
Q3_K_BYTES = 110
Q4_K_BYTES = 144
Q5_K_BYTES = 176
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


def _affine_k(weight: np.ndarray, nmax: int, rmin: float, nstep: int):
    """The two-level affine grid shared by Q4_K (``nmax`` 15) and Q5_K (31), after llama.cpp's
    ``quantize_row_q{4,5}_K_ref``: per 32-weight sub-block a scale and min searched with weights
    ``rms + |x|``, both rounded to 6 bits against float16 super-block ``d`` / ``dmin``; then the codes.

    Returns ``(d, dmin, ls, lm, codes, reference)`` with ``ls``/``lm`` the 6-bit scales [nb, 8], ``codes``
    [nb, 8, 32] in 0..nmax and ``reference`` [nb, 8, 32] the float32 weights they stand for."""
    blocks = _superblocks(weight)
    nb = blocks.shape[0]
    sub = blocks.reshape(nb * 8, 32)
    av_x = np.sqrt((sub * sub).sum(axis=1, dtype=f32) / f32(32))
    importance = av_x[:, None] + np.abs(sub)
    scales, mins = _scale_min_search(sub, importance, nmax, rmin, 0.1, nstep)
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
    codes = np.clip(_round((x + offset[..., None]) / safe[..., None]), 0, nmax).astype(np.uint8)
    codes = np.where(step[..., None] == 0, np.uint8(0), codes)  # a zero scale: every weight reads -offset
    reference = (step[..., None] * codes.astype(f32) - offset[..., None]).astype(f32)
    return d, dmin, ls, lm, codes, reference


def _pack_scales_mins(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and eight 6-bit mins in Q4_K/Q5_K's 12 bytes (module doc)."""
    packed = np.empty((ls.shape[0], 12), dtype=np.uint8)
    packed[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return packed


def _half_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(x.shape[0], 2)


def quantize_q4_k(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pack a float ``[rows, cols]`` weight (``cols`` a multiple of 256) as Q4_K; see the module doc."""
    rows, cols = weight.shape
    d, dmin, ls, lm, codes, reference = _affine_k(weight, 15, -1.0, 20)
    nb = codes.shape[0]
    pairs = codes.reshape(nb, 4, 2, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(nb, 128)
    packed = np.concatenate([_half_bytes(d), _half_bytes(dmin), _pack_scales_mins(ls, lm), qs], axis=1)
    return packed.reshape(rows, cols // QK_K * Q4_K_BYTES), reference.reshape(rows, cols)


def quantize_q5_k(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pack a float ``[rows, cols]`` weight (``cols`` a multiple of 256) as Q5_K; see the module doc."""
    rows, cols = weight.shape
    d, dmin, ls, lm, codes, reference = _affine_k(weight, 31, -0.5, 15)
    nb = codes.shape[0]
    low = (codes & 0xF).reshape(nb, 4, 2, 32)
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(nb, 128)
    high = (codes >> 4).astype(np.uint8)  # [nb, 8, 32]: sub-block g's fifth bits go to bit g of qh[l]
    qh = np.zeros((nb, 32), dtype=np.uint8)
    for g in range(8):
        qh |= high[:, g] << g
    packed = np.concatenate([_half_bytes(d), _half_bytes(dmin), _pack_scales_mins(ls, lm), qh, qs], axis=1)
    return packed.reshape(rows, cols // QK_K * Q5_K_BYTES), reference.reshape(rows, cols)


def _q3_search(x: np.ndarray) -> np.ndarray:
    """llama.cpp's ``make_q3_quants(16, 4, x, L, do_rmse=true)`` for every row of ``x`` [n, 16] at once:
    codes ``l`` in -4..3 from the largest magnitude, then up to five passes of coordinate descent, each code
    in turn moved to where it maximises (Σ w·x·l)² / Σ w·l² (weights ``x²``). Returns the scale of each row
    (0 for an all-zero row); the codes are redone against the rounded scales by the caller, as in the C code."""
    nmax = 4
    idx = np.abs(x).argmax(axis=1)
    peak = x[np.arange(x.shape[0]), idx]
    zero = np.abs(peak) < _EPS
    iscale = f32(-nmax) / np.where(zero, f32(1), peak)
    q = np.clip(_round(iscale[:, None] * x), -nmax, nmax - 1).astype(f32)
    w = x * x
    sumlx = (w * x * q).sum(axis=1, dtype=f32)
    suml2 = (w * q * q).sum(axis=1, dtype=f32)
    for _ in range(5):  # a row with no change in a pass would not change in the next: run all five
        for i in range(x.shape[1]):
            wi, xi, li = w[:, i], x[:, i], q[:, i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            ok = slx > 0
            new = np.clip(_round(xi * sl2 / np.where(ok, slx, f32(1))), -nmax, nmax - 1).astype(f32)
            slx_new = slx + wi * xi * new
            sl2_new = sl2 + wi * new * new
            take = ok & (new != li) & (sl2_new > 0) & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
            q[:, i] = np.where(take, new, li)
            sumlx = np.where(take, slx_new, sumlx).astype(f32)
            suml2 = np.where(take, sl2_new, suml2).astype(f32)
    return np.where(zero | (suml2 == 0), f32(0), sumlx / np.where(suml2 == 0, f32(1), suml2)).astype(f32)


def quantize_q3_k(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pack a float ``[rows, cols]`` weight (``cols`` a multiple of 256) as Q3_K; see the module doc."""
    rows, cols = weight.shape
    blocks = _superblocks(weight)
    nb = blocks.shape[0]
    scales = _q3_search(blocks.reshape(nb * 16, 16)).reshape(nb, 16)
    idx = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(nb), idx]
    empty = max_scale == 0
    iscale = f32(-32) / np.where(empty, f32(1), max_scale)
    sc = np.where(empty[:, None], 0, np.clip(_round(iscale[:, None] * scales), -32, 31))  # signed 6-bit
    d = np.where(empty, f32(0), _fp16(f32(1) / iscale))

    step = d[:, None] * sc.astype(f32)  # [nb, 16]
    safe = np.where(step == 0, f32(1), step)
    x = blocks.reshape(nb, 16, 16)
    codes = (np.clip(_round(x / safe[..., None]), -4, 3) + 4).astype(np.uint8)  # stored 0..7
    codes = np.where(step[..., None] == 0, np.uint8(4), codes).reshape(nb, QK_K)  # a zero scale reads 0 anyway

    stored = (sc + 32).astype(np.uint8)  # [nb, 16]
    packed_scales = np.zeros((nb, 12), dtype=np.uint8)
    packed_scales[:, 0:8] = (stored[:, 0:8] & 0xF) | ((stored[:, 8:16] & 0xF) << 4)
    for j in range(16):
        packed_scales[:, 8 + j % 4] |= (stored[:, j] >> 4) << (2 * (j // 4))
    hmask = np.zeros((nb, 32), dtype=np.uint8)
    for b in range(8):  # weight 32 * b + l: its third bit is bit b of hmask[l]
        hmask |= (codes[:, 32 * b : 32 * (b + 1)] >> 2) << b
    low = (codes & 3).reshape(nb, 2, 4, 32)  # [half, shift, l]: weight 128 * half + 32 * shift + l
    qs = (low[:, :, 0] | (low[:, :, 1] << 2) | (low[:, :, 2] << 4) | (low[:, :, 3] << 6)).reshape(nb, 64)
    packed = np.concatenate([hmask, qs, packed_scales, _half_bytes(d)], axis=1)
    reference = (step[..., None] * (codes.reshape(nb, 16, 16).astype(np.int8) - np.int8(4)).astype(f32)).astype(f32)
    return packed.reshape(rows, cols // QK_K * Q3_K_BYTES), reference.reshape(rows, cols)


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


KQUANTS = {"Q3_K": quantize_q3_k, "Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}  # GGML type name → packer
