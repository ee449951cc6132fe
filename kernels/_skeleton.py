"""One weight-streaming matmul skeleton shared by every compressed-weight format.

Every weight-only format (int8 per channel, int4 grouped, 2:4 fp, 2:4 + int4) runs the same three
``@triton.jit`` kernels; a ``tl.constexpr`` ``FORMAT`` selects the weight loader, so the branches
of the other formats compile away:

``gemv_kernel`` (``M <= SMALL_M``)
    fp32 FMA, no tensor cores. Each program owns ``BLOCK_N`` output columns and one K slice
    (split-K: ``grid = (N tiles, SPLIT)``). Products accumulate in an fp32 register tile
    ``[BLOCK_M, BLOCK_N, BLOCK_K]`` (2:4: ``BLOCK_K/4`` per kept pair) that is reduced ONCE, after
    the K loop. The 2:4 formats multiply in the compressed domain: each kept value selects its
    activation among the 4 of its group (register selects, no zeros multiplied). With
    ``SPLIT > 1`` the programs ``tl.atomic_add`` their fp32 partials into one zeroed fp32 buffer
    (one kernel; the host casts to the activation dtype when that is not fp32); the launcher only
    splits when no narrower tile fills the GPU alone (``fill_or_split``), so most small-M calls
    are one launch. The int4 formats read their codes as int32 words and multiply x by
    ``1 + q/16`` without a per-weight dequantisation (``int4_gemv_step``, ``s24i4_gemv_row``);
    2:4 + int4 with fp16 activations at M = 1 instead works on packed half2 registers
    (``s24i4_gemv_h2``, ``_packed``): a byte permute selects each kept pair's two activations by
    its metadata, the kept pair becomes exact fp16 ``(q - z) * s`` (magic numbers, one FMA, one
    multiply), and the products accumulate in fp16 lanes per code word before fp32 (about 3
    instructions per dense weight per thread instead of 6.4).
``gemm_kernel`` (larger M)
    grouped tile order, the weight tile dequantised in registers and fed to ``tl.dot`` (tensor
    cores for fp16/bf16, exact IEEE fp32 dots for fp32), fp32 accumulator, per-channel scale and
    bias in the epilogue. Small M (``<= 64``) runs narrow tiles chosen by the launcher with the
    same split-K + atomics; large M is autotuned over ``GEMM_LARGE``.
``dx_kernel``
    the input gradient ``dX = dY @ dequant(W)`` from the same packed weight (no transposed copy);
    output tile ``[BLOCK_M, BLOCK_K]``, loop (and split) over N. Per-channel formats scale the
    ``dY`` tile by ``scale[n]`` and multiply the raw codes.

Techniques: every row offset is int64 (``row_offsets``), so ``M*K``, ``N*K``, ``M*N`` >= 2**31 do
not wrap; codes are read as contiguous K runs (int4 ``[N, K/2]``: 64 codes per row and tile in
32 bytes; 2:4 metadata ``[N, K/8]``: ``BLOCK_K/8`` bytes per row, split into nibbles with
``tl.join``); integer codes become floats without an int-to-float conversion where the dtype allows
(the magic-number trick: ``(q | 0x6400)`` read as fp16 is ``1024 + q``, ``(q | 0x4B000000)`` read as
fp32 is ``2**23 + q``); the bias is subtracted together with the zero point,
``w = (h - (1024 + zero)) * scale`` (exact subtraction, one rounding, as the reference) in fp16
tiles; fp32 tiles (the GEMVs, fp32 and bf16 activations) shift an int4 code into the mantissa of
1.0 and dequantise with one FMA, the zero folded in: ``(1 + q/16) * 16s - (16 + z) s``.
bf16 tiles are dequantised in fp32 and cast (the bf16 bit trick would need ``q < 128`` and the
interpreter cannot bitcast bf16).

Host side: the config tables (one per regime), the launcher's choice of config and split-K for
small M, one builder of ``robcomp.kernels._aot`` specs, one factory of ``torch.library`` ops with
the same frozen-weight rule everywhere, and the ``perf_cases`` records for the static model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from . import _packed as _pk
from ._common import interpreting, tuning_configs

# ---------------------------------------------------------------------------- formats (constexpr)
INT8 = tl.constexpr(0)    # int8 codes [N, K], per-output-channel scale [N]
FP8 = tl.constexpr(1)     # float8_e4m3fn codes [N, K], per-channel scale [N] (input gradient only)
INT4 = tl.constexpr(2)    # uint8 [N, K/2] two codes per byte, scales/zeros [N, K/G]
S24 = tl.constexpr(3)     # 2:4 values [N, K/2] (float), meta uint8 [N, K/8]
S24I4 = tl.constexpr(4)   # 2:4 + int4: codes uint8 [N, K/4], meta [N, K/8], scales/zeros [N, K/G]

FORMAT_NAMES = {0: "int8", 1: "fp8", 2: "int4", 3: "s24", 4: "s24i4"}
PER_CHANNEL = (0, 1)
GROUPED = (2, 4)
SPARSE = (3, 4)

#: largest M served by ``gemv_kernel``
SMALL_M = 4
#: largest M of the launcher-chosen narrow tiles with split-K (above: autotuned large tiles)
MEDIUM_M = 64


# ============================================================================ jit helpers
@triton.jit
def row_offsets(offs, stride):
    """int64 element offsets ``offs * stride`` of whole rows: no int32 wrap past 2**31 elements."""
    return offs.to(tl.int64) * stride


@triton.jit
def tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped (L2-friendly) order of the output tiles of an ``M x N`` output."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def split_range(pid_s, SPLIT, L, BLOCK: tl.constexpr):
    """``[lo, hi)`` of split ``pid_s`` of a reduction of length ``L``; ``lo`` a multiple of BLOCK,
    so no tile straddles two splits (nor an int4 group)."""
    per = tl.cdiv(tl.cdiv(L, SPLIT), BLOCK) * BLOCK
    lo = pid_s * per
    return lo, tl.minimum(L, lo + per)


@triton.jit
def _biased(u, DQ: tl.constexpr):
    """Unsigned codes ``u`` (0..255) as ``MAGIC + u`` in DQ (fp16 or fp32) by an OR and a bitcast."""
    if DQ == tl.float16:
        return (u.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)
    else:
        return (u.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _magic_zero(z, DQ: tl.constexpr):
    """``MAGIC + zero``: subtracting it from ``_biased(q)`` gives ``q - zero`` exactly."""
    if DQ == tl.float16:
        return z + 1024.0
    else:
        return z + 8388608.0


@triton.jit
def _int8_codes(q, DQ: tl.constexpr):
    """Signed int8 codes as DQ without I2F: ``(q + 0x6480)`` read as fp16 is ``1152 + q``."""
    if DQ == tl.float16:
        return (q.to(tl.int16) + 0x6480).to(tl.float16, bitcast=True) - 1152.0
    else:
        return (q.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def _group_scale(s_ptr, z_ptr, rows, n_mask, k0, stride_sn, GROUP_SIZE: tl.constexpr, DQ: tl.constexpr):
    """Scale and ``MAGIC + zero`` of the group holding column ``k0`` for each row (one per tile)."""
    g = k0 // GROUP_SIZE
    s = tl.load(s_ptr + rows * stride_sn + g, mask=n_mask, other=0.0).to(DQ)
    z = tl.load(z_ptr + rows * stride_sn + g, mask=n_mask, other=0.0).to(DQ)
    return s, _magic_zero(z, DQ)


@triton.jit
def _int4_fp32_pair(q, s_ptr, z_ptr, rows, n_mask, k0, stride_sn, GROUP_SIZE: tl.constexpr):
    """fp32 values of the low and high codes of the bytes ``q``: each code shifted into the
    mantissa of 1.0 (``1 + q/16``, no I2F), then one FMA with the zero folded in:
    ``(1 + q/16) * 16s - (16 + z) s = (q - z) s``. 16s is exact, so the only roundings are those of
    ``(16 + z) s`` and of the fused result (the magic-number form needs a subtract and a multiply)."""
    g = k0 // GROUP_SIZE
    s = tl.load(s_ptr + rows * stride_sn + g, mask=n_mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + rows * stride_sn + g, mask=n_mask, other=0.0).to(tl.float32)
    s16 = (16.0 * s)[:, None]
    c = ((16.0 + z) * s)[:, None]
    q32 = q.to(tl.int32)
    lo = ((((q32 & 0xF) << 19) | 0x3F800000).to(tl.float32, bitcast=True)) * s16 - c
    hi = ((((q32 & 0xF0) << 15) | 0x3F800000).to(tl.float32, bitcast=True)) * s16 - c
    return lo, hi


@triton.jit
def _int4_pair(q, s_ptr, z_ptr, rows, n_mask, k0, stride_sn, GROUP_SIZE: tl.constexpr, DQ: tl.constexpr):
    """Dequantised low and high codes of the bytes ``q`` in DQ (fp32: one FMA each; fp16: the
    magic-number form, exact subtraction then one multiply)."""
    if DQ == tl.float32:
        lo, hi = _int4_fp32_pair(q, s_ptr, z_ptr, rows, n_mask, k0, stride_sn, GROUP_SIZE)
    else:
        s, zb = _group_scale(s_ptr, z_ptr, rows, n_mask, k0, stride_sn, GROUP_SIZE, DQ)
        lo = (_biased(q & 0xF, DQ) - zb[:, None]) * s[:, None]
        hi = (_biased(q >> 4, DQ) - zb[:, None]) * s[:, None]
    return lo, hi


@triton.jit
def _nibble(wd, J: tl.constexpr, mant):
    """``1 + q/16`` (fp32) of nibble ``J`` (bits ``4J..4J+3``) of int32 words: the code moved into
    the top mantissa bits of 1.0 by one shift and one AND-OR (no byte extraction, no I2F).
    ``mant`` = 0x780000, the mask of those bits, held in a register by the caller."""
    if 4 * J < 19:
        t = wd << (19 - 4 * J)
    else:
        t = wd >> (4 * J - 19)
    return ((t & mant) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def int4_gemv_step(acc, zacc, x, w_ptr, s_ptr, z_ptr, rows, n_mask, k0, stride_wn, stride_sn, mant,
                   GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """One K tile of the int4 GEMV without a per-weight dequantisation: with ``f = 1 + q/16``,
    ``sum_k x (q - z) s = 16 s sum_k x f - (16 + z) s sum_k x`` per group, so the loop multiplies
    x by ``f`` (one FMA per weight), scales each word's partial by ``16 s`` and accumulates the
    zero term from the group sums of x (``zacc``, shared by every row of the tile). The codes are
    read as int32 words (word ``w`` of a row = codes ``8w .. 8w+7``, nibble ``j`` = code ``8w + j``).
    Rounding: fp32 products of ``x f`` (|f| < 2) and one rounding of ``(16 + z) s``; the partials
    cancel against the zero term, so the fp32 error grows to ~2**-24 * 48 * sum |x| s (vs the
    fp16 output's 2**-11 relative)."""
    W: tl.constexpr = BLOCK_K // 8
    GS: tl.constexpr = GROUP_SIZE if GROUP_SIZE < BLOCK_K else BLOCK_K  # columns per scale in the tile
    NG: tl.constexpr = BLOCK_K // GS
    offs_w = k0 // 8 + tl.arange(0, W)
    words = w_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * (stride_wn // 4)
    wd = tl.load(words + offs_w[None, :], mask=n_mask[:, None], other=0)
    # x by nibble: k = 8w + j, j = 4a + 2b + c
    xc0, xc1 = tl.split(tl.reshape(x, (BLOCK_M, W, 2, 2, 2)))
    x00, x01 = tl.split(xc0)
    x10, x11 = tl.split(xc1)
    x0, x4 = tl.split(x00)
    x2, x6 = tl.split(x01)
    x1, x5 = tl.split(x10)
    x3, x7 = tl.split(x11)
    p = x0[:, None, :] * _nibble(wd, 0, mant)[None]
    p += x1[:, None, :] * _nibble(wd, 1, mant)[None]
    p += x2[:, None, :] * _nibble(wd, 2, mant)[None]
    p += x3[:, None, :] * _nibble(wd, 3, mant)[None]
    p += x4[:, None, :] * _nibble(wd, 4, mant)[None]
    p += x5[:, None, :] * _nibble(wd, 5, mant)[None]
    p += x6[:, None, :] * _nibble(wd, 6, mant)[None]
    p += x7[:, None, :] * _nibble(wd, 7, mant)[None]
    offs_g = k0 // GROUP_SIZE + tl.arange(0, NG)
    s = tl.load(s_ptr + rows[:, None] * stride_sn + offs_g[None, :], mask=n_mask[:, None], other=0.0).to(tl.float32)
    z = tl.load(z_ptr + rows[:, None] * stride_sn + offs_g[None, :], mask=n_mask[:, None], other=0.0).to(tl.float32)
    s16 = tl.reshape(tl.broadcast_to((16.0 * s)[:, :, None], (BLOCK_N, NG, GS // 8)), (BLOCK_N, W))
    acc += p * s16[None]
    xg = tl.sum(tl.reshape(x, (BLOCK_M, NG, GS)), axis=2)
    zacc += tl.sum(((16.0 + z) * s)[None, :, :] * xg[:, None, :], axis=2)
    return acc, zacc


@triton.jit
def int4_gemv_row(acc, zacc, x, w_ptr, s_ptr, z_ptr, rows, n_mask, k0, stride_wn, stride_sn, mant,
                  GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """:func:`int4_gemv_step` for one activation row (``x [BLOCK_K]``, ``acc [BLOCK_N, BLOCK_K/8]``,
    ``zacc [BLOCK_N]``): 2-D tiles, so the products take the layout of the code words and only x
    moves between layouts."""
    W: tl.constexpr = BLOCK_K // 8
    GS: tl.constexpr = GROUP_SIZE if GROUP_SIZE < BLOCK_K else BLOCK_K
    NG: tl.constexpr = BLOCK_K // GS
    offs_w = k0 // 8 + tl.arange(0, W)
    words = w_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * (stride_wn // 4)
    wd = tl.load(words + offs_w[None, :], mask=n_mask[:, None], other=0)
    xc0, xc1 = tl.split(tl.reshape(x, (W, 2, 2, 2)))
    x00, x01 = tl.split(xc0)
    x10, x11 = tl.split(xc1)
    x0, x4 = tl.split(x00)
    x2, x6 = tl.split(x01)
    x1, x5 = tl.split(x10)
    x3, x7 = tl.split(x11)
    p = x0[None, :] * _nibble(wd, 0, mant)
    p += x1[None, :] * _nibble(wd, 1, mant)
    p += x2[None, :] * _nibble(wd, 2, mant)
    p += x3[None, :] * _nibble(wd, 3, mant)
    p += x4[None, :] * _nibble(wd, 4, mant)
    p += x5[None, :] * _nibble(wd, 5, mant)
    p += x6[None, :] * _nibble(wd, 6, mant)
    p += x7[None, :] * _nibble(wd, 7, mant)
    offs_g = k0 // GROUP_SIZE + tl.arange(0, NG)
    s = tl.load(s_ptr + rows[:, None] * stride_sn + offs_g[None, :], mask=n_mask[:, None], other=0.0).to(tl.float32)
    z = tl.load(z_ptr + rows[:, None] * stride_sn + offs_g[None, :], mask=n_mask[:, None], other=0.0).to(tl.float32)
    s16 = tl.reshape(tl.broadcast_to((16.0 * s)[:, :, None], (BLOCK_N, NG, GS // 8)), (BLOCK_N, W))
    acc += p * s16
    xg = tl.sum(tl.reshape(x, (NG, GS)), axis=1)
    zacc += tl.sum(((16.0 + z) * s) * xg[None, :], axis=1)
    return acc, zacc


@triton.jit
def _bit(m, B: tl.constexpr):
    return (m & (1 << B)) != 0


@triton.jit
def _s24i4_group(p, a_sum, xa, xb, xc, xd, wd, mh, C: tl.constexpr, mant):
    """Products of 2:4 group ``C`` (of 4) of each code word: its kept pair (nibbles ``2C``,
    ``2C+1``) times the activations its metadata bits select (``i0`` in {0, 1, 2}, ``i1`` in
    {1, 2, 3}: two bit tests and two selects each), and the sum of the selected activations."""
    a0 = tl.where(_bit(mh, 4 * C + 1), xc[None, :], tl.where(_bit(mh, 4 * C), xb[None, :], xa[None, :]))
    a1 = tl.where(_bit(mh, 4 * C + 3), tl.where(_bit(mh, 4 * C + 2), xd[None, :], xc[None, :]), xb[None, :])
    p += a0 * _nibble(wd, 2 * C, mant)
    p += a1 * _nibble(wd, 2 * C + 1, mant)
    return p, a_sum + (a0 + a1)


@triton.jit
def s24i4_gemv_row(acc, x, w_ptr, meta_ptr, s_ptr, z_ptr, rows, n_mask, k0, stride_wn, stride_mn, stride_sn,
                   mant, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One K tile of the 2:4 + int4 GEMV for one activation row (``x [BLOCK_K]``, ``acc [BLOCK_N,
    BLOCK_K/16]``): codes as int32 words (word ``w`` = the kept pairs of the 2:4 groups of columns
    ``16w .. 16w+15``), their metadata as 16-bit halves (4 bits per group), ``f = 1 + q/16`` as in
    :func:`int4_gemv_step`; per word the selected activations' sum ``A`` carries the zero:
    ``sum a (q - z) s = 16 s sum a f - (16 + z) s A``."""
    W: tl.constexpr = BLOCK_K // 16
    GS: tl.constexpr = GROUP_SIZE if GROUP_SIZE < BLOCK_K else BLOCK_K
    NG: tl.constexpr = BLOCK_K // GS
    offs_w = k0 // 16 + tl.arange(0, W)
    wd = tl.load(w_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * (stride_wn // 4) + offs_w[None, :],
                 mask=n_mask[:, None], other=0)
    mh = tl.load(meta_ptr.to(tl.pointer_type(tl.int16)) + rows[:, None] * (stride_mn // 2) + offs_w[None, :],
                 mask=n_mask[:, None], other=0).to(tl.int32)
    # x by column t = 16w + 8a + 4b + 2c + d of the word
    e, o = tl.split(tl.reshape(x, (W, 2, 2, 2, 2)))          # d
    e0, e1 = tl.split(e)                                      # c
    o0, o1 = tl.split(o)
    e00, e01 = tl.split(e0)                                   # b
    e10, e11 = tl.split(e1)
    o00, o01 = tl.split(o0)
    o10, o11 = tl.split(o1)
    x0, x8 = tl.split(e00)                                    # a
    x4, x12 = tl.split(e01)
    x2, x10 = tl.split(e10)
    x6, x14 = tl.split(e11)
    x1, x9 = tl.split(o00)
    x5, x13 = tl.split(o01)
    x3, x11 = tl.split(o10)
    x7, x15 = tl.split(o11)
    p = tl.zeros((BLOCK_N, W), dtype=tl.float32)
    a = tl.zeros((BLOCK_N, W), dtype=tl.float32)
    p, a = _s24i4_group(p, a, x0, x1, x2, x3, wd, mh, 0, mant)
    p, a = _s24i4_group(p, a, x4, x5, x6, x7, wd, mh, 1, mant)
    p, a = _s24i4_group(p, a, x8, x9, x10, x11, wd, mh, 2, mant)
    p, a = _s24i4_group(p, a, x12, x13, x14, x15, wd, mh, 3, mant)
    offs_g = k0 // GROUP_SIZE + tl.arange(0, NG)
    s = tl.load(s_ptr + rows[:, None] * stride_sn + offs_g[None, :], mask=n_mask[:, None], other=0.0).to(tl.float32)
    z = tl.load(z_ptr + rows[:, None] * stride_sn + offs_g[None, :], mask=n_mask[:, None], other=0.0).to(tl.float32)
    s16 = tl.reshape(tl.broadcast_to((16.0 * s)[:, :, None], (BLOCK_N, NG, GS // 16)), (BLOCK_N, W))
    c = tl.reshape(tl.broadcast_to(((16.0 + z) * s)[:, :, None], (BLOCK_N, NG, GS // 16)), (BLOCK_N, W))
    return acc + (p * s16 - a * c)


@triton.jit
def _by_group(t, W2: tl.constexpr):
    """The 8 columns ``[W2, 8]`` of ``t [W2 * 8]`` (column ``g`` = elements ``8j + g``), as 8 tensors ``[W2]``."""
    e, o = tl.split(tl.reshape(t, (W2, 2, 2, 2)))   # bit 0 of g
    e0, e1 = tl.split(e)                             # bit 1
    o0, o1 = tl.split(o)
    g0, g4 = tl.split(e0)                            # bit 2
    g2, g6 = tl.split(e1)
    g1, g5 = tl.split(o0)
    g3, g7 = tl.split(o1)
    return g0, g1, g2, g3, g4, g5, g6, g7


@triton.jit
def _s24i4_h2_group(acc, wh, C: tl.constexpr, fa, fb, B: tl.constexpr, x01, x23, nib, nrm, zb, sc):
    """One 2:4 group (byte ``C`` of the code words ``wh``) of the fp16 GEMV: its kept pair as half2
    ``(k0 - z, k1 - z) * s`` (the byte replicated to both lanes by PRMT; ``(t & 0x00F0000F) |
    0x6400_6400`` = ``(1024 + k0, 1024 + 16 k1)``; one FMA by ``(1, 1/16)`` minus ``(1024 + z, 64 + z)``,
    exact; one multiply by ``s``, rounded as the reference rounds its weights to fp16), times the
    activations its metadata picks (PRMT of the group's four fp16 x by the selector whose bytes are
    bytes ``B`` of ``fa``, ``fb``), added to the half2 accumulator. ``nib`` = 0x00F0000F held in a
    register (as an immediate, ptxas re-materialises it before each LOP3)."""
    t = _pk.prmt(wh, wh, tl.full(wh.shape, C * 0x0101, tl.int32))
    v = _pk.hmul2(_pk.hfma2((t & nib) | 0x64006400, nrm, zb), sc)
    sel = _pk.prmt(fa, fb, tl.full(fa.shape, B | ((B + 4) << 4), tl.int32))
    xs = _pk.prmt(x01[None, :], x23[None, :], sel)
    return _pk.hfma2(xs, v, acc)


@triton.jit
def s24i4_gemv_h2(acc, x_ptr, w_ptr, meta_ptr, s_ptr, z_ptr, rows, n_mask, k0, K, stride_wn, stride_mn,
                  stride_sn, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One K tile of the fp16 2:4 + int4 GEMV (``acc [BLOCK_N, BLOCK_K/32]`` fp32) in packed half2
    registers (:mod:`._packed`): per metadata word (int32: the 8 2:4 groups of 32 columns, two code
    words) the selected activations times the dequantised kept pairs accumulate in fp16 lanes
    (8 products each, as the fp16 weights the reference computes with) and are added to ``acc`` in
    fp32. Selectors: lane 0 takes fp16 ``x[i0]``, lane 1 ``x[i1]`` out of the group's ``(x0, x1),
    (x2, x3)``, i.e. bytes ``2i, 2i + 1``: selector byte ``0x10 + 0x22 i`` = byte ``i`` of
    0x76543210, looked up by one PRMT for 4 groups at a time from ``meta & 0x33333333`` (nibble
    ``g``: ``i0`` of group ``g``) and ``(meta >> 2) & 0x33333333`` (``i1``)."""
    W2: tl.constexpr = BLOCK_K // 32
    GS: tl.constexpr = GROUP_SIZE if GROUP_SIZE < BLOCK_K else BLOCK_K
    NG: tl.constexpr = BLOCK_K // GS
    offs_x = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    x32 = tl.load(x_ptr.to(tl.pointer_type(tl.int32)) + offs_x, mask=offs_x < K // 2, other=0)
    x01, x23 = tl.split(tl.reshape(x32, (W2, 8, 2)))  # per group: fp16 (x0, x1) and (x2, x3)
    xa0, xa1, xa2, xa3, xa4, xa5, xa6, xa7 = _by_group(x01, W2)
    xb0, xb1, xb2, xb3, xb4, xb5, xb6, xb7 = _by_group(x23, W2)
    offs_w = k0 // 16 + tl.arange(0, 2 * W2)
    wd = tl.load(w_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * (stride_wn // 4) + offs_w[None, :],
                 mask=n_mask[:, None], other=0)
    w0, w1 = tl.split(tl.reshape(wd, (BLOCK_N, W2, 2)))
    offs_m = k0 // 32 + tl.arange(0, W2)
    mw = tl.load(meta_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * (stride_mn // 4) + offs_m[None, :],
                 mask=n_mask[:, None], other=0)
    lut = tl.where(K > 0, 0x76543210, 0)  # opaque registers, as ``nib``
    nib = tl.where(K > 0, 0x00F0000F, 0)
    i0 = mw & 0x33333333
    i1 = (mw >> 2) & 0x33333333
    fa_lo = _pk.prmt(lut, lut, i0)         # byte g: lane-0 selector byte of group g (0..3)
    fb_lo = _pk.prmt(lut, lut, i1)
    fa_hi = _pk.prmt(lut, lut, i0 >> 16)   # groups 4..7
    fb_hi = _pk.prmt(lut, lut, i1 >> 16)
    offs_g = k0 // GROUP_SIZE + tl.arange(0, NG)
    s = tl.load(s_ptr + rows[:, None] * stride_sn + offs_g[None, :], mask=n_mask[:, None], other=0.0)
    z = tl.load(z_ptr + rows[:, None] * stride_sn + offs_g[None, :], mask=n_mask[:, None], other=0.0)
    # negated both ways: (q - z) s = ((1024 + z) - c) (-s), with c = 1024 + q (lane 1: 64 + z, c / 16)
    sc = _pk.half2_of(-s, -s)
    zb = _pk.half2_of(z + 1024.0, z + 64.0)
    sc = tl.reshape(tl.broadcast_to(sc[:, :, None], (BLOCK_N, NG, GS // 32)), (BLOCK_N, W2))
    zb = tl.reshape(tl.broadcast_to(zb[:, :, None], (BLOCK_N, NG, GS // 32)), (BLOCK_N, W2))
    nrm = tl.full((BLOCK_N, W2), 0xAC00BC00 - 2**32, tl.int32)  # fp16 (-1, -1/16)
    h = tl.zeros((BLOCK_N, W2), dtype=tl.int32)
    h = _s24i4_h2_group(h, w0, 0, fa_lo, fb_lo, 0, xa0, xb0, nib, nrm, zb, sc)
    h = _s24i4_h2_group(h, w0, 1, fa_lo, fb_lo, 1, xa1, xb1, nib, nrm, zb, sc)
    h = _s24i4_h2_group(h, w0, 2, fa_lo, fb_lo, 2, xa2, xb2, nib, nrm, zb, sc)
    h = _s24i4_h2_group(h, w0, 3, fa_lo, fb_lo, 3, xa3, xb3, nib, nrm, zb, sc)
    acc += _pk.lane_sum(h)
    h = tl.zeros((BLOCK_N, W2), dtype=tl.int32)
    h = _s24i4_h2_group(h, w1, 0, fa_hi, fb_hi, 0, xa4, xb4, nib, nrm, zb, sc)
    h = _s24i4_h2_group(h, w1, 1, fa_hi, fb_hi, 1, xa5, xb5, nib, nrm, zb, sc)
    h = _s24i4_h2_group(h, w1, 2, fa_hi, fb_hi, 2, xa6, xb6, nib, nrm, zb, sc)
    h = _s24i4_h2_group(h, w1, 3, fa_hi, fb_hi, 3, xa7, xb7, nib, nrm, zb, sc)
    return acc + _pk.lane_sum(h)


@triton.jit
def dense_tile(FORMAT: tl.constexpr, w_ptr, s_ptr, z_ptr, offs_n, n_mask, k0, K, stride_wn, stride_sn,
               GROUP_SIZE: tl.constexpr, DQ: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``[BLOCK_N, BLOCK_K]`` DQ tile of columns ``k0..`` of an int8 / fp8 (raw codes, the scale is
    applied outside) or int4 (dequantised) weight."""
    rows = offs_n.to(tl.int64)
    if FORMAT == INT4:
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        # no K mask: BLOCK_K divides the group, which divides K, so a tile never crosses K (and
        # the load stays one 16-byte vector per thread)
        q = tl.load(w_ptr + rows[:, None] * stride_wn + offs_b[None, :], mask=n_mask[:, None], other=0)
        lo, hi = _int4_pair(q, s_ptr, z_ptr, rows, n_mask, k0, stride_sn, GROUP_SIZE, DQ)
        w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = n_mask[:, None] & (offs_k < K)[None, :]
        if FORMAT == INT8:
            q = tl.load(w_ptr + rows[:, None] * stride_wn + offs_k[None, :], mask=mask, other=0)
            w = _int8_codes(q, DQ)
        else:  # FP8: masked lanes as raw zero bytes (+0.0 in e4m3), then reinterpret
            q = tl.load(w_ptr.to(tl.pointer_type(tl.uint8)) + rows[:, None] * stride_wn + offs_k[None, :],
                        mask=mask, other=0)
            w = q.to(tl.float8e4nv, bitcast=True).to(DQ)
    return w


@triton.jit
def sparse_parts(FORMAT: tl.constexpr, w_ptr, meta_ptr, s_ptr, z_ptr, offs_n, n_mask, k0, K,
                 stride_wn, stride_mn, stride_sn, GROUP_SIZE: tl.constexpr, VDT: tl.constexpr,
                 DQ: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The kept pair ``(v0, v1)`` (DQ) and positions ``(i0, i1)`` (int32), each
    ``[BLOCK_N, BLOCK_K/4]``, of the 2:4 groups of columns ``k0..``. Metadata: ``BLOCK_K/8``
    contiguous bytes per row, split into nibbles in registers."""
    rows = offs_n.to(tl.int64)
    offs_mb = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    if FORMAT == S24I4:  # grouped: the tile never crosses K (see dense_tile)
        mb = tl.load(meta_ptr + rows[:, None] * stride_mn + offs_mb[None, :], mask=n_mask[:, None], other=0)
    else:
        mb = tl.load(meta_ptr + rows[:, None] * stride_mn + offs_mb[None, :],
                     mask=n_mask[:, None] & (offs_mb < (K + 7) // 8)[None, :], other=0)
    nib = tl.reshape(tl.join(mb & 0xF, mb >> 4), (BLOCK_N, BLOCK_K // 4)).to(tl.int32)
    i0 = nib & 3
    i1 = nib >> 2
    if FORMAT == S24:
        offs_h = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        v = tl.load(w_ptr + rows[:, None] * stride_wn + offs_h[None, :],
                    mask=n_mask[:, None] & (offs_h < K // 2)[None, :], other=0.0)
        v0, v1 = tl.split(tl.reshape(v.to(VDT).to(DQ), (BLOCK_N, BLOCK_K // 4, 2)))
    else:
        offs_b = k0 // 4 + tl.arange(0, BLOCK_K // 4)
        q = tl.load(w_ptr + rows[:, None] * stride_wn + offs_b[None, :], mask=n_mask[:, None], other=0)
        v0, v1 = _int4_pair(q, s_ptr, z_ptr, rows, n_mask, k0, stride_sn, GROUP_SIZE, DQ)
    return v0, v1, i0, i1


@triton.jit
def expand_24(v0, v1, i0, i1, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dense ``[BLOCK_N, BLOCK_K]`` tile from the kept pairs: a rank-3 select (triton 3.6 rejects
    the rank-4 join/reshape as a wgmma operand)."""
    j = tl.arange(0, 4)[None, None, :]
    d = tl.where(j == i0[:, :, None], v0[:, :, None], tl.where(j == i1[:, :, None], v1[:, :, None], 0.0))
    return tl.reshape(d, (BLOCK_N, BLOCK_K))


@triton.jit
def _raw_tile(FORMAT: tl.constexpr, w_ptr, meta_ptr, s_ptr, z_ptr, offs_n, n_mask, k0, K,
              stride_wn, stride_mn, stride_sn, GROUP_SIZE: tl.constexpr, XDT: tl.constexpr,
              DQ: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    if FORMAT == S24 or FORMAT == S24I4:
        v0, v1, i0, i1 = sparse_parts(FORMAT, w_ptr, meta_ptr, s_ptr, z_ptr, offs_n, n_mask, k0, K,
                                      stride_wn, stride_mn, stride_sn, GROUP_SIZE, XDT, DQ, BLOCK_N, BLOCK_K)
        w = expand_24(v0, v1, i0, i1, BLOCK_N, BLOCK_K)
    else:
        w = dense_tile(FORMAT, w_ptr, s_ptr, z_ptr, offs_n, n_mask, k0, K, stride_wn, stride_sn,
                       GROUP_SIZE, DQ, BLOCK_N, BLOCK_K)
    return w


@triton.jit
def weight_tile(FORMAT: tl.constexpr, w_ptr, meta_ptr, s_ptr, z_ptr, offs_n, n_mask, k0, K,
                stride_wn, stride_mn, stride_sn, GROUP_SIZE: tl.constexpr, XDT: tl.constexpr,
                F32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The ``[BLOCK_N, BLOCK_K]`` dot operand: in XDT (fp16: dequantised in fp16; bf16: in fp32,
    then cast), or, when ``F32``, rounded to XDT (as the reference) and held in fp32."""
    if F32:
        w = _raw_tile(FORMAT, w_ptr, meta_ptr, s_ptr, z_ptr, offs_n, n_mask, k0, K, stride_wn, stride_mn,
                      stride_sn, GROUP_SIZE, XDT, tl.float32, BLOCK_N, BLOCK_K)
        return w.to(XDT).to(tl.float32)
    elif XDT == tl.float16:
        return _raw_tile(FORMAT, w_ptr, meta_ptr, s_ptr, z_ptr, offs_n, n_mask, k0, K, stride_wn, stride_mn,
                         stride_sn, GROUP_SIZE, XDT, tl.float16, BLOCK_N, BLOCK_K)
    else:
        w = _raw_tile(FORMAT, w_ptr, meta_ptr, s_ptr, z_ptr, offs_n, n_mask, k0, K, stride_wn, stride_mn,
                      stride_sn, GROUP_SIZE, XDT, tl.float32, BLOCK_N, BLOCK_K)
        return w.to(XDT)


@triton.jit
def mma(a, b, acc, F32: tl.constexpr):
    """``acc + a @ b``: tensor cores in ``a``'s dtype, or an exact IEEE fp32 dot when ``F32``."""
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b.to(a.dtype), acc)


@triton.jit
def epilogue(acc, y_ptr, s_ptr, b_ptr, offs_m, offs_n, M, N, stride_ym, first,
             SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr):
    """Per-channel scale, bias (added by the ``first`` split only) and the store; with ``ATOMIC`` an
    fp32 ``atomic_add`` of this split's partial into a zeroed buffer."""
    n_mask = offs_n < N
    if SCALE:
        acc = acc * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if ATOMIC:
            b = tl.where(first, b, 0.0)
        acc = acc + b[None, :]
    ptrs = y_ptr + row_offsets(offs_m, stride_ym)[:, None] + offs_n[None, :]
    mask = (offs_m < M)[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


# ============================================================================ kernels
@triton.jit
def gemv_kernel(x_ptr, w_ptr, meta_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, SPLIT,
                stride_xm, stride_wn, stride_mn, stride_sn, stride_ym,
                FORMAT: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
                ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Small-M forward: fp32 partial products in registers, one reduction after the K loop."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    x_rows = row_offsets(offs_m, stride_xm)
    m_mask = offs_m < M
    k_lo, k_hi = split_range(pid_s, SPLIT, K, BLOCK_K)
    H2: tl.constexpr = FORMAT == S24I4 and BLOCK_M == 1 and x_ptr.dtype.element_ty == tl.float16
    if H2:  # one partial per metadata word
        acc = tl.zeros((BLOCK_N, BLOCK_K // 32), dtype=tl.float32)
    elif FORMAT == S24I4 and BLOCK_M == 1:  # one partial per code word
        acc = tl.zeros((BLOCK_N, BLOCK_K // 16), dtype=tl.float32)
    elif FORMAT == S24 or FORMAT == S24I4:
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K // 4), dtype=tl.float32)
    elif FORMAT == INT4 and BLOCK_M == 1:  # one partial per code word
        acc = tl.zeros((BLOCK_N, BLOCK_K // 8), dtype=tl.float32)
    elif FORMAT == INT4:
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K // 8), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    # the int4 nibble mask as an opaque register (K > 0): as an immediate, ptxas re-materialises
    # it with a MOV before most of the AND-ORs
    mant = tl.where(K > 0, 0x780000, 0)
    if FORMAT == INT4 and BLOCK_M == 1:
        zacc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    else:
        zacc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if not H2:
            x = tl.load(x_ptr + x_rows[:, None] + offs_k[None, :],
                        mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0).to(tl.float32)
        if H2:
            acc = s24i4_gemv_h2(acc, x_ptr, w_ptr, meta_ptr, s_ptr, z_ptr, offs_n.to(tl.int64), n_mask, k0, K,
                                stride_wn, stride_mn, stride_sn, GROUP_SIZE, BLOCK_N, BLOCK_K)
        elif FORMAT == S24I4 and BLOCK_M == 1:
            acc = s24i4_gemv_row(acc, tl.reshape(x, (BLOCK_K,)), w_ptr, meta_ptr, s_ptr, z_ptr, offs_n.to(tl.int64),
                                 n_mask, k0, stride_wn, stride_mn, stride_sn, mant, GROUP_SIZE, BLOCK_N, BLOCK_K)
        elif FORMAT == S24 or FORMAT == S24I4:
            v0, v1, i0, i1 = sparse_parts(FORMAT, w_ptr, meta_ptr, s_ptr, z_ptr, offs_n, n_mask, k0, K,
                                          stride_wn, stride_mn, stride_sn, GROUP_SIZE, x_ptr.dtype.element_ty,
                                          tl.float32, BLOCK_N, BLOCK_K)
            # [M, G, 2, 2][m, g, j, i] = x[m, 4g + 2j + i]
            xe, xo = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 4, 2, 2)))
            x0, x2 = tl.split(xe)
            x1, x3 = tl.split(xo)
            # idx0 is in {0, 1, 2} and idx1 in {1, 2, 3} for every valid 2:4 nibble
            a0 = tl.where((i0 == 0)[None], x0[:, None, :], tl.where((i0 == 1)[None], x1[:, None, :], x2[:, None, :]))
            a1 = tl.where((i1 == 3)[None], x3[:, None, :], tl.where((i1 == 2)[None], x2[:, None, :], x1[:, None, :]))
            acc += v0[None] * a0 + v1[None] * a1
        elif FORMAT == INT4 and BLOCK_M == 1:
            acc, zacc = int4_gemv_row(acc, zacc, tl.reshape(x, (BLOCK_K,)), w_ptr, s_ptr, z_ptr,
                                      offs_n.to(tl.int64), n_mask, k0, stride_wn, stride_sn, mant, GROUP_SIZE,
                                      BLOCK_N, BLOCK_K)
        elif FORMAT == INT4:
            acc, zacc = int4_gemv_step(acc, zacc, x, w_ptr, s_ptr, z_ptr, offs_n.to(tl.int64), n_mask, k0,
                                       stride_wn, stride_sn, mant, GROUP_SIZE, BLOCK_M, BLOCK_N, BLOCK_K)
        else:
            w = dense_tile(FORMAT, w_ptr, s_ptr, z_ptr, offs_n, n_mask, k0, K, stride_wn, stride_sn,
                           GROUP_SIZE, tl.float32, BLOCK_N, BLOCK_K)
            acc += x[:, None, :] * w[None, :, :]
    if FORMAT == INT4 and BLOCK_M == 1:
        y = (tl.sum(acc, axis=1) - zacc)[None, :]
    elif FORMAT == S24I4 and BLOCK_M == 1:
        y = tl.sum(acc, axis=1)[None, :]
    else:
        y = tl.sum(acc, axis=2)
        if FORMAT == INT4:
            y -= zacc
    epilogue(y, y_ptr, s_ptr, b_ptr, offs_m, offs_n, M, N, stride_ym, pid_s == 0,
             FORMAT == INT8 or FORMAT == FP8, HAS_BIAS, ATOMIC)


@triton.jit
def gemm_kernel(x_ptr, w_ptr, meta_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, SPLIT, M_BUCKET,
                stride_xm, stride_wn, stride_mn, stride_sn, stride_ym,
                FORMAT: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, F32: tl.constexpr,
                ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                GROUP_M: tl.constexpr):
    """Tiled forward: the weight tile dequantised in registers feeds ``tl.dot``."""
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = row_offsets(offs_m, stride_xm)
    k_lo, k_hi = split_range(pid_s, SPLIT, K, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + x_rows[:, None] + offs_k[None, :],
                    mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)
        w = weight_tile(FORMAT, w_ptr, meta_ptr, s_ptr, z_ptr, offs_n, n_mask, k0, K, stride_wn, stride_mn,
                        stride_sn, GROUP_SIZE, x_ptr.dtype.element_ty, F32, BLOCK_N, BLOCK_K)
        acc = mma(x, tl.trans(w), acc, F32)
    epilogue(acc, y_ptr, s_ptr, b_ptr, offs_m, offs_n, M, N, stride_ym, pid_s == 0,
             FORMAT == INT8 or FORMAT == FP8, HAS_BIAS, ATOMIC)


@triton.jit
def dx_kernel(dy_ptr, w_ptr, meta_ptr, s_ptr, z_ptr, dx_ptr, M, N, K, SPLIT, M_BUCKET,
              stride_dym, stride_wn, stride_mn, stride_sn, stride_dxm,
              FORMAT: tl.constexpr, GROUP_SIZE: tl.constexpr, F32: tl.constexpr, ATOMIC: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Input gradient ``dX[M, K] = dY[M, N] @ dequant(W)[N, K]``; loop (and split) over N."""
    pid_m, pid_k = tile_ids(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    dy_rows = row_offsets(offs_m, stride_dym)
    n_lo, n_hi = split_range(pid_s, SPLIT, N, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        g = tl.load(dy_ptr + dy_rows[:, None] + offs_n[None, :], mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        if FORMAT == INT8 or FORMAT == FP8:  # dY * scale[n] against the raw codes
            s = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            g = (g.to(tl.float32) * s[None, :]).to(dy_ptr.dtype.element_ty)
        w = weight_tile(FORMAT, w_ptr, meta_ptr, s_ptr, z_ptr, offs_n, n_mask, k0, K, stride_wn, stride_mn,
                        stride_sn, GROUP_SIZE, dy_ptr.dtype.element_ty, F32, BLOCK_N, BLOCK_K)
        acc = mma(g, w, acc, F32)
    epilogue(acc, dx_ptr, s_ptr, s_ptr, offs_m, offs_k, M, K, stride_dxm, pid_s == 0, False, False, ATOMIC)


# ============================================================================ configs
def cfg(bm, bn, bk, warps, stages, gm=8) -> triton.Config:
    kw = {"BLOCK_N": bn, "BLOCK_K": bk} if bm is None else {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm}
    return triton.Config(kw, num_warps=warps, num_stages=stages)


#: GEMV register budget: BLOCK_M * BLOCK_N * (BLOCK_K, or BLOCK_K/4 for 2:4) fp32 partials,
#: 32 per thread at 8 warps (2:4: 16; its per-pair selects and operands take the rest)
GEMV_ELEMS = {"dense": 8192, "sparse": 4096}
GEMV_WARPS = 8
GEMV_BLOCK_MS = (1, 2, 4)

#: narrow tiles for SMALL_M < M <= MEDIUM_M: BLOCK_M = 16/32/64 by M, split-K fills the GPU;
#: 2:4 formats use 8 warps (their select tile is 4x the weight tile)
GEMM_MEDIUM_BLOCK_MS = (16, 32, 64)
#: largest M whose medium tile may be narrowed (BLOCK_N 64 -> 32) to fill the GPU without split-K:
#: a narrow 2:4 tile spends more instructions per weight on its selects (static model, sm_90
#: SASS: 2:4 + int4 is predicted slower narrow than split at every M, 2:4 fp16 above M = 16)
MEDIUM_NARROW_M = {0: 64, 1: 64, 2: 64, 3: 16, 4: 0}
#: the same for the input gradient's BLOCK_K (64 -> 32): the narrowed int4 bf16 tile at BLOCK_M = 32
#: spills 8 bytes on sm_90 under triton 3.6
DX_NARROW_M = {0: 64, 1: 64, 2: 16, 3: 16, 4: 0}
#: large M, autotuned (fp16 / bf16): dense formats and 2:4 formats; BLOCK_K 32 serves int4 group 32
GEMM_LARGE = {
    "dense": [cfg(64, 64, 64, 4, 4), cfg(128, 128, 64, 8, 3), cfg(128, 64, 32, 4, 4)],
    "sparse": [cfg(64, 64, 64, 8, 3), cfg(128, 64, 32, 8, 3), cfg(64, 128, 32, 8, 3)],
}
DX_LARGE = {
    "dense": [cfg(64, 64, 64, 4, 3), cfg(128, 64, 32, 8, 3)],
    "sparse": [cfg(64, 64, 64, 8, 3), cfg(128, 64, 32, 8, 3)],
}
#: fp32 activations: IEEE fp32 dots on the FMA units; tensor-core tiles spill there
F32_TILE = cfg(32, 32, 32, 8, 2)
INTERP_TILE = cfg(32, 32, 32, 4, 1)


def family(fmt: int) -> str:
    return "sparse" if fmt in SPARSE else "dense"


def _bk_cap(fmt: int, group: Optional[int], cap: int) -> int:
    return min(cap, group) if fmt in GROUPED else cap


def gemv_config(fmt: int, block_m: int, group: Optional[int], interp: Optional[bool] = None,
                block_n: Optional[int] = None, k: Optional[int] = None) -> triton.Config:
    """The GEMV tile for ``BLOCK_M`` rows: BLOCK_K as wide as the group allows (2:4: 256 dense
    columns = 64 kept pairs), BLOCK_N filling the register budget (or ``block_n``, narrower)."""
    if fmt == INT4 or (fmt == S24I4 and block_m == 1):  # whole groups, up to 512 columns, dividing K
        bk = group
        while bk < 512 and (k is None or k % (2 * bk) == 0):
            bk *= 2
    else:
        bk = _bk_cap(fmt, group, 256)
    acc_k = bk // 4 if fmt in SPARSE or fmt == INT4 else bk
    if fmt == S24I4 and block_m == 1:
        acc_k = bk // 8
    bn = max(16, min(128 if fmt not in SPARSE else 64, GEMV_ELEMS[family(fmt)] // (block_m * acc_k)))
    if block_n is not None:
        bn = max(16, min(bn, block_n))
    if interpreting() if interp is None else interp:
        bn = min(bn, 32)
    # dense codes: fewer warps when 8 would leave a thread under 16 bytes of codes (no 16-byte
    # vector load); 2:4 tiles keep 8 (their selects need the registers)
    code_bytes = bn * bk // (2 if fmt == INT4 else 1)
    warps = 4 if fmt not in SPARSE and block_m <= 2 and code_bytes < 16 * 32 * GEMV_WARPS else GEMV_WARPS
    if fmt == INT4 and block_m == 1:
        warps = 4  # the word GEMV: a thread holds 4 rows of its words, x staged once for all 4
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=1)


def gemv_configs(fmt: int, block_m: int, group: Optional[int], interp: Optional[bool] = None,
                 k: Optional[int] = None) -> list:
    """The budget-filling GEMV tile, then the same with BLOCK_N halved down to 16 (more CTAs for
    narrow outputs: a grid that fills the GPU without split-K). ``k``: the reduction length (int4
    tiles must divide it; None: the compiled ``AOT`` shape, 4096)."""
    k = 4096 if k is None else k
    out = [gemv_config(fmt, block_m, group, interp, k=k)]
    while out[-1].kwargs["BLOCK_N"] > 16:
        out.append(gemv_config(fmt, block_m, group, interp, block_n=out[-1].kwargs["BLOCK_N"] // 2, k=k))
    return out


def medium_config(fmt: int, m: int, group: Optional[int], f32: bool, interp: Optional[bool] = None) -> triton.Config:
    if f32:
        return F32_TILE
    if interpreting() if interp is None else interp:
        return cfg(16, 32, _bk_cap(fmt, group, 32), 4, 1)
    bm = next(b for b in GEMM_MEDIUM_BLOCK_MS if m <= b or b == GEMM_MEDIUM_BLOCK_MS[-1])
    if fmt in SPARSE:  # the select tile is 4x the weight tile: more warps, fewer stages
        return cfg(bm, 64, _bk_cap(fmt, group, 64), 8 if bm >= 32 else 4, 2 if bm == 32 else 3)
    return cfg(bm, 64, _bk_cap(fmt, group, 64), 4, 3 if bm == 32 else 4)


def narrowed(c: triton.Config, key: str, floor: int = 32) -> list:
    """``[c]`` and, when ``c.kwargs[key] > floor``, ``c`` with that output width halved down to ``floor``."""
    out = [c]
    while out[-1].kwargs[key] > floor:
        kw = dict(out[-1].kwargs, **{key: out[-1].kwargs[key] // 2})
        out.append(triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
    return out


def large_configs(table: dict, fmt: int, group: Optional[int]) -> list:
    pool = table[family(fmt)]
    return [c for c in pool if group is None or fmt not in GROUPED or group % c.kwargs["BLOCK_K"] == 0]


def _prune(configs, named_args, **kwargs):
    a = {**named_args, **kwargs}
    fmt, group = a.get("FORMAT"), a.get("GROUP_SIZE")
    kept = [c for c in configs if fmt not in GROUPED or group % c.kwargs["BLOCK_K"] == 0]
    return kept or configs[-1:]


_KEY = ["M_BUCKET", "N", "K", "FORMAT", "GROUP_SIZE"]
_gemm_large = {f: triton.autotune(tuning_configs(GEMM_LARGE[f], INTERP_TILE), key=_KEY,
                                  prune_configs_by={"early_config_prune": _prune})(gemm_kernel)
               for f in GEMM_LARGE}
_dx_large = {f: triton.autotune(tuning_configs(DX_LARGE[f], INTERP_TILE), key=_KEY,
                                prune_configs_by={"early_config_prune": _prune})(dx_kernel)
             for f in DX_LARGE}


def m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), 4096)


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def choose_split(tiles: int, length: int, block: int, sms: int, min_iters: int = 4) -> int:
    """Power-of-two split of the reduction so that ``tiles * split`` reaches two waves of ``sms``,
    each split keeping at least ``min_iters`` tiles of ``block``."""
    split = 1
    while tiles * split < 2 * sms and length // (split * 2) >= min_iters * block:
        split *= 2
    return split


#: a grid of at least this fraction of one wave of CTAs runs without split-K: one launch writing
#: the output directly beats split-K's zero-fill + atomics + cast (3 launches, ~4 us each)
WAVE_FILL = 0.9


def fill_or_split(configs: list, tiles_of: Callable, length: int, block_key: str, sms: int,
                  fallback: Optional[triton.Config] = None) -> tuple:
    """``(config, split)``: the widest of ``configs`` whose grid fills ``WAVE_FILL`` of the SMs
    alone (split 1: one launch, no atomics), else ``fallback`` (default: the first) with
    :func:`choose_split` of the reduction (``length``, tiles of ``block_key``)."""
    for c in configs:
        if tiles_of(c) >= WAVE_FILL * sms:
            return c, 1
    c = configs[0] if fallback is None else fallback
    return c, choose_split(tiles_of(c), length, c.kwargs[block_key], sms)


def f32_dot(dtype: torch.dtype) -> bool:
    """Exact fp32 dots: fp32 activations (no TF32, as F.linear), and bf16 under the interpreter,
    whose bf16 ``tl.dot`` is wrong (upcasting is exact: bf16 products fit in fp32)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())


# ============================================================================ launch plans
@dataclass(frozen=True)
class Plan:
    """What a launcher runs for one call: kernel, regime, config (None: autotuned), split, grid."""
    kernel: str            # "gemv" | "gemm" | "dx"
    regime: str            # "small" | "medium" | "large"
    config: Optional[triton.Config]
    split: int
    block_m: int = 0       # gemv only
    atomic: bool = False   # fp32 atomic_add into a zeroed buffer (split > 1)


def plan_forward(fmt: int, m: int, n: int, k: int, group: Optional[int], dtype: torch.dtype, sms: int,
                 interp: Optional[bool] = None) -> Plan:
    """The kernel, config and split the forward launcher runs (``interp=False``: the GPU's plan
    even under the interpreter, for the AOT registry and the static model). Small and medium M:
    the widest tile whose grid fills the GPU without split-K, else split-K with atomics."""
    interp = interpreting() if interp is None else interp
    f32 = dtype == torch.float32 or (dtype == torch.bfloat16 and interp)
    if m <= SMALL_M:
        bm = triton.next_power_of_2(m)
        c, split = fill_or_split(gemv_configs(fmt, bm, group, interp, k), lambda c: triton.cdiv(n, c.kwargs["BLOCK_N"]),
                                 k, "BLOCK_K", sms)
        return Plan("gemv", "small", c, split, bm, split > 1)
    if m <= MEDIUM_M or f32:
        base = medium_config(fmt, m, group, f32, interp)
        # narrowable formats run their base tile only split (with atomics): stored, two of those
        # tiles spill a few bytes around the K loop on sm_90 (triton 3.9), the narrow tiles do not
        narrow = m <= MEDIUM_NARROW_M[fmt] and not f32
        cands = narrowed(base, "BLOCK_N")[1:] if narrow else [base]
        tiles = lambda c: triton.cdiv(m, c.kwargs["BLOCK_M"]) * triton.cdiv(n, c.kwargs["BLOCK_N"])  # noqa: E731
        c, split = fill_or_split(cands, tiles, k, "BLOCK_K", sms, base) if m <= MEDIUM_M else (base, 1)
        return Plan("gemm", "medium", c, split, 0, split > 1)
    return Plan("gemm", "large", None, 1)


def plan_backward(fmt: int, m: int, n: int, k: int, group: Optional[int], dtype: torch.dtype, sms: int,
                  interp: Optional[bool] = None) -> Plan:
    interp = interpreting() if interp is None else interp
    f32 = dtype == torch.float32 or (dtype == torch.bfloat16 and interp)
    if m <= MEDIUM_M or f32:
        c = medium_config(fmt, max(m, 16), group, f32, interp)
        c = cfg(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], _bk_cap(fmt, group, c.kwargs["BLOCK_K"]),
                c.num_warps, c.num_stages)
        cands = narrowed(c, "BLOCK_K")[1:] if m <= DX_NARROW_M[fmt] and not f32 else [c]
        tiles = lambda c: triton.cdiv(m, c.kwargs["BLOCK_M"]) * triton.cdiv(k, c.kwargs["BLOCK_K"])  # noqa: E731
        c, split = fill_or_split(cands, tiles, n, "BLOCK_N", sms, c) if m <= MEDIUM_M else (c, 1)
        return Plan("dx", "medium", c, split, 0, split > 1)
    return Plan("dx", "large", None, 1)


def _out(m, n, dtype, device, atomic, out=None):
    """The output buffer (``out`` if given); for atomics a zeroed fp32 buffer the kernel adds into."""
    if not atomic:
        return out if out is not None else torch.empty(m, n, device=device, dtype=dtype), None
    if dtype == torch.float32 and out is not None:
        return out.zero_(), None
    acc = torch.zeros(m, n, device=device, dtype=torch.float32)
    return acc, acc


def _finish(y, acc, dtype, out):
    if acc is None:
        return y
    if out is not None:
        return out.copy_(acc)
    return acc if dtype == torch.float32 else acc.to(dtype)


def run_forward(fmt: int, x2: torch.Tensor, w, meta, s, z, bias, n: int, k: int, group: Optional[int],
                strides: tuple, out: Optional[torch.Tensor] = None, split_k: Optional[int] = None) -> torch.Tensor:
    """``y [M, N] = x2 @ dequant(W).T + bias`` through the plan for this shape. ``strides`` =
    ``(stride_wn, stride_mn, stride_sn)``; unused pointers may be any tensor. ``split_k``
    overrides the plan's split (small and medium M)."""
    m = x2.shape[0]
    p = plan_forward(fmt, m, n, k, group, x2.dtype, sm_count(x2.device))
    if split_k is not None:
        if not isinstance(split_k, int) or split_k < 1:
            raise ValueError(f"split_k must be an integer >= 1, got {split_k!r}")
        if p.regime != "large":
            p = Plan(p.kernel, p.regime, p.config, split_k, p.block_m, p.atomic or split_k > 1)
    y, acc = _out(m, n, x2.dtype, x2.device, p.atomic, out)
    b = bias if bias is not None else s
    meta = meta if meta is not None else w
    z = z if z is not None else s
    g = group or 1
    if p.kernel == "gemv":
        c = p.config
        # the int4 GEMVs read codes as int32 words (2:4 + int4: metadata as 16-bit halves, or as
        # int32 words and fp16 x as int32 pairs at M = 1)
        if fmt in GROUPED and w.data_ptr() % 4:
            w = w.clone()
        if fmt == S24I4 and meta.data_ptr() % 4:
            meta = meta.clone()
        if fmt == S24I4 and p.block_m == 1 and x2.dtype == torch.float16 and x2.data_ptr() % 4:
            x2 = x2.clone()
        grid = (triton.cdiv(n, c.kwargs["BLOCK_N"]), p.split)
        gemv_kernel[grid](x2, w, meta, s, z, b, y, m, n, k, p.split, x2.stride(0), *strides, y.stride(0),
                          FORMAT=fmt, GROUP_SIZE=g, HAS_BIAS=bias is not None, ATOMIC=p.atomic,
                          BLOCK_M=p.block_m, num_warps=c.num_warps, num_stages=c.num_stages, **c.kwargs)
    elif p.regime == "medium":
        c = p.config
        grid = (triton.cdiv(m, c.kwargs["BLOCK_M"]) * triton.cdiv(n, c.kwargs["BLOCK_N"]), p.split)
        gemm_kernel[grid](x2, w, meta, s, z, b, y, m, n, k, p.split, m_bucket(m), x2.stride(0), *strides,
                          y.stride(0), FORMAT=fmt, GROUP_SIZE=g, HAS_BIAS=bias is not None,
                          F32=f32_dot(x2.dtype), ATOMIC=p.atomic, num_warps=c.num_warps,
                          num_stages=c.num_stages, **c.kwargs)
    else:
        grid = lambda meta_: (triton.cdiv(m, meta_["BLOCK_M"]) * triton.cdiv(n, meta_["BLOCK_N"]), 1)  # noqa: E731
        _gemm_large[family(fmt)][grid](x2, w, meta, s, z, b, y, m, n, k, 1, m_bucket(m), x2.stride(0), *strides,
                                       y.stride(0), FORMAT=fmt, GROUP_SIZE=g, HAS_BIAS=bias is not None,
                                       F32=f32_dot(x2.dtype), ATOMIC=False)
    return _finish(y, acc, x2.dtype, out)


def run_backward_input(fmt: int, g2: torch.Tensor, w, meta, s, z, n: int, k: int, group: Optional[int],
                       strides: tuple, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``dX [M, K] = g2 @ dequant(W)`` through the plan for this shape."""
    m = g2.shape[0]
    p = plan_backward(fmt, m, n, k, group, g2.dtype, sm_count(g2.device))
    dx, acc = _out(m, k, g2.dtype, g2.device, p.atomic, out)
    meta = meta if meta is not None else w
    z = z if z is not None else s
    gs = group or 1
    args = (g2, w, meta, s, z, dx, m, n, k, p.split, m_bucket(m), g2.stride(0), *strides, dx.stride(0))
    if p.regime == "medium":
        c = p.config
        grid = (triton.cdiv(m, c.kwargs["BLOCK_M"]) * triton.cdiv(k, c.kwargs["BLOCK_K"]), p.split)
        dx_kernel[grid](*args, FORMAT=fmt, GROUP_SIZE=gs, F32=f32_dot(g2.dtype), ATOMIC=p.atomic,
                        num_warps=c.num_warps, num_stages=c.num_stages, **c.kwargs)
    else:
        grid = lambda meta_: (triton.cdiv(m, meta_["BLOCK_M"]) * triton.cdiv(k, meta_["BLOCK_K"]), 1)  # noqa: E731
        _dx_large[family(fmt)][grid](*args, FORMAT=fmt, GROUP_SIZE=gs, F32=f32_dot(g2.dtype), ATOMIC=False)
    return _finish(dx, acc, g2.dtype, out)
