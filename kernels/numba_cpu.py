"""numba CPU kernels that compute straight from robcomp's packed formats (kernels/reference.py).

Each kernel streams the packed weight row by row (one output feature ``n`` at a time), so a
memory-bound product reads only the stored bytes: 2:4 reads the kept values and 2-bit metadata
(~half of dense), 2:4+int4 its nibbles, fp8 one byte per weight. Activations are float32;
accumulation is float32 (``fastmath`` is limited to reassociation and FMA contraction, so NaN and
Inf still propagate).

* ``*_fwd1`` (batch 1): the 2:4 kernels take ``x`` by lane, ``xp[t, g] = x[4 g + t]``, and expand
  each group's kept pair to its four lanes with selects, so the loop over groups vectorises with
  contiguous loads (no gathers). The 2:4+int4 kernel is specialised per group size.
* ``*_fwdm`` (2:4 formats, M > 1): ``xt [K, M]``, one axpy of length M per kept value. numba does
  not vectorise these loops well (scalar FMAs), so the dispatch prefers BLAS on the unpacked
  weight above batch 1 unless ``robcomp.tune`` measures otherwise.
* ``*_bwd1``: ``dX = dY W`` at batch 1 from the packed weight; larger batches use BLAS on the
  weight unpacked by the ``*_unpack`` kernels (float32, or bf16 bits for the weight-only formats'
  dense path, rounded to nearest even).

Forward and unpack kernels exist in a serial and a ``parallel=True`` (``prange`` over rows) build;
``kernels.cpu`` picks the parallel one when torch runs with more than one thread. Gradient
kernels scatter into a shared dX and are serial. Also here: fast int4 packing of large weights and
the older batch-1 int4/int8 GEMV helpers.
"""
from __future__ import annotations

import numpy as np
import torch

try:
    import numba
    from numba import njit, prange
except Exception:  # pragma: no cover - numba is a declared dependency
    numba = None

__all__ = ["available", "int4_pack", "int4_gemv", "int8_gemv", "kernel"]

_FM = {"reassoc", "contract"}


def available() -> bool:
    return numba is not None


# ----------------------------------------------------------------------------- kernel bodies
# Plain Python functions, compiled below in the variants used. ``_blocked(B)`` builds the
# ``M > 1`` kernels for a fixed block of B columns of ``xt``/``gt`` (padded to a multiple of B by
# the caller): a constant trip count lets LLVM keep the B accumulators in one vector register.
def _sp24_fwd1(xp, values, meta, out):
    # batch 1, x given by lane: xp[t, g] = x[4 g + t]. Each group's kept pair is expanded to its 4
    # lanes with selects (no gathers) and one meta byte (two groups) is decoded per step: the
    # loop vectorises over groups with contiguous loads
    n = values.shape[0]
    for r in prange(n):
        a0 = np.float32(0.0)
        a1 = np.float32(0.0)
        a2 = np.float32(0.0)
        a3 = np.float32(0.0)
        for j in range(meta.shape[1]):
            byte = np.int32(meta[r, j])
            for h in range(2):
                g = 2 * j + h
                nib = (byte >> (4 * h)) & 15
                i0 = nib & 3
                i1 = nib >> 2
                v0 = values[r, 2 * g]
                v1 = values[r, 2 * g + 1]
                a0 += (v0 if i0 == 0 else np.float32(0.0)) * xp[0, g]
                a1 += (v1 if i1 == 1 else (v0 if i0 == 1 else np.float32(0.0))) * xp[1, g]
                a2 += (v1 if i1 == 2 else (v0 if i0 == 2 else np.float32(0.0))) * xp[2, g]
                a3 += (v1 if i1 == 3 else np.float32(0.0)) * xp[3, g]
        out[r] = a0 + a1 + a2 + a3


def _sp24_bwd1(g, values, meta, dxp):
    # dX by lane (dxp[t, grp] = dX[4 grp + t]): one axpy of the expanded row per output feature
    n = values.shape[0]
    for r in range(n):
        gr = g[r]
        for grp in range(dxp.shape[1]):
            nib = (np.int32(meta[r, grp >> 1]) >> ((grp & 1) << 2)) & 15
            i0 = nib & 3
            i1 = nib >> 2
            v0 = values[r, 2 * grp] * gr
            v1 = values[r, 2 * grp + 1] * gr
            dxp[0, grp] += v0 if i0 == 0 else np.float32(0.0)
            dxp[1, grp] += v1 if i1 == 1 else (v0 if i0 == 1 else np.float32(0.0))
            dxp[2, grp] += v1 if i1 == 2 else (v0 if i0 == 2 else np.float32(0.0))
            dxp[3, grp] += v1 if i1 == 3 else np.float32(0.0)


def _s24i4_fwd1_for(half_group):
    """The batch-1 2:4+int4 kernel for one group size: as ``_sp24_fwd1`` with codes ``q - z``
    summed per scale group; the constant trip count (``half_group / 4`` meta bytes) lets the inner
    loop vectorise."""
    nbytes = half_group // 4

    def s24i4_fwd1(xp, qv, scales, zeros, meta, hg, out):
        n = qv.shape[0]
        for r in prange(n):
            acc = np.float32(0.0)
            for gi in range(scales.shape[1]):
                z = zeros[r, gi]
                a0 = np.float32(0.0)
                a1 = np.float32(0.0)
                a2 = np.float32(0.0)
                a3 = np.float32(0.0)
                for jj in range(nbytes):
                    j = gi * nbytes + jj
                    byte = np.int32(meta[r, j])
                    for h in range(2):
                        g = 2 * j + h
                        nib = (byte >> (4 * h)) & 15
                        i0 = nib & 3
                        i1 = nib >> 2
                        code = np.int32(qv[r, g])
                        v0 = np.float32(code & 15) - z
                        v1 = np.float32(code >> 4) - z
                        a0 += (v0 if i0 == 0 else np.float32(0.0)) * xp[0, g]
                        a1 += (v1 if i1 == 1 else (v0 if i0 == 1 else np.float32(0.0))) * xp[1, g]
                        a2 += (v1 if i1 == 2 else (v0 if i0 == 2 else np.float32(0.0))) * xp[2, g]
                        a3 += (v1 if i1 == 3 else np.float32(0.0)) * xp[3, g]
                acc += (a0 + a1 + a2 + a3) * scales[r, gi]
            out[r] = acc
    return s24i4_fwd1


def _s24i4_bwd1(g, qv, scales, zeros, meta, half_group, dxp):
    # as _sp24_bwd1 (dX by lane), kept values (q - z) * s
    n = qv.shape[0]
    nbytes = half_group // 4
    for r in range(n):
        for gi in range(scales.shape[1]):
            s = scales[r, gi] * g[r]
            z = zeros[r, gi]
            for j in range(gi * nbytes, (gi + 1) * nbytes):
                byte = np.int32(meta[r, j])
                for h in range(2):
                    grp = 2 * j + h
                    nib = (byte >> (4 * h)) & 15
                    i0 = nib & 3
                    i1 = nib >> 2
                    code = np.int32(qv[r, grp])
                    v0 = (np.float32(code & 15) - z) * s
                    v1 = (np.float32(code >> 4) - z) * s
                    dxp[0, grp] += v0 if i0 == 0 else np.float32(0.0)
                    dxp[1, grp] += v1 if i1 == 1 else (v0 if i0 == 1 else np.float32(0.0))
                    dxp[2, grp] += v1 if i1 == 2 else (v0 if i0 == 2 else np.float32(0.0))
                    dxp[3, grp] += v1 if i1 == 3 else np.float32(0.0)


def _int8_bwd1(g, q, dx):
    # int8 codes converted directly (no table): vectorises as widen + convert + FMA
    n, k = q.shape
    for r in range(n):
        gr = g[r]
        for j in range(k):
            dx[j] += np.float32(q[r, j]) * gr


def _int8_quantize_rows(x, q, scale):
    # reference.quantize_rows_int8: s = max(|x|, 1e-12) / 127, q = round half away (x / s)
    m, k = x.shape
    for i in range(m):
        amax = np.float32(0.0)
        for j in range(k):
            a = abs(x[i, j])
            if a > amax or a != a:  # a NaN sticks, as in torch's amax: the row's output is NaN
                amax = a
        s = (amax if not amax < np.float32(1e-12) else np.float32(1e-12)) / np.float32(127.0)
        scale[i] = s
        for j in range(k):
            v = x[i, j] / s
            r = np.floor(v + np.float32(0.5)) if v >= 0 else np.ceil(v - np.float32(0.5))
            q[i, j] = np.int8(min(max(r, np.float32(-127.0)), np.float32(127.0)))


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


def _int4_bwd1(g, qw, scales, zeros, group, dx2):
    # dX of even / odd k in two planes (dx2[0, b] = dX[2 b], dx2[1, b] = dX[2 b + 1]); the zero
    # point folded per group: (q - z) s g = q (s g) - z s g
    n, kh = qw.shape
    hg = group // 2
    for r in range(n):
        gr = g[r]
        for gi in range(kh // hg):
            sg = scales[r, gi] * gr
            zs = zeros[r, gi] * sg
            for b in range(gi * hg, (gi + 1) * hg):
                byte = np.int32(qw[r, b])
                dx2[0, b] += np.float32(byte & 15) * sg - zs
                dx2[1, b] += np.float32(byte >> 4) * sg - zs


def _sp24_fwdm(xt, values, meta, out):
    n, half = values.shape
    m = xt.shape[1]
    for r in prange(n):
        for g in range(half // 2):
            nib = (meta[r, g >> 1] >> ((g & 1) * 4)) & 15
            k0 = 4 * g + (nib & 3)
            k1 = 4 * g + (nib >> 2)
            v0 = values[r, 2 * g]
            v1 = values[r, 2 * g + 1]
            for j in range(m):
                out[r, j] += v0 * xt[k0, j] + v1 * xt[k1, j]


def _s24i4_fwdm(xt, qv, scales, zeros, meta, half_group, out):
    n = qv.shape[0]
    m = xt.shape[1]
    for r in prange(n):
        for grp in range(qv.shape[1]):
            gi = (2 * grp) // half_group
            s = scales[r, gi]
            z = zeros[r, gi]
            nib = (meta[r, grp >> 1] >> ((grp & 1) * 4)) & 15
            k0 = 4 * grp + (nib & 3)
            k1 = 4 * grp + (nib >> 2)
            byte = qv[r, grp]
            v0 = (np.float32(byte & 15) - z) * s
            v1 = (np.float32(byte >> 4) - z) * s
            for j in range(m):
                out[r, j] += v0 * xt[k0, j] + v1 * xt[k1, j]


# dense unpackers for the dense-from-unpacked path
def _bf16_bits(v):
    b = np.float32(v).view(np.uint32)
    return np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


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
           if name.startswith("_") and callable(fn) and name.split("_")[1] in ("sp24", "s24i4", "lut8", "int4", "int8")
           and not name.endswith("_for")}
_PARALLEL_OK = {name for name in _BODIES if "_fwd" in name or name.endswith("unpack") or "unpack_" in name}
_COMPILED: dict = {}

if numba is not None:
    _bf16_bits_j = njit(inline="always", cache=True)(_bf16_bits)


def kernel(name: str, parallel: bool = False, half_group: int | None = None):
    """The compiled kernel ``name`` (e.g. ``"sp24_fwd1"``; ``"s24i4_fwd1"`` needs ``half_group``,
    the kept values per scale group). ``parallel`` applies to the
    row-parallel (forward, unpack) kernels only; gradient kernels scatter into a shared dX."""
    if numba is None:
        raise RuntimeError("numba is not installed; use robcomp.kernels.reference")
    parallel = bool(parallel) and (name in _PARALLEL_OK or name == "s24i4_fwd1")
    key = (name, parallel, half_group)
    fn = _COMPILED.get(key)
    if fn is None:
        if name == "s24i4_fwd1":  # specialised per group size (a closure: not cached on disk)
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
