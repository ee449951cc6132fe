"""numba kernels that decode rows ``[r0, r1)`` of a packed weight into a bf16 tile (uint16
bits), for the ``bf16_tiles`` path (``kernels/bf16_tiles.py``); row-parallel (``prange``) builds
for multi-threaded runs.

* int8 and fp8 codes are written exactly (both fit bf16's 8 significant bits);
* ``sp24_f32`` writes an exact float32 tile of a 2:4 weight (the 2:4 input gradient at large M);
* int4, 2:4 and 2:4+int4 write ``(q - z) * s`` / the kept value rounded to nearest even, the 2:4
  formats expanded with zeros (a group's four bf16 lanes packed in one ``uint64`` store).
"""
from __future__ import annotations

import numpy as np

from robcomp.kernels import numba_cpu as NB

try:
    from numba import njit, prange
except Exception:  # pragma: no cover - numba is a declared dependency
    njit = None

__all__ = ["decoder", "KINDS"]

_FM = {"reassoc", "contract"}


# Loops index row (and scale-group) slices from 0: LLVM vectorises those; an inner
# ``range(start, stop)`` over a row's columns stayed scalar (8-20x slower, measured)
def _int8_tile(q, r0, r1, out):
    # int8 codes are exact in bf16: truncating the float32 bits loses nothing
    for r in prange(r0, r1):
        src, dst = q[r], out[r - r0]
        for j in range(src.shape[0]):
            dst[j] = np.uint16(np.float32(src[j]).view(np.uint32) >> np.uint32(16))


def _fp8_tile(codes, r0, r1, out):
    # exact e4m3 values (numba_cpu's bit decoding, times its 2**120), subnormals included. The NaN
    # codes (0x7F, 0xFF) would decode as 480: callers check ``fp8_has_nan`` once per weight (a
    # select here halves the speed)
    for r in prange(r0, r1):
        for j in range(codes.shape[1]):
            v = np.float32(NB._fp8_value_j(codes[r, j]) * np.float32(2.0 ** 120))
            out[r - r0, j] = np.uint16(v.view(np.uint32) >> np.uint32(16))


def _int4_tile(qw, scales, zeros, group, r0, r1, out32):
    # one byte (k = 2b low nibble, 2b + 1 high) -> one uint32 of two bf16
    hg = group // 2
    for r in prange(r0, r1):
        for gi in range(scales.shape[1]):
            s = scales[r, gi]
            zs = zeros[r, gi] * s
            src, dst = qw[r, gi * hg:(gi + 1) * hg], out32[r - r0, gi * hg:(gi + 1) * hg]
            for b in range(hg):  # int32 steps, truncated back: 16 lanes (see numba_cpu._bf16_bits)
                byte = np.int32(src[b])
                lo = np.int32(_rne_j(np.float32(np.int32(byte & np.int32(15))) * s - zs))
                hi = np.int32(_rne_j(np.float32(np.int32(byte >> np.int32(4))) * s - zs))
                dst[b] = np.uint32(np.int32(lo | np.int32(hi << np.int32(16))))

def _expand(nib, b0, b1):
    # a 2:4 group's kept pair (lanes i0 < i1 in the meta nibble) -> four bf16 lanes in a uint64
    i0 = nib & np.uint32(3)
    i1 = nib >> np.uint32(2)
    z = np.uint64(0)
    w0 = b0 if i0 == 0 else z
    w1 = b1 if i1 == 1 else (b0 if i0 == 1 else z)
    w2 = b1 if i1 == 2 else (b0 if i0 == 2 else z)
    w3 = b1 if i1 == 3 else z
    return w0 | (w1 << np.uint64(16)) | (w2 << np.uint64(32)) | (w3 << np.uint64(48))

def _sp24_tile(values, meta, r0, r1, out64):
    # per meta byte j: groups 2j (low nibble) and 2j + 1 (high nibble)
    for r in prange(r0, r1):
        v, m, dst = values[r], meta[r], out64[r - r0]
        for j in range(m.shape[0]):
            mb = np.uint32(m[j])
            dst[2 * j] = _expand_j(mb & np.uint32(15), np.uint64(_rne_j(v[4 * j])), np.uint64(_rne_j(v[4 * j + 1])))
            dst[2 * j + 1] = _expand_j(mb >> np.uint32(4), np.uint64(_rne_j(v[4 * j + 2])),
                                       np.uint64(_rne_j(v[4 * j + 3])))

def _sp24_tile_f32(values_u32, meta, r0, r1, out2):
    # float32 tile (exact): a group's four lanes as two uint64 of float32 bits, per meta byte
    for r in prange(r0, r1):
        v, m, dst = values_u32[r], meta[r], out2[r - r0]
        for j in range(m.shape[0]):
            mb = np.uint32(m[j])
            for h in range(2):
                nib = (mb >> np.uint32(4 * h)) & np.uint32(15)
                i0 = nib & np.uint32(3)
                i1 = nib >> np.uint32(2)
                b0 = np.uint64(v[4 * j + 2 * h])
                b1 = np.uint64(v[4 * j + 2 * h + 1])
                z = np.uint64(0)
                w0 = b0 if i0 == 0 else z
                w1 = b1 if i1 == 1 else (b0 if i0 == 1 else z)
                w2 = b1 if i1 == 2 else (b0 if i0 == 2 else z)
                w3 = b1 if i1 == 3 else z
                dst[4 * j + 2 * h] = w0 | (w1 << np.uint64(32))
                dst[4 * j + 2 * h + 1] = w2 | (w3 << np.uint64(32))


def _s24i4_tile(qv, scales, zeros, meta, half_group, r0, r1, out64):
    # per scale group (half_group kept values = half_group / 2 groups = half_group / 4 meta bytes)
    gps = half_group // 2
    for r in prange(r0, r1):
        for gi in range(scales.shape[1]):
            s = scales[r, gi]
            zs = zeros[r, gi] * s
            q = qv[r, gi * gps:(gi + 1) * gps]
            m = meta[r, gi * (gps // 2):(gi + 1) * (gps // 2)]
            dst = out64[r - r0, gi * gps:(gi + 1) * gps]
            for j in range(m.shape[0]):
                mb = np.uint32(m[j])
                c0 = np.int32(q[2 * j])
                c1 = np.int32(q[2 * j + 1])
                dst[2 * j] = _expand_j(mb & np.uint32(15),
                                       np.uint64(_rne_j(np.float32(np.int32(c0 & np.int32(15))) * s - zs)),
                                       np.uint64(_rne_j(np.float32(np.int32(c0 >> np.int32(4))) * s - zs)))
                dst[2 * j + 1] = _expand_j(mb >> np.uint32(4),
                                           np.uint64(_rne_j(np.float32(np.int32(c1 & np.int32(15))) * s - zs)),
                                           np.uint64(_rne_j(np.float32(np.int32(c1 >> np.int32(4))) * s - zs)))


_rne_j = NB._bf16_bits_j  # float32 -> bf16 bits, round to nearest even
if njit is not None:
    _expand_j = njit(inline="always", cache=True)(_expand)
_BODIES = {"int8": _int8_tile, "fp8": _fp8_tile, "int4": _int4_tile, "sp24": _sp24_tile, "s24i4": _s24i4_tile,
           "sp24_f32": _sp24_tile_f32}
_COMPILED: dict = {}
#: the weight formats with a tile decoder
KINDS = tuple(_BODIES)


def decoder(kind: str, parallel: bool):
    """The compiled decoder of ``kind`` (one of :data:`KINDS`): ``(*weights, r0, r1, out)``."""
    key = (kind, parallel)
    if key not in _COMPILED:
        _COMPILED[key] = njit(parallel=parallel, fastmath=_FM, nogil=True, boundscheck=False,
                              cache=True)(_BODIES[kind])
    return _COMPILED[key]
