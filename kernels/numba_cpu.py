"""numba CPU kernels that compute straight from robcomp's packed formats (kernels/reference.py).

Each kernel streams the packed weight row by row (one output feature ``n`` at a time), so a
memory-bound product reads only the stored bytes: 2:4 reads the kept values and 2-bit metadata
(~half of dense), 2:4+int4 its nibbles, fp8 one byte per weight. Activations are float32;
accumulation is float32 (``fastmath`` is limited to reassociation and FMA contraction, so NaN and
Inf still propagate).

* ``*_fwd1`` (batch 1, K % 8 == 0): the 2:4 kernels read per meta byte (two groups of 4): ``x`` by
  half and lane, ``xq[h, t, j] = x[8 j + 4 h + t]``, each kept value multiplied by the x lane its
  meta index selects (two selects), the meta arithmetic in uint8 (numba widens integers to 64
  bits, 8 lanes per compare), so the loop vectorises with contiguous loads (no gathers); the
  2:4+int4 kernel reads two groups' codes as one ``uint16`` and is specialised per group size.
  fp8 codes are decoded by bit arithmetic (``_fp8_value``: exact, no table gathers).
* ``*_fwdb<B>`` / ``*_bwdb<B>`` (2:4 formats, M > 1, forward and dX): generated per block width B
  (4 .. 64 rows of x or dY per pass over the weight), B scalar accumulators packed into vector
  registers by LLVM's SLP vectoriser (switched on while these compile), one broadcast FMA per
  kept value and B rows: twice fewer FMAs than dense, the weight read once per block.
* ``*_bwd1``: ``dX = dY W`` at batch 1 from the packed weight; the 2:4 ones accumulate dX in the
  forward's x layout by meta byte, half and lane (the 2:4+int4 one decodes each row's kept
  values into a row buffer first, so both loops vectorise). The other formats' larger batches
  use BLAS on the weight unpacked by the ``*_unpack`` kernels (float32, or bf16 bits for the
  weight-only formats' dense path, rounded to nearest even).

Inner loops run over row (or scale-group) slices from index 0: LLVM vectorises those, but left a
``range(start, stop)`` over a row's columns scalar (8x slower, measured on the int4 dX).

Forward and unpack kernels exist in a serial and a ``parallel=True`` (``prange`` over rows) build;
``kernels.cpu`` picks the parallel one when torch runs with more than one thread. Gradient
kernels scatter into a shared dX and are serial (the blocked ones run blocks in parallel). Also here: fast int4 packing of large weights and
the older batch-1 int4/int8 GEMV helpers.
"""
from __future__ import annotations

import contextlib
import re
import threading

import numpy as np
import torch

try:
    import numba
    from numba import njit, prange
except Exception:  # pragma: no cover - numba is a declared dependency
    numba = None


def _launch_numba_threads() -> None:
    """Start numba's thread pool now, keeping torch's thread count: the first parallel kernel
    (even one loaded from numba's disk cache) starts it, and its OpenMP layer then resets the
    process's OpenMP thread count to numba's, which torch reads (``torch.get_num_threads()``)."""
    threads = torch.get_num_threads()
    numba.np.ufunc.parallel._launch_threads()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


if numba is not None:
    _launch_numba_threads()

__all__ = ["available", "int4_pack", "int4_gemv", "int8_gemv", "kernel"]

_FM = {"reassoc", "contract"}


def available() -> bool:
    return numba is not None


# ----------------------------------------------------------------------------- kernel bodies
# Plain Python functions, compiled below in the variants used. ``_blocked(B)`` builds the
# ``M > 1`` kernels for a fixed block of B columns of ``xt``/``gt`` (padded to a multiple of B by
# the caller): a constant trip count lets LLVM keep the B accumulators in one vector register.
def _sp24_fwd1(xq, values, meta, out):
    # batch 1, per meta byte j (two groups of 4, 8 columns): x by half and lane,
    # xq[h, t, j] = x[8 j + 4 h + t]; each kept value multiplies the x its meta index selects
    # (the first kept lane is 0..2, the second 1..3: two selects each, no gathers), so the loop
    # over meta bytes vectorises with contiguous loads. The meta arithmetic stays in uint8: numba
    # widens integer arithmetic to 64 bits, which left 8 lanes per compare (1.25x faster in uint8).
    # Four rows a quarter of the weight apart per pass: four streams from memory keep more reads
    # in flight than one (1.2-1.3x faster on a 4096x4096 weight that is not in cache, Zen 4; the
    # x loads are shared). Rows past the end repeat the last one (the same value written twice).
    n = values.shape[0]
    step = (n + 3) // 4
    for r in prange(step):
        ra, rb, rc, rd = r, min(r + step, n - 1), min(r + 2 * step, n - 1), min(r + 3 * step, n - 1)
        va, vb, vc, vd = values[ra], values[rb], values[rc], values[rd]
        ma, mb, mc, md = meta[ra], meta[rb], meta[rc], meta[rd]
        a0, a1, b0, b1 = np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0)
        c0, c1, d0, d1 = np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0)
        for j in range(ma.shape[0]):
            for h in range(2):
                x0, x1, x2, x3 = xq[h, 0, j], xq[h, 1, j], xq[h, 2, j], xq[h, 3, j]
                p, q = _sp24_terms_j(va, ma[j], j, h, x0, x1, x2, x3)
                a0 += p
                a1 += q
                p, q = _sp24_terms_j(vb, mb[j], j, h, x0, x1, x2, x3)
                b0 += p
                b1 += q
                p, q = _sp24_terms_j(vc, mc[j], j, h, x0, x1, x2, x3)
                c0 += p
                c1 += q
                p, q = _sp24_terms_j(vd, md[j], j, h, x0, x1, x2, x3)
                d0 += p
                d1 += q
        out[ra] = a0 + a1
        out[rb] = b0 + b1
        out[rc] = c0 + c1
        out[rd] = d0 + d1


def _sp24_terms(v, mbyte, j, h, x0, x1, x2, x3):
    # group h of meta byte j of one row: its two kept values times the x lanes they select
    i0, i1 = _kept_lanes_j(mbyte, h)
    return (v[4 * j + 2 * h] * (x0 if i0 == _U8_0 else (x1 if i0 == _U8_1 else x2)),
            v[4 * j + 2 * h + 1] * (x3 if i1 == _U8_3 else (x2 if i1 == _U8_2 else x1)))


def _kept_lanes(mb, h):
    # the two kept lanes (i0 < i1) of group h of meta byte mb, as uint8
    nib = np.uint8(mb & np.uint8(15)) if h == 0 else np.uint8(mb >> np.uint8(4))
    return np.uint8(nib & np.uint8(3)), np.uint8(nib >> np.uint8(2))


_U8_0, _U8_1, _U8_2, _U8_3 = np.uint8(0), np.uint8(1), np.uint8(2), np.uint8(3)


def _sp24_bwd1(g, values, meta, dxq):
    # dX = g W at batch 1 (K % 8 == 0), in the forward's layout by meta byte, half and lane:
    # dxq[h, t, j] = dX[8 j + 4 h + t]; each group's kept pair is expanded to its four lanes with
    # selects, so the loop over meta bytes vectorises (contiguous loads and stores, no scatter)
    for r in range(values.shape[0]):
        v, m, gr = values[r], meta[r], g[r]
        for j in range(m.shape[0]):
            for h in range(2):
                _acc_lanes_j(dxq, h, j, m[j], v[4 * j + 2 * h] * gr, v[4 * j + 2 * h + 1] * gr)


def _acc_lanes(dxq, h, j, mb, v0, v1):
    # group h of meta byte mb: kept pair (v0 at lane i0, v1 at lane i1) added to dX's four lanes
    i0, i1 = _kept_lanes_j(mb, h)
    z = np.float32(0.0)
    dxq[h, 0, j] += v0 if i0 == _U8_0 else z
    dxq[h, 1, j] += v1 if i1 == _U8_1 else (v0 if i0 == _U8_1 else z)
    dxq[h, 2, j] += v1 if i1 == _U8_2 else (v0 if i0 == _U8_2 else z)
    dxq[h, 3, j] += v1 if i1 == _U8_3 else z


def _s24i4_fwd1_for(half_group):
    """The batch-1 2:4+int4 kernel for one group size. Everything it reads is contiguous over the
    meta byte ``j`` (two groups of 4, 8 columns): ``meta[r, j]``, the two groups' code bytes as one
    ``uint16`` (``qv16[r, j]``, a view of the stored codes) and x by half and lane,
    ``xq[h, t, j] = x[8 j + 4 h + t]``; each kept value ``q s - z s`` (its scale group's:
    ``half_group / 4`` meta bytes, a constant divisor) multiplies the x its meta index selects, as
    in ``_sp24_fwd1``, so the loop vectorises with contiguous loads and no gathers."""
    nbytes = half_group // 4

    def s24i4_fwd1(xq, qv16, scales, zeros, meta, out):
        # one loop over the row (no per-scale-group reduction): the two accumulators stay in
        # vector registers across scale groups
        n = qv16.shape[0]
        for r in prange(n):
            m, q = meta[r], qv16[r]
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            for j in range(m.shape[0]):
                gi = j // nbytes
                sc = scales[r, gi]
                zs = zeros[r, gi] * sc
                # the codes in int32, each step truncated back to it: numba types integer
                # arithmetic as 64-bit, which left 8 lanes per vector and int64 -> float
                # converts (1.6x slower with the weight in cache)
                cw = np.int32(q[j])
                for h in range(2):
                    i0, i1 = _kept_lanes_j(m[j], h)
                    code = np.int32(cw >> np.int32(8 * h))
                    v0 = np.float32(np.int32(code & np.int32(15))) * sc - zs
                    v1 = np.float32(np.int32(np.int32(code >> np.int32(4)) & np.int32(15))) * sc - zs
                    x0, x1, x2, x3 = xq[h, 0, j], xq[h, 1, j], xq[h, 2, j], xq[h, 3, j]
                    a0 += v0 * (x0 if i0 == _U8_0 else (x1 if i0 == _U8_1 else x2))
                    a1 += v1 * (x3 if i1 == _U8_3 else (x2 if i1 == _U8_2 else x1))
            out[r] = a0 + a1
    return s24i4_fwd1


def _s24i4_bwd1(g, qv, scales, zeros, meta, half_group, dxq):
    # as _sp24_bwd1 (dxq[h, t, j] = dX[8 j + 4 h + t]); per row the kept values (q - z) s g are
    # first decoded into a row buffer, one scale group's slice at a time: both loops vectorise
    # (decoding inside the lane loop, with the scale looked up per meta byte, did not: 4x slower)
    vrow = np.empty(qv.shape[1] * 2, np.float32)
    hb = half_group // 2  # code bytes per scale group
    for r in range(qv.shape[0]):
        gr = g[r]
        for gi in range(scales.shape[1]):
            sc = scales[r, gi] * gr
            zs = zeros[r, gi] * sc
            q, dst = qv[r, gi * hb:(gi + 1) * hb], vrow[gi * half_group:(gi + 1) * half_group]
            for b in range(hb):
                c = np.uint32(q[b])
                dst[2 * b] = np.float32(c & np.uint32(15)) * sc - zs
                dst[2 * b + 1] = np.float32(c >> np.uint32(4)) * sc - zs
        m = meta[r]
        for j in range(m.shape[0]):
            for h in range(2):
                _acc_lanes_j(dxq, h, j, m[j], vrow[4 * j + 2 * h], vrow[4 * j + 2 * h + 1])


def _int8_bwd1(g, q, dx):
    # int8 codes converted directly (no table): vectorises as widen + convert + FMA
    n, k = q.shape
    for r in range(n):
        gr = g[r]
        for j in range(k):
            dx[j] += np.float32(q[r, j]) * gr


def _row_scale(row, qmax):
    # the reference's per-token scale max(|row|, 1e-12) / qmax; a NaN sticks, as in torch's amax
    # (the row's output is then NaN)
    amax = np.float32(0.0)
    for j in range(row.shape[0]):
        a = abs(row[j])
        if a > amax or a != a:
            amax = a
    return (amax if not amax < np.float32(1e-12) else np.float32(1e-12)) / qmax


def _int8_quantize_rows(x, q, scale, offset):
    # reference.quantize_rows_int8: s = max(|x|, 1e-12) / 127, q = round half away (x / s);
    # stored as q + offset (0 into int8, 128 into uint8 for oneDNN's u8 x s8 GEMM)
    m, k = x.shape
    for i in range(m):
        s = _row_scale_j(x[i], np.float32(127.0))
        scale[i] = s
        for j in range(k):
            v = x[i, j] / s
            r = np.floor(v + np.float32(0.5)) if v >= 0 else np.ceil(v - np.float32(0.5))
            q[i, j] = np.int32(min(max(r, np.float32(-127.0)), np.float32(127.0))) + offset


def _fp8_quantize_rows(x, q, scale):
    # reference.quantize_rows_fp8: s = max(|x|, 1e-12) / 448, q = e4m3(clamp(x / s, +-448)), the
    # e4m3 value stored as float32: round to nearest even on 3 mantissa bits (on the float32 bits)
    # for normals, on the 2**-9 grid below 2**-6 (subnormals); exact against torch's cast
    m, k = x.shape
    for i in range(m):
        s = _row_scale_j(x[i], np.float32(448.0))
        scale[i] = s
        for j in range(k):
            v = x[i, j] / s
            a = min(abs(v), np.float32(448.0))
            if a < np.float32(2.0 ** -6):
                r = np.float32(np.rint(a * np.float32(512.0)) / np.float32(512.0))
            else:
                b = np.float32(a).view(np.uint32)
                b = (b + np.uint32(0x7FFFF) + ((b >> np.uint32(20)) & np.uint32(1))) & np.uint32(0xFFF00000)
                r = np.uint32(b).view(np.float32)
            q[i, j] = (-r if v < 0 else r) if v == v else v


def _lut8_fwd1(x, codes, lut, out):
    # byte codes (int8 bits or fp8 e4m3 bits) decoded through a 256-entry float32 table
    n, k = codes.shape
    for r in prange(n):
        acc = np.float32(0.0)
        for j in range(k):
            acc += lut[codes[r, j]] * x[j]
        out[r] = acc


def _lut8_bwd1(g, codes, lut, dx):
    n, k = codes.shape
    for r in range(n):
        gr = g[r]
        for j in range(k):
            dx[j] += lut[codes[r, j]] * gr


def _fp8_value(c):
    # exact float32 value of e4m3 bits (not NaN codes): the bits placed in a float32's exponent
    # and mantissa fields, scaled by 2**120 (fp32 bias 127 - e4m3 bias 7); subnormals included
    c = np.uint32(c)
    bits = ((c & np.uint32(0x7F)) << np.uint32(20)) | ((c & np.uint32(0x80)) << np.uint32(24))
    return np.uint32(bits).view(np.float32)


def _fp8_fwd1(x, codes, out):
    # batch 1 from the e4m3 bits, decoded by bit arithmetic (vectorises; a table needs gathers);
    # the 2**120 of the decoding is applied once per output
    n, k = codes.shape
    for r in prange(n):
        acc = np.float32(0.0)
        for j in range(k):
            acc += _fp8_value_j(codes[r, j]) * x[j]
        out[r] = acc * np.float32(2.0 ** 120)


def _fp8_bwd1(g, codes, dx):
    # the caller folds 2**120 into g (dX is linear in g)
    n, k = codes.shape
    for r in range(n):
        gr = g[r]
        for j in range(k):
            dx[j] += _fp8_value_j(codes[r, j]) * gr


def _fp8_unpack(codes, scale, out):
    n, k = codes.shape
    for r in prange(n):
        s = scale[r] * np.float32(2.0 ** 120)
        for j in range(k):
            out[r, j] = _fp8_value_j(codes[r, j]) * s


def _int4_bwd1(g, qw, scales, zeros, group, dx2):
    # dX of even / odd k in two planes (dx2[0, b] = dX[2 b], dx2[1, b] = dX[2 b + 1]); the zero
    # point folded per group: (q - z) s g = q (s g) - z s g. The inner loop runs over slices from 0:
    # LLVM vectorises that, not a ``range(start, stop)`` over the row (measured 8x slower)
    n, kh = qw.shape
    hg = group // 2
    for r in range(n):
        gr = g[r]
        for gi in range(kh // hg):
            sg = scales[r, gi] * gr
            zs = zeros[r, gi] * sg
            q = qw[r, gi * hg:(gi + 1) * hg]
            lo = dx2[0, gi * hg:(gi + 1) * hg]
            hi = dx2[1, gi * hg:(gi + 1) * hg]
            for b in range(hg):
                byte = np.uint32(q[b])
                lo[b] += np.float32(byte & np.uint32(15)) * sg - zs
                hi[b] += np.float32(byte >> np.uint32(4)) * sg - zs


# ----------------------------------------------------------------- M > 1: blocked kernels
# Generated per block width B (rows of x per weight pass): B scalar accumulators that LLVM's SLP
# vectoriser packs into one vector register (B = 16: one zmm / two ymm), so each kept value costs
# one broadcast FMA per B rows and the weight is streamed once per block. The accumulation is
# strict (only FMA contraction): no float reduction for the loop vectoriser to turn into gathers
# over groups. x and dY come blocked, ``xb[b, k, j] = x[b B + j, k]``.
_DECODE = """
                nib = np.int32(meta[r, g >> 1]) >> ((g & 1) * 4)
                k0 = 4 * g + (nib & 3)
                k1 = 4 * g + ((nib >> 2) & 3)"""
_SP24_VALUES = """
                v0 = values[r, 2 * g]
                v1 = values[r, 2 * g + 1]"""
_S24I4_VALUES = """
                code = np.int32(qv[r, g])
                v0 = (np.float32(code & 15) - z) * s
                v1 = (np.float32(code >> 4) - z) * s"""


def _blocked_source(kind: str, direction: str, width: int) -> str:
    lanes = range(width)
    if kind == "sp24":
        args, values, rows = "values, meta", _SP24_VALUES, "values.shape[0]"
        groups = "            for g in range(values.shape[1] // 2):"
    else:
        args, values, rows = "qv, scales, zeros, meta, half_group", _S24I4_VALUES, "qv.shape[0]"
        groups = ("            for gi in range(scales.shape[1]):\n"
                  "              s = scales[r, gi]\n              z = zeros[r, gi]\n"
                  "              for g in range(gi * (half_group // 2), (gi + 1) * (half_group // 2)):")
    if kind != "sp24":  # one more indentation level inside the scale-group loop
        values = values.replace("\n                ", "\n                  ")
        decode = _DECODE.replace("\n                ", "\n                  ")
        ind = "                  "
    else:
        decode, ind = _DECODE, "                "
    if direction == "fwd":
        head = f"def {kind}_fwdb{width}(xb, {args}, out):\n    n = {rows}\n    for b in range(xb.shape[0]):\n" \
               f"        for r in prange(n):\n"
        init = "".join(f"            a{j} = np.float32(0.0)\n" for j in lanes)
        body = "".join(f"{ind}a{j} += v0 * xb[b, k0, {j}] + v1 * xb[b, k1, {j}]\n" for j in lanes)
        tail = "".join(f"            out[r, b * {width} + {j}] = a{j}\n" for j in lanes)
    else:  # dX: rows scatter into a shared block of dX, so blocks (not rows) run in parallel
        head = f"def {kind}_bwdb{width}(gb, {args}, dxb):\n    n = {rows}\n    for b in prange(gb.shape[0]):\n" \
               f"        for r in range(n):\n"
        init = "".join(f"            y{j} = gb[b, r, {j}]\n" for j in lanes)
        body = "".join(f"{ind}dxb[b, k0, {j}] += v0 * y{j}\n" for j in lanes) + \
            "".join(f"{ind}dxb[b, k1, {j}] += v1 * y{j}\n" for j in lanes)
        tail = ""
    return head + init + groups + decode + values + "\n" + body + tail


def _int8_source(width: int) -> str:
    # W8 x fp32: each int8 code converted once and used for ``width`` rows of x; a float reduction
    # over k per row, vectorised by the loop vectoriser (reassociation allowed)
    lanes = range(width)
    return (f"def int8_fwdb{width}(xb, q, scale, out):\n    n, k = q.shape\n    for b in range(xb.shape[0]):\n"
            "        for r in prange(n):\n"
            + "".join(f"            a{j} = np.float32(0.0)\n" for j in lanes)
            + "            for i in range(k):\n                w = np.float32(q[r, i])\n"
            + "".join(f"                a{j} += w * xb[b, {j}, i]\n" for j in lanes)
            + "".join(f"            out[b * {width} + {j}, r] = a{j} * scale[r]\n" for j in lanes))


def _i8i8_source(width: int) -> str:
    # W8A8: int8 x int8 products accumulated exactly in int32 (as torch._int_mm), ``width`` rows
    lanes = range(width)
    return (f"def i8i8_fwdb{width}(xb, q, out):\n    n, k = q.shape\n    for b in range(xb.shape[0]):\n"
            "        for r in prange(n):\n"
            + "".join(f"            a{j} = np.int32(0)\n" for j in lanes)
            + "            for i in range(k):\n                w = np.int32(q[r, i])\n"
            + "".join(f"                a{j} += w * np.int32(xb[b, {j}, i])\n" for j in lanes)
            + "".join(f"            out[b * {width} + {j}, r] = a{j}\n" for j in lanes))


# ------------------------------------------------------- 2 to 4 rows: the x-selecting GEMV
#: largest rows-per-pass x K (float32 values of x) for which the 2:4 and fp8 forwards take the
#: few-rows kernels: x
#: stays in L1 (32-48 KB on current x86 cores) while the weight streams past; beyond it x is
#: re-read from L2 for every weight row and the blocked kernel is as fast (measured, Zen 4)
FEW_ROWS_MAX_MK = 12288
#: rows of x up to which the 2:4 forwards take the few-rows kernels (4 rows per weight pass):
#: the blocked kernels vectorise over rows and pay the decode once per row block of 4-64, which
#: wins from about 8 rows; below, their lanes are mostly idle (measured, Zen 4)
FEW_ROWS_UP_TO = 8


def _few_rows_source(kind: str, m: int) -> str:
    # sp24_fwd1's / s24i4_fwd1's x-selecting loop with ``m`` rows of x: each meta byte's kept
    # lanes (and, for 2:4+int4, values) are decoded once and select among the m rows' x values,
    # loaded up front (a select among loaded values vectorises; a conditional load does not).
    # 2:4 takes two weight rows per pass for m = 2 (memory streams), one above (accumulators and
    # x values would spill). xq[i, h, t, j] = x[i, 8 j + 4 h + t]
    streams = 2 if m == 2 and kind == "sp24" else 1
    weights = "values, meta" if kind == "sp24" else "qv16, scales, zeros, meta"
    lines = [f"def {kind}_fwdm{m}(xq, {weights}, out):",
             f"    n = {'values' if kind == 'sp24' else 'qv16'}.shape[0]",
             f"    step = (n + {streams - 1}) // {streams}",
             "    for r in prange(step):"]
    for s in range(streams):
        lines += [f"        r{s} = min(r + {s} * step, n - 1)", f"        m{s} = meta[r{s}]"]
        lines += [f"        v{s} = values[r{s}]" if kind == "sp24" else f"        q{s} = qv16[r{s}]"]
        lines += [f"        a{s}_{i} = np.float32(0.0)\n        b{s}_{i} = np.float32(0.0)" for i in range(m)]
    lines += ["        for j in range(m0.shape[0]):"]
    if kind != "sp24":  # the scale group's scale and zero, the two groups' codes in int32
        lines += ["            gi = j // NBYTES", "            sc = scales[r0, gi]", "            zs = zeros[r0, gi] * sc",
                  "            cw = np.int32(q0[j])"]
    lines += ["            for h in range(2):"]
    lines += [f"                x{i}_0, x{i}_1, x{i}_2, x{i}_3 = xq[{i}, h, 0, j], xq[{i}, h, 1, j], "
              f"xq[{i}, h, 2, j], xq[{i}, h, 3, j]" for i in range(m)]
    for s in range(streams):
        lines += [f"                i0, i1 = kept(m{s}[j], h)"]
        if kind == "sp24":
            lines += [f"                w0 = v{s}[4 * j + 2 * h]", f"                w1 = v{s}[4 * j + 2 * h + 1]"]
        else:  # as s24i4_fwd1: int32 steps (numba's 64-bit integers halve the lanes)
            lines += ["                code = np.int32(cw >> np.int32(8 * h))",
                      "                w0 = np.float32(np.int32(code & np.int32(15))) * sc - zs",
                      "                w1 = np.float32(np.int32(np.int32(code >> np.int32(4)) & np.int32(15))) * sc - zs"]
        for i in range(m):
            lines += [f"                a{s}_{i} += w0 * (x{i}_0 if i0 == U0 else (x{i}_1 if i0 == U1 else x{i}_2))",
                      f"                b{s}_{i} += w1 * (x{i}_3 if i1 == U3 else (x{i}_2 if i1 == U2 else x{i}_1))"]
    lines += [f"        out[{i}, r{s}] = a{s}_{i} + b{s}_{i}" for s in range(streams) for i in range(m)]
    return "\n".join(lines) + "\n"


def _fp8_few_rows_source(m: int) -> str:
    # fp8_fwd1 with ``m`` rows of x [m, K]: each code decoded once for the m rows, one float
    # reduction over k per row (vectorised by the loop vectoriser, reassociation allowed)
    lines = [f"def fp8_fwdm{m}(x, codes, out):", "    n, k = codes.shape", "    for r in prange(n):"]
    lines += [f"        a{i} = np.float32(0.0)" for i in range(m)]
    lines += ["        for j in range(k):", "            w = fp8_value(codes[r, j])"]
    lines += [f"            a{i} += w * x[{i}, j]" for i in range(m)]
    lines += [f"        out[{i}, r] = a{i} * np.float32(2.0 ** 120)" for i in range(m)]
    return "\n".join(lines) + "\n"


def _few_rows_bwd_source(kind: str, m: int) -> str:
    # dX = dY W for ``m`` rows of dY, one pass over the weight (as the one-row dX kernels, whose
    # layouts they keep): 2:4 formats scatter each kept pair into its four lanes with selects,
    # dxq[i, h, t, j] = dX[i, 8 j + 4 h + t] (2:4+int4 decodes the row's kept values into a row
    # buffer first, as s24i4_bwd1); fp8 decodes each code once, dx[i, j]. Rows of the weight run
    # in sequence (they all add into dX)
    if kind == "fp8":
        lines = [f"def fp8_bwdm{m}(g, codes, dx):", "    n, k = codes.shape", "    for r in range(n):"]
        lines += [f"        g{i} = g[{i}, r]" for i in range(m)]
        lines += ["        for j in range(k):", "            w = fp8_value(codes[r, j])"]
        lines += [f"            dx[{i}, j] += w * g{i}" for i in range(m)]
        return "\n".join(lines) + "\n"
    weights = "values, meta" if kind == "sp24" else "qv, scales, zeros, meta"
    lines = [f"def {kind}_bwdm{m}(g, {weights}, dxq):", f"    n = meta.shape[0]"]
    if kind != "sp24":
        lines += ["    vrow = np.empty(qv.shape[1] * 2, np.float32)", "    hb = HALF_GROUP // 2"]
    lines += ["    for r in range(n):"]
    if kind == "sp24":
        lines += ["        v = values[r]"]
    else:
        lines += ["        v = vrow",
                  "        for gi in range(scales.shape[1]):",
                  "            sc = scales[r, gi]",
                  "            zs = zeros[r, gi] * sc",
                  "            q, dst = qv[r, gi * hb:(gi + 1) * hb], vrow[gi * HALF_GROUP:(gi + 1) * HALF_GROUP]",
                  "            for b in range(hb):",
                  "                c = np.uint32(q[b])",
                  "                dst[2 * b] = np.float32(c & np.uint32(15)) * sc - zs",
                  "                dst[2 * b + 1] = np.float32(c >> np.uint32(4)) * sc - zs"]
    # per row of dY in turn, with the weight row (and its decoded values) still in L1: one loop
    # over meta bytes per row as in sp24_bwd1 (all rows in one loop body did not vectorise: 3x
    # slower than the blocked kernel)
    lines += ["        mr = meta[r]"]
    for i in range(m):
        lines += [f"        d = dxq[{i}]", f"        gi = g[{i}, r]",
                  "        for j in range(mr.shape[0]):", "            for h in range(2):",
                  "                acc_lanes(d, h, j, mr[j], v[4 * j + 2 * h] * gi, v[4 * j + 2 * h + 1] * gi)"]
    return "\n".join(lines) + "\n"


def _compile_few_rows(kind: str, direction: str, m: int, parallel: bool, half_group: int | None):
    namespace = {"np": np, "prange": prange, "kept": _kept_lanes_j, "U0": _U8_0, "U1": _U8_1, "U2": _U8_2, "U3": _U8_3,
                 "NBYTES": (half_group or 4) // 4, "HALF_GROUP": half_group or 0, "fp8_value": _fp8_value_j,
                 "acc_lanes": _acc_lanes_j}
    if direction == "bwd":  # scatters into dX: never parallel
        source, parallel = _few_rows_bwd_source(kind, m), False
    else:
        source = _fp8_few_rows_source(m) if kind == "fp8" else _few_rows_source(kind, m)
    exec(source, namespace)  # noqa: S102 - generated from the templates above
    return njit(parallel=parallel, fastmath=_FM, nogil=True, error_model="numpy",
                boundscheck=False)(namespace[f"{kind}_{direction}m{m}"])


def _compile_blocked(kind: str, direction: str, width: int, parallel: bool):
    namespace = {"np": np, "prange": prange}
    if kind == "int8":
        exec(_int8_source(width), namespace)  # noqa: S102 - generated from the template above
        sig = numba.void(numba.float32[:, :, ::1], numba.int8[:, ::1], numba.float32[::1], numba.float32[:, ::1])
        return njit(sig, parallel=parallel, fastmath=_FM, nogil=True, error_model="numpy",
                    boundscheck=False)(namespace[f"int8_fwdb{width}"])
    if kind == "i8i8":
        exec(_i8i8_source(width), namespace)  # noqa: S102 - generated from the template above
        sig = numba.void(numba.int8[:, :, ::1], numba.int8[:, ::1], numba.int32[:, ::1])
        return njit(sig, parallel=parallel, nogil=True, error_model="numpy",
                    boundscheck=False)(namespace[f"i8i8_fwdb{width}"])
    exec(_blocked_source(kind, direction, width), namespace)  # noqa: S102 - generated from the templates above
    fn = namespace[f"{kind}_{direction}b{width}"]
    f32_3, f32_2, u8_2 = numba.float32[:, :, ::1], numba.float32[:, ::1], numba.uint8[:, ::1]
    weights = (f32_2, u8_2) if kind == "sp24" else (u8_2, f32_2, f32_2, u8_2, numba.int64)
    sig = numba.void(f32_3, *weights, f32_2 if direction == "fwd" else f32_3)
    with _slp_vectorize():
        return njit(sig, parallel=parallel, fastmath={"contract"}, nogil=True, error_model="numpy",
                    boundscheck=False)(fn)


@contextlib.contextmanager
def _slp_vectorize():
    """numba compiles with LLVM's SLP vectoriser off (``NUMBA_SLP_VECTORIZE=0``, read per
    compilation); the blocked kernels need it, so it is on while they compile (eagerly, under a
    lock) and restored after: other numba code in the process is unaffected."""
    with _SLP_LOCK:
        saved = numba.config.SLP_VECTORIZE
        numba.config.SLP_VECTORIZE = 1
        try:
            yield
        finally:
            numba.config.SLP_VECTORIZE = saved


_SLP_LOCK = threading.Lock()
#: block widths of the M > 1 kernels (the caller pads M to a multiple of the chosen one)
BLOCK_WIDTHS = (4, 8, 16, 32, 64)


def block_width(m: int) -> int:
    """The block width for ``m`` rows: the smallest of :data:`BLOCK_WIDTHS` that holds them, else the largest."""
    return next((w for w in BLOCK_WIDTHS if m <= w), BLOCK_WIDTHS[-1])


# dense unpackers for the dense-from-unpacked path
def _bf16_bits(v):
    # float32 -> bf16 bits, round to nearest even, in int32 with each step truncated back to it
    # (numba types integer arithmetic as 64-bit; this keeps 16 lanes per vector: the int4 tile
    # decoder ran 2x faster). The bits are those of the uint32 formula: the add wraps alike and
    # the low 16 bits of the shift do not depend on its fill
    b = np.float32(v).view(np.int32)
    lsb = np.int32(np.int32(b >> np.int32(16)) & np.int32(1))
    return np.uint16(np.int32(np.int32(b + np.int32(0x7FFF) + lsb) >> np.int32(16)))


def _int8_unpack_bf16(q, scale, out):
    n, k = q.shape
    for r in prange(n):
        s = scale[r]
        for j in range(k):
            out[r, j] = _bf16_bits_j(np.float32(q[r, j]) * s)


def _int4_unpack_bf16(qw, scales, zeros, group, out):
    n, kh = qw.shape
    for r in prange(n):
        for b in range(kh):
            gi = (2 * b) // group
            s = scales[r, gi]
            z = zeros[r, gi]
            byte = qw[r, b]
            out[r, 2 * b] = _bf16_bits_j((np.float32(byte & 15) - z) * s)
            out[r, 2 * b + 1] = _bf16_bits_j((np.float32(byte >> 4) - z) * s)


def _lut8_unpack(codes, lut, scale, out):
    n, k = codes.shape
    for r in prange(n):
        s = scale[r]
        for j in range(k):
            out[r, j] = lut[codes[r, j]] * s


def _int4_unpack(qw, scales, zeros, group, out):
    n, kh = qw.shape
    for r in prange(n):
        for b in range(kh):
            gi = (2 * b) // group
            s = scales[r, gi]
            z = zeros[r, gi]
            byte = qw[r, b]
            out[r, 2 * b] = (np.float32(byte & 15) - z) * s
            out[r, 2 * b + 1] = (np.float32(byte >> 4) - z) * s


def _sp24_unpack(values, meta, out):
    n, half = values.shape
    for r in prange(n):
        for g in range(half // 2):
            nib = (meta[r, g >> 1] >> ((g & 1) * 4)) & 15
            for t in range(4):
                out[r, 4 * g + t] = 0.0
            out[r, 4 * g + (nib & 3)] = values[r, 2 * g]
            out[r, 4 * g + (nib >> 2)] = values[r, 2 * g + 1]


def _s24i4_unpack(qv, scales, zeros, meta, half_group, out):
    n = qv.shape[0]
    nkept = qv.shape[1] * 2
    for r in prange(n):
        for jj in range(0, nkept, 2):
            grp = jj >> 1
            gi = jj // half_group
            s = scales[r, gi]
            z = zeros[r, gi]
            nib = (meta[r, grp >> 1] >> ((grp & 1) * 4)) & 15
            for t in range(4):
                out[r, 4 * grp + t] = 0.0
            byte = qv[r, jj >> 1]
            out[r, 4 * grp + (nib & 3)] = (np.float32(byte & 15) - z) * s
            out[r, 4 * grp + (nib >> 2)] = (np.float32(byte >> 4) - z) * s


_BODIES = {name[1:]: fn for name, fn in dict(globals()).items()
           if name.startswith("_") and callable(fn) and name.split("_")[1] in ("sp24", "s24i4", "lut8", "int4", "int8", "fp8")
           and not name.endswith(("_for", "_value", "_terms"))}
_PARALLEL_OK = {name for name in _BODIES if "_fwd" in name or name.endswith("unpack") or "unpack_" in name}
_COMPILED: dict = {}

if numba is not None:
    _bf16_bits_j = njit(inline="always", cache=True)(_bf16_bits)
    _fp8_value_j = njit(inline="always", cache=True)(_fp8_value)
    _acc_lanes_j = njit(inline="always", cache=True)(_acc_lanes)
    _kept_lanes_j = njit(inline="always", cache=True)(_kept_lanes)
    _sp24_terms_j = njit(inline="always", cache=True)(_sp24_terms)
    _row_scale_j = njit(inline="always", cache=True)(_row_scale)


def kernel(name: str, parallel: bool = False, half_group: int | None = None):
    """The compiled kernel ``name`` (e.g. ``"sp24_fwd1"``; ``"s24i4_fwd1"`` needs ``half_group``,
    the kept values per scale group). ``parallel`` applies to the
    row-parallel (forward, unpack) kernels only; gradient kernels scatter into a shared dX."""
    if numba is None:
        raise RuntimeError("numba is not installed; use robcomp.kernels.reference")
    parallel = bool(parallel) and (name in _PARALLEL_OK or name == "s24i4_fwd1" or "_fwdb" in name or "_bwdb" in name
                                   or "_fwdm" in name)
    key = (name, parallel, half_group)
    fn = _COMPILED.get(key)
    if fn is None:
        blocked = re.fullmatch(r"(sp24|s24i4|int8|i8i8)_(fwd|bwd)b(\d+)", name)  # e.g. "sp24_fwdb16"
        few = re.fullmatch(r"(sp24|s24i4|fp8)_(fwd|bwd)m(\d)", name)  # e.g. "sp24_fwdm3"
        if few:  # s24i4 specialised per group size, as s24i4_fwd1
            fn = _compile_few_rows(few[1], few[2], int(few[3]), bool(parallel), half_group)
        elif blocked:
            fn = _compile_blocked(blocked[1], blocked[2], int(blocked[3]), bool(parallel))
        elif name == "s24i4_fwd1":  # specialised per group size (a closure: not cached on disk)
            fn = njit(parallel=parallel, cache=False, fastmath=_FM, nogil=True)(_s24i4_fwd1_for(half_group))
        else:
            fn = njit(parallel=parallel, cache=True, fastmath=_FM, nogil=True)(_BODIES[name])
        _COMPILED[key] = fn
    return fn


# ----------------------------------------------------------------------- packing, batch-1 GEMV
if numba is not None:
    @njit(parallel=True, cache=True, fastmath=False)
    def _int4_pack_kernel(w, group, packed, scales, zeros):
        n, k = w.shape
        ng = k // group
        for r in prange(n):
            for g in range(ng):
                lo = 0.0
                hi = 0.0
                for j in range(g * group, (g + 1) * group):
                    v = w[r, j]
                    if v < lo:
                        lo = v
                    if v > hi:
                        hi = v
                s = (hi - lo) / 15.0
                if s < 1e-12:
                    s = 1e-12
                s = np.float64(np.float32(s))  # scales are stored in fp32: quantise with the stored one
                z = np.round(-lo / s)
                z = min(max(z, 0.0), 15.0)
                scales[r, g] = s
                zeros[r, g] = z
                for j in range(g * group, (g + 1) * group, 2):
                    q0 = min(max(np.round(w[r, j] / s) + z, 0.0), 15.0)
                    q1 = min(max(np.round(w[r, j + 1] / s) + z, 0.0), 15.0)
                    packed[r, j // 2] = np.uint8(int(q0) | (int(q1) << 4))

    @njit(parallel=True, cache=True, fastmath=True)
    def _int4_gemv_kernel(x, packed, scales, zeros, group, out):
        n = packed.shape[0]
        kh = packed.shape[1]
        half_g = group // 2
        for r in prange(n):
            acc = np.float32(0.0)
            for g in range(kh // half_g):
                s = scales[r, g]
                z = zeros[r, g]
                part = np.float32(0.0)
                xs = np.float32(0.0)
                for b in range(g * half_g, (g + 1) * half_g):
                    byte = packed[r, b]
                    x0 = x[2 * b]
                    x1 = x[2 * b + 1]
                    part += np.float32(byte & 15) * x0 + np.float32(byte >> 4) * x1
                    xs += x0 + x1
                acc += (part - z * xs) * s
            out[r] = acc

    @njit(parallel=True, cache=True, fastmath=True)
    def _int8_gemv_kernel(x, q, scale, out):
        n, k = q.shape
        for r in prange(n):
            acc = np.float32(0.0)
            for j in range(k):
                acc += np.float32(q[r, j]) * x[j]
            out[r] = acc * scale[r]


def _need():
    if numba is None:
        raise RuntimeError("numba is not installed; use robcomp.kernels.reference")


def int4_pack(weight: torch.Tensor, group_size: int = 128):
    """``reference.int4_pack`` for float32 CPU weights, in parallel (same codes, fp32 scales)."""
    _need()
    from robcomp.kernels.reference import _check_group, check_weight
    check_weight(weight)
    if weight.dtype != torch.float32 or weight.device.type != "cpu":
        raise TypeError("numba int4_pack takes a float32 CPU weight")
    n, k = weight.shape
    _check_group(k, group_size)
    w = weight.detach().to(torch.float64).numpy()
    packed = np.empty((n, k // 2), np.uint8)
    scales = np.empty((n, k // group_size), np.float64)
    zeros = np.empty((n, k // group_size), np.float64)
    _int4_pack_kernel(w, group_size, packed, scales, zeros)
    return (torch.from_numpy(packed), torch.from_numpy(scales).to(torch.float32),
            torch.from_numpy(zeros).to(torch.float32))


def int4_gemv(x: torch.Tensor, packed, scales, zeros, group_size: int, bias=None) -> torch.Tensor:
    """Batch-1 ``x [K] @ dequant(W).T`` on CPU (float32); no autograd."""
    _need()
    out = np.empty(packed.shape[0], np.float32)
    _int4_gemv_kernel(x.detach().float().contiguous().numpy(), packed.numpy(), scales.float().numpy(),
                      zeros.float().numpy(), group_size, out)
    y = torch.from_numpy(out)
    return y if bias is None else y + bias.float()


def int8_gemv(x: torch.Tensor, qweight, scale, bias=None) -> torch.Tensor:
    """Batch-1 ``x [K] @ (q * scale).T`` on CPU (float32); no autograd."""
    _need()
    out = np.empty(qweight.shape[0], np.float32)
    _int8_gemv_kernel(x.detach().float().contiguous().numpy(), qweight.numpy(), scale.float().numpy(), out)
    y = torch.from_numpy(out)
    return y if bias is None else y + bias.float()
