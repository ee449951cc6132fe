"""CPU fast paths of every compressed format: host launchers around PyTorch's native CPU kernels
and the numba kernels of ``kernels/numba_cpu.py``.

Which kernel runs, and in what precision (float32 models; bf16 inputs run natively where noted):

=================  =============================================  ===========================
format             forward                                        input gradient dX = dY W
=================  =============================================  ===========================
int8 weight-only   ``torch._weight_int8pack_mm`` on the stored     numba from the codes (M=1),
                   int8 codes (K % 16 == 0); activations cast     else bf16 tiles where bf16
                   to **bf16**, output cast back to x's dtype;    is fast, else BLAS on the
                   M <= 2: ``int8_weight_linear_fp32``, a numba   weight unpacked by numba
                   GEMV with **float32** activations
int4 weight-only   ``torch._weight_int4pack_mm_for_cpu``           as int8, from the nibbles
                   (tinygemm) on a converted copy (N % 16 == 0);
                   **bf16** activations, output cast back
int8 dynamic       per-token int8 quantisation, exact int32 dot,   as int8 weight-only
                   float32 rescale: fbgemm's or oneDNN's u8 x s8  (straight-through,
                   GEMM on a prepacked copy where exact (VNNI;    ``dY @ dequant(W)``)
                   ``kernels/cpu_int8_gemm.py``), a numba int8
                   GEMV (``int8_dynamic_linear_gemv``), or
                   ``torch._int_mm`` (it reorders the weight on
                   every call)
fp8 dynamic        per-token e4m3 (one numba pass, bit-exact      numba at M=1, else BLAS on
                   against torch's cast); codes decoded by bit    the decoded weight
                   arithmetic (numba GEMV at M=1, the few-rows    (straight-through)
                   GEMV at 2-8 rows, else BLAS on the decoded
                   weight), float32 accumulation
2:4                numba on kept values + metadata, float32:      numba, from the packed
                   M=1 x-selecting GEMV, 2-8 rows the few-rows     weight (M=1 and blocked);
                   GEMV (:func:`few_rows`), else blocked kernels  from 128 rows BLAS on exact
                                                                  float32 tiles
2:4 + int4         numba on nibbles + metadata, float32            as 2:4
=================  =============================================  ===========================

The bf16 paths round each activation to 8 significant bits, so their relative output error
against the float64 product of the stored weight is bounded by about ``2**-8`` (input rounding,
products accumulated in float32, output rounded to bf16): tests hold them to 1e-2 relative
Frobenius error; the float32 paths to 1e-5.

Derived weights (the tinygemm copy of an int4 weight with ``zp = (8 - z) * s`` scales/zeros, bf16
scales for int8, fbgemm's and oneDNN's prepacked int8 codes for int8 dynamic) are built once per layer by
:func:`derived` and counted in the layer's bytes.
The tinygemm conversion is exact: robcomp's ``(q - z) * s`` equals tinygemm's ``(q - 8) * s + zp``.

Every format except int8 dynamic also has the ``bf16_tiles`` path (``kernels/bf16_tiles.py``;
2:4 only when its values are stored in bf16): the weight decoded tile by tile into bf16 for
oneDNN's bf16 GEMM, ~3x the float32 GEMM's speed on CPUs with bf16 dot products.

Under ``torch.compile`` the numba kernels run through ``torch.library`` custom ops
(``robcomp::cpu_*``, the bf16 tiles ``robcomp::cpu_bf16_tiles_mm``) with fake implementations;
in eager mode they are called directly to keep the per-call overhead small.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from robcomp.kernels import numba_cpu as NB
from robcomp.kernels import reference as ref

__all__ = ["available", "native_dtypes", "derived_int8", "derived_int4", "int8_weight_linear", "int8_weight_linear_fp32",
           "int4_linear",
           "int8_dynamic_linear", "int8_dynamic_linear_gemv",
           "fp8_dynamic_linear", "sparse24_linear", "sparse24_int4_linear",
           "dense_weight", "lut_int8", "lut_fp8"]

#: activation dtypes the native CPU paths accept (others use the reference path)
NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def available() -> bool:
    return NB.available()


def native_dtypes() -> tuple[torch.dtype, ...]:
    return NATIVE_DTYPES


def _parallel() -> bool:
    threads = torch.get_num_threads()
    if threads > 1 and NB.numba is not None:
        NB.numba.set_num_threads(min(threads, NB.numba.config.NUMBA_NUM_THREADS))
        return True
    return False


@functools.lru_cache(maxsize=None)
def lut_int8() -> torch.Tensor:
    """float32 value of each int8 bit pattern (index = the code's uint8 view)."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.int8).to(torch.float32)


@functools.lru_cache(maxsize=None)
def lut_fp8() -> torch.Tensor:
    """float32 value of each float8_e4m3fn bit pattern."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)


# ------------------------------------------------------------------------- numba entry points
def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _np(t: torch.Tensor) -> np.ndarray:
    if t.requires_grad:
        t = t.detach()
    return (t if t.is_contiguous() else t.contiguous()).numpy()


def _by_meta_byte(x1: torch.Tensor) -> np.ndarray:
    """``xq[h, t, j] = x[8 j + 4 h + t]`` of a 1-D x, the 2:4 batch-1 kernels' layout (by meta
    byte, half and lane); numpy's reshape and copy cost a fifth of torch's on a 256-wide row."""
    return np.ascontiguousarray(_np(x1).reshape(-1, 2, 4).transpose(1, 2, 0))


def _blocked(t2: torch.Tensor, width: int) -> np.ndarray:
    """``[M, D] -> [ceil(M / width), D, width]`` float32 (zero-padded rows): the M > 1 kernels'
    block layout, ``tb[b, d, j] = t2[b * width + j, d]``."""
    m, d = t2.shape
    mp = -(-m // width) * width
    if mp != m:
        t2 = torch.cat([t2, t2.new_zeros(mp - m, d)])
    return _np(t2.detach().reshape(mp // width, width, d).transpose(1, 2).contiguous())


def _run_fwd(name: str, x2: torch.Tensor, n: int, *weights) -> torch.Tensor:
    """``[M, K] float32 -> [M, N] float32`` through the numba forward kernel ``name``."""
    m = x2.shape[0]
    par = _parallel()
    if m == 1 and name == "s24i4" and _s24i4_fwd1_ok(weights):
        qv, scales, zeros, meta, hg = weights
        out = np.empty(n, np.float32)
        # x by half and lane of each meta byte's 8 columns: xq[h, t, j] = x[8 j + 4 h + t]
        xq = _by_meta_byte(x2[0])
        NB.kernel("s24i4_fwd1", par, hg)(xq, qv.view(np.uint16), scales, zeros, meta, out)
        return torch.from_numpy(out.reshape(1, n))  # no view: the caller need not copy it
    if m == 1 and name == "sp24" and x2.shape[1] % 8 == 0:
        out = np.empty(n, np.float32)
        NB.kernel("sp24_fwd1", par)(_by_meta_byte(x2[0]), *weights, out)
        return torch.from_numpy(out.reshape(1, n))  # no view: the caller need not copy it
    if few_rows(m, x2.shape[1]) and (name == "fp8" or (name == "sp24" and x2.shape[1] % 8 == 0)
                                     or (name == "s24i4" and _s24i4_fwd1_ok(weights))):
        return _few_rows_fwd(name, x2, n, par, weights)
    if m == 1 and name not in ("sp24", "s24i4"):
        out = np.empty(n, np.float32)
        NB.kernel(name + "_fwd1", par)(_np(x2[0]), *weights, out)
        return torch.from_numpy(out.reshape(1, n))  # no view: the caller need not copy it
    width = NB.block_width(m)
    out = np.empty((n, -(-m // width) * width), np.float32)
    NB.kernel(f"{name}_fwdb{width}", par)(_blocked(x2, width), *weights, out)
    # a fresh [M, N] tensor, never a view: compiled graphs replay outputs with the fake's strides
    return torch.from_numpy(out)[:, :m].t().contiguous()


def few_rows(m: int, k: int) -> bool:
    """Whether an ``m``-row product with ``k`` inputs takes the few-rows GEMVs (2:4, 2:4+int4 and
    fp8 forwards; the 2:4 ones also need their layout conditions)."""
    return 1 < m <= NB.FEW_ROWS_UP_TO and min(m, 4) * k <= NB.FEW_ROWS_MAX_MK


def _few_rows_fwd(name, x2, n, par, weights) -> torch.Tensor:
    """2 to ``NB.FEW_ROWS_UP_TO`` rows: the 2:4 (x-selecting) and fp8 GEMVs over up to 4 rows of
    x per pass over the weight (x in L1), so the decode is shared by those rows."""
    m = x2.shape[0]
    out = np.empty((m, n), np.float32)
    if name != "fp8":  # by meta byte, half and lane: xq[i, h, t, j] = x[i, 8 j + 4 h + t]
        xq = np.ascontiguousarray(_np(x2).reshape(m, -1, 2, 4).transpose(0, 2, 3, 1))
    for i in range(0, m, 4):
        rows = min(4, m - i)
        if name == "fp8":  # x rows as they are: the kernel reduces over k
            xr = _np(x2[i:i + rows])
            NB.kernel("fp8_fwd1" if rows == 1 else f"fp8_fwdm{rows}", par)(
                xr[0] if rows == 1 else xr, *weights, out[i] if rows == 1 else out[i:i + rows])
            continue
        xi, oi = xq[i:i + rows], out[i:i + rows]
        if rows == 1:
            xi, oi = xi[0], oi[0]
        if name == "sp24":
            NB.kernel("sp24_fwd1" if rows == 1 else f"sp24_fwdm{rows}", par)(xi, *weights, oi)
        else:
            qv, scales, zeros, meta, hg = weights
            NB.kernel("s24i4_fwd1" if rows == 1 else f"s24i4_fwdm{rows}", par, hg)(
                xi, qv.view(np.uint16), scales, zeros, meta, oi)
    return torch.from_numpy(out)


def _few_rows_bwd(name, g2, k, weights) -> torch.Tensor:
    """dX for 2 to ``NB.FEW_ROWS_UP_TO`` rows of dY: up to 4 rows per pass over the weight, dX of
    those rows in L1, in the one-row kernels' layouts."""
    m = g2.shape[0]
    gn = _np(g2)
    if name == "fp8":
        dx = np.zeros((m, k), np.float32)
    else:  # by meta byte, half and lane: dxq[i, h, t, j] = dX[i, 8 j + 4 h + t]
        dx = np.zeros((m, 2, 4, k // 8), np.float32)
    for i in range(0, m, 4):
        rows = min(4, m - i)
        gi, di = gn[i:i + rows], dx[i:i + rows]
        if rows == 1:  # the one-row kernels take 1-D dY and their own dX layout
            NB.kernel(f"{name}_bwd1")(gi[0], *weights, di[0])
        elif name == "s24i4":
            qv, scales, zeros, meta, hg = weights
            NB.kernel(f"s24i4_bwdm{rows}", False, hg)(gi, qv, scales, zeros, meta, di)
        else:
            NB.kernel(f"{name}_bwdm{rows}")(gi, *weights, di)
    if name == "fp8":
        return torch.from_numpy(dx)
    return torch.from_numpy(np.ascontiguousarray(dx.transpose(0, 3, 1, 2)).reshape(m, k))


def _s24i4_fwd1_ok(weights) -> bool:
    # the batch-1 kernel reads two groups' codes as one uint16 and a scale group as whole meta bytes
    qv, hg = weights[0], weights[-1]
    return qv.shape[1] % 2 == 0 and hg % 4 == 0


def _unpack_f32(name: str, shape: tuple[int, int], *weights) -> torch.Tensor:
    out = np.empty(shape, np.float32)
    NB.kernel(name + "_unpack", _parallel())(*weights, out)
    return torch.from_numpy(out)


def _run_bwd(name: str, g2: torch.Tensor, k: int, *weights) -> torch.Tensor:
    """``dY [M, N] float32 -> dX [M, K] float32``: the numba kernel at M = 1 (reads the packed
    weight once; the 2:4 lane kernels where K % 8 == 0), the few-rows kernels (2:4, 2:4+int4,
    fp8) up to ``NB.FEW_ROWS_UP_TO`` rows; above, the 2:4 formats' blocked kernels, the others
    BLAS on the weight unpacked by numba into float32."""
    if g2.shape[0] == 1 and name in ("sp24", "s24i4") and k % 8 == 0:
        # dX by meta byte, half and lane (dxq[h, t, j] = dX[8 j + 4 h + t]), as the forward's x
        dxq = np.zeros((2, 4, k // 8), np.float32)
        NB.kernel(name + "_bwd1")(_np(g2[0]), *weights, dxq)
        return torch.from_numpy(np.ascontiguousarray(dxq.transpose(2, 0, 1)).reshape(1, k))
    if g2.shape[0] == 1 and name not in ("sp24", "s24i4"):
        if name == "int4":  # even / odd k in two planes
            dx2 = np.zeros((2, k // 2), np.float32)
            NB.kernel(name + "_bwd1")(_np(g2[0]), *weights, dx2)
            return torch.from_numpy(dx2).t().reshape(1, k)
        dx = np.zeros(k, np.float32)
        NB.kernel(name + "_bwd1")(_np(g2[0]), *weights, dx)
        return torch.from_numpy(dx).reshape(1, k)
    if few_rows(g2.shape[0], k) and (name == "fp8" or (name in ("sp24", "s24i4") and k % 8 == 0)):
        return _few_rows_bwd(name, g2, k, weights)
    if name in ("sp24", "s24i4"):  # blocked over rows of dY, straight from the packed weight
        width = NB.block_width(g2.shape[0])
        gb = _blocked(g2, width)
        dxb = np.zeros((gb.shape[0], k, width), np.float32)
        NB.kernel(f"{name}_bwdb{width}", _parallel())(gb, *weights, dxb)
        return torch.from_numpy(dxb).transpose(1, 2).reshape(-1, k)[:g2.shape[0]]
    unpack_weights = weights if name != "lut8" else (*weights, np.ones(g2.shape[1], np.float32))
    return g2 @ _unpack_f32(name, (g2.shape[1], k), *unpack_weights)


def _sp24_fwd(x2, values, meta):
    return _run_fwd("sp24", x2, values.shape[0], _np(values.float()), _np(meta))


#: from this many rows of dY the 2:4 dX runs BLAS on exact float32 tiles of the weight
#: (``bf16_tiles.sparse24_input_grad_f32``) instead of the blocked kernel: 1.4x faster at M = 256
SP24_DX_TILES_FROM_M = 128


def _sp24_bwd(g2, values, meta):
    if g2.shape[0] >= SP24_DX_TILES_FROM_M and values.shape[1] % 4 == 0:
        from robcomp.kernels import bf16_tiles
        return bf16_tiles.sparse24_input_grad_f32(g2, values, meta)
    return _run_bwd("sp24", g2, values.shape[1] * 2, _np(values.float()), _np(meta))


def _s24i4_fwd(x2, qv, scales, zeros, meta, group_size):
    return _run_fwd("s24i4", x2, qv.shape[0], _np(qv), _np(scales.float()), _np(zeros.float()), _np(meta),
                    group_size // 2)


def _s24i4_bwd(g2, qv, scales, zeros, meta, group_size):
    return _run_bwd("s24i4", g2, qv.shape[1] * 4, _np(qv), _np(scales.float()), _np(zeros.float()), _np(meta),
                    group_size // 2)


def _lut8_fwd(x2, codes, lut):
    # M > 1: table-decode the codes once (numba) and let MKL multiply: same float32 accumulation
    if x2.shape[0] == 1:
        return _run_fwd("lut8", x2, codes.shape[0], _np(codes), _np(lut))
    w = _unpack_f32("lut8", tuple(codes.shape), _np(codes), _np(lut), np.ones(codes.shape[0], np.float32))
    return x2 @ w.t()


def _lut8_bwd(g2, codes, lut):
    return _run_bwd("lut8", g2, codes.shape[1], _np(codes), _np(lut))


def _fp8_fwd(x2, codes, scale):
    """``x2 @ (e4m3(codes) * scale).T``: the bit-decoding GEMV at M = 1 and over up to 4 rows per
    weight pass up to ``NB.FEW_ROWS_UP_TO`` rows (x in L1), else BLAS on the weight decoded once
    per call (float32, scale folded in)."""
    m, k = x2.shape
    if m == 1 or few_rows(m, k):
        return _run_fwd("fp8", x2, codes.shape[0], _np(codes)) * scale[None, :]
    return x2 @ _unpack_f32("fp8", tuple(codes.shape), _np(codes), _np(scale)).t()


def _fp8_bwd(g2, codes):
    """``dY @ e4m3(codes)`` (the caller folds the per-channel scale into dY)."""
    if g2.shape[0] == 1 or few_rows(g2.shape[0], codes.shape[1]):
        # the kernels' decoded values are 2**-120 of the codes' (see numba_cpu)
        return _run_bwd("fp8", g2 * 2.0 ** 120, codes.shape[1], _np(codes))
    return g2 @ _unpack_f32("fp8", tuple(codes.shape), _np(codes), np.ones(codes.shape[0], np.float32))


def _int8_bwd(g2, qweight):
    """``dY @ q`` (int8 codes; the caller folds the per-channel scale into dY)."""
    if g2.shape[0] == 1:
        return _run_bwd("int8", g2, qweight.shape[1], _np(qweight))
    return _lut8_bwd(g2, qweight.view(torch.uint8), lut_int8())


def _int4_bwd(g2, qweight, scales, zeros, group_size):
    return _run_bwd("int4", g2, qweight.shape[1] * 2, _np(qweight), _np(scales.float()), _np(zeros.float()),
                    group_size)


def _quantize_rows_into(x2: torch.Tensor, dtype, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    xf = _f32(x2).contiguous()
    q = np.empty(tuple(xf.shape), dtype)
    scale = np.empty(xf.shape[0], np.float32)
    NB.kernel("int8_quantize_rows")(xf.detach().numpy(), q, scale, offset)
    return torch.from_numpy(q), torch.from_numpy(scale)


def _quantize_fp8_rows(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.quantize_rows_fp8`` in one numba pass, the e4m3 codes as their float32 values
    (what the kernels multiply with; the same values as the reference's cast, bit for bit)."""
    xf = _f32(x2).contiguous()
    q = np.empty(tuple(xf.shape), np.float32)
    scale = np.empty(xf.shape[0], np.float32)
    NB.kernel("fp8_quantize_rows")(xf.detach().numpy(), q, scale)
    return torch.from_numpy(q), torch.from_numpy(scale)


def _quantize_int8_rows(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.quantize_rows_int8`` (same scale and round-half-away codes) in one numba pass."""
    return _quantize_rows_into(x2, np.int8, 0)


def _quantize_int8_rows_f32(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes of ``_quantize_int8_rows`` as float32 values (fbgemm's float-input int8 GEMM;
    converted by torch: numba's int -> float32 stores do not vectorise, 4x slower)."""
    q, scale = _quantize_rows_into(x2, np.int8, 0)
    return q.float(), scale


def _quantize_uint8_rows(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes of ``_quantize_int8_rows`` plus 128, as uint8 (oneDNN's u8 x s8 GEMM, zero point 128)."""
    return _quantize_rows_into(x2, np.uint8, 128)


# torch.library wrappers so that torch.compile traces the numba kernels (eager calls skip them)
def _op(name, impl, fake):
    lib_op = torch.library.custom_op(f"robcomp::cpu_{name}", mutates_args=())(impl)
    lib_op.register_fake(fake)

    def call(*args):
        return lib_op(*args) if torch.compiler.is_compiling() else impl(*args)
    return call


def _fake_fwd(n_of):
    return lambda x2, w, *rest: x2.new_empty((x2.shape[0], n_of(w)), dtype=torch.float32)


def _fake_bwd(k_of):
    return lambda g2, w, *rest: g2.new_empty((g2.shape[0], k_of(w)), dtype=torch.float32)


def _sp24_fwd_op(x2: torch.Tensor, values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    return _sp24_fwd(x2, values, meta)


def _sp24_bwd_op(g2: torch.Tensor, values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    return _sp24_bwd(g2, values, meta)


def _s24i4_fwd_op(x2: torch.Tensor, qv: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  meta: torch.Tensor, group_size: int) -> torch.Tensor:
    return _s24i4_fwd(x2, qv, scales, zeros, meta, group_size)


def _s24i4_bwd_op(g2: torch.Tensor, qv: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  meta: torch.Tensor, group_size: int) -> torch.Tensor:
    return _s24i4_bwd(g2, qv, scales, zeros, meta, group_size)


def _lut8_fwd_op(x2: torch.Tensor, codes: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    return _lut8_fwd(x2, codes, lut)


def _lut8_bwd_op(g2: torch.Tensor, codes: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    return _lut8_bwd(g2, codes, lut)


def _fp8_fwd_op(x2: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return _fp8_fwd(x2, codes, scale)


def _fp8_bwd_op(g2: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    return _fp8_bwd(g2, codes)


def _int8_bwd_op(g2: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    return _int8_bwd(g2, qweight)


def _int4_bwd_op(g2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int) -> torch.Tensor:
    return _int4_bwd(g2, qweight, scales, zeros, group_size)


def _int8_gemv_f32_op(x2: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x2 [M, K] float32 @ (q * scale).T``, up to two rows of x per pass over the codes."""
    m, n = x2.shape[0], qweight.shape[0]
    width = 1 if m == 1 else INT8_FP32_ROWS
    rows = -(-m // width) * width
    xb = x2 if rows == m else torch.cat([x2, x2.new_zeros(rows - m, x2.shape[1])])
    out = np.empty((rows, n), np.float32)
    NB.kernel(f"int8_fwdb{width}", _parallel())(_np(xb.reshape(-1, width, xb.shape[1])), _np(qweight), _np(scale), out)
    return torch.from_numpy(out[:m])


def _int8_gemv_i32_op(xq: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """``xq [M, K] int8 @ q.T`` accumulated exactly in int32 (as ``torch._int_mm``), row by row."""
    out = np.empty((xq.shape[0], qweight.shape[0]), np.int32)
    NB.kernel("i8i8_fwdb1", _parallel())(_np(xq.reshape(-1, 1, xq.shape[1])), _np(qweight), out)
    return torch.from_numpy(out)


sp24_fwd = _op("sp24_fwd", _sp24_fwd_op, _fake_fwd(lambda w: w.shape[0]))
sp24_bwd = _op("sp24_bwd", _sp24_bwd_op, _fake_bwd(lambda w: w.shape[1] * 2))
s24i4_fwd = _op("s24i4_fwd", _s24i4_fwd_op, _fake_fwd(lambda w: w.shape[0]))
s24i4_bwd = _op("s24i4_bwd", _s24i4_bwd_op, _fake_bwd(lambda w: w.shape[1] * 4))
lut8_fwd = _op("lut8_fwd", _lut8_fwd_op, _fake_fwd(lambda w: w.shape[0]))
lut8_bwd = _op("lut8_bwd", _lut8_bwd_op, _fake_bwd(lambda w: w.shape[1]))
fp8_fwd = _op("fp8_fwd", _fp8_fwd_op, _fake_fwd(lambda w: w.shape[0]))
fp8_bwd = _op("fp8_bwd", _fp8_bwd_op, _fake_bwd(lambda w: w.shape[1]))
int4_bwd = _op("int4_bwd", _int4_bwd_op, _fake_bwd(lambda w: w.shape[1] * 2))
int8_bwd = _op("int8_bwd", _int8_bwd_op, _fake_bwd(lambda w: w.shape[1]))
int8_gemv_f32 = _op("int8_gemv_f32", _int8_gemv_f32_op, _fake_fwd(lambda w: w.shape[0]))
int8_gemv_i32 = _op("int8_gemv_i32", _int8_gemv_i32_op,
                    lambda xq, w: xq.new_empty((xq.shape[0], w.shape[0]), dtype=torch.int32))
quantize_int8_rows = _op("quantize_int8_rows", _quantize_int8_rows,
                         lambda x2: (torch.empty_like(x2, dtype=torch.int8),
                                     x2.new_empty((x2.shape[0],), dtype=torch.float32)))
quantize_fp8_rows = _op("quantize_fp8_rows", _quantize_fp8_rows,
                        lambda x2: (torch.empty_like(x2, dtype=torch.float32),
                                    x2.new_empty((x2.shape[0],), dtype=torch.float32)))
quantize_int8_rows_f32 = _op("quantize_int8_rows_f32", _quantize_int8_rows_f32,
                             lambda x2: (torch.empty_like(x2, dtype=torch.float32),
                                         x2.new_empty((x2.shape[0],), dtype=torch.float32)))
quantize_uint8_rows = _op("quantize_uint8_rows", _quantize_uint8_rows,
                          lambda x2: (torch.empty_like(x2, dtype=torch.uint8),
                                      x2.new_empty((x2.shape[0],), dtype=torch.float32)))


# ------------------------------------------------------------------------- autograd Function
class _Linear2d(torch.autograd.Function):
    """``y = fwd(x2) + bias`` on 2-D ``x2`` with ``dX = bwd(dY)``; the packed weight is frozen.
    The output is never a view (in-place ops after the layer, e.g. ReLU(inplace=True), stay legal)."""

    @staticmethod
    def forward(ctx, x2, bias, fwd, bwd):
        if ctx is not None:  # None: called directly, no gradient recorded (_Linear.apply)
            ctx.bwd, ctx.x_dtype = bwd, x2.dtype
            ctx.bias_dtype = None if bias is None else bias.dtype
        y = fwd(x2)
        if bias is not None:
            y = y + bias.to(y.dtype)
        y = y.to(x2.dtype)
        if y._base is not None:  # a view of a kernel's buffer (numpy-backed or transposed)
            y = y.clone(memory_format=torch.contiguous_format)
        return y

    @staticmethod
    def backward(ctx, gy):
        g2 = gy.to(torch.float32)
        gx = ctx.bwd(g2).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        gb = None
        if ctx.bias_dtype is not None and ctx.needs_input_grad[1]:
            gb = g2.sum(0).to(ctx.bias_dtype)
        return gx, gb, None, None


class _Linear:
    """Flattens the leading dimensions outside the autograd Function (views are legal there);
    without a gradient to record (inference, ``no_grad``) skips the Function, whose entry costs
    more than a small layer's kernel (bench/test_cpu.py, per-call overhead)."""

    @staticmethod
    def apply(x, bias, fwd, bwd, n):
        x2 = _flat(x)
        if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
            y = _Linear2d.apply(x2, bias, fwd, bwd)
        else:
            y = _Linear2d.forward(None, x2, bias, fwd, bwd)
        return y.reshape(*x.shape[:-1], n)


def _check(x: torch.Tensor, k: int) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.device.type != "cpu":
        raise ValueError(f"the CPU kernels take CPU tensors; x is on {x.device}")
    if x.shape[-1] != k:
        raise ValueError(f"x's last dimension is {x.shape[-1]}, expected in_features={k}")
    if x.numel() == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)}); nothing to multiply")


def _f32(x2: torch.Tensor) -> torch.Tensor:
    return x2 if x2.dtype == torch.float32 else x2.float()


# ------------------------------------------------------------------------------- the formats
def derived_int8(scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """bf16 scales for ``_weight_int8pack_mm`` (its scales must have the activation dtype)."""
    return {"scale_bf16": scale.detach().to(torch.bfloat16).contiguous()}


def _tiles_for_grad(g2: torch.Tensor) -> bool:
    """The int8/int4 formats' dX for M > 1 runs in bf16 tiles where bf16 GEMMs are fast (the
    weight-only formats' activation precision; int8 dynamic's straight-through estimate)."""
    if g2.shape[0] == 1:
        return False
    from robcomp.kernels import bf16_tiles
    return bf16_tiles.fast_bf16()


def _int8_grad(qweight, s32):
    """dX = (dY * scale) @ codes of a per-channel int8 weight (weight-only, and int8 dynamic's
    straight-through estimate): numba at M = 1, bf16 tiles where bf16 is fast, else numba."""
    def bwd(g2):
        if _tiles_for_grad(g2):
            from robcomp.kernels import bf16_tiles
            return bf16_tiles.int8_input_grad(g2 * s32, qweight)
        return int8_bwd(g2 * s32, qweight)
    return bwd


def int8_weight_linear(x, qweight, scale, bias, d):
    """W8A16 forward with ``_weight_int8pack_mm`` (bf16 activations); dX from the int8 codes."""
    _check(x, qweight.shape[1])
    if qweight.shape[1] % 16:
        # torch's kernel reads out of bounds (segfaults) for such K at M > 1: refuse it
        raise ValueError(f"the CPU int8 kernel needs in_features divisible by 16, got {qweight.shape[1]}")
    s32 = scale.float()

    def fwd(x2):
        return torch._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), qweight, d["scale_bf16"])

    bwd = _int8_grad(qweight, s32)
    return _Linear.apply(x, bias, fwd, bwd, qweight.shape[0])


#: rows per pass of the fp32-activation int8 GEMV (``int8_weight_linear_fp32``); above them the
#: bf16 ``_weight_int8pack_mm`` is faster (the numba loop runs out of vector registers)
INT8_FP32_ROWS = 2


def int8_weight_linear_fp32(x, qweight, scale, bias):
    """W8A32: numba GEMV on the stored int8 codes with **float32** activations (int8 -> fp32
    convert + FMA per code, float32 accumulation, per-channel scale at the end), up to two rows of
    x per pass over the weight; dX as ``int8_weight_linear``. Fastest at M <= ``INT8_FP32_ROWS``."""
    _check(x, qweight.shape[1])
    s32 = scale.float().contiguous()
    n = qweight.shape[0]

    def fwd(x2):
        return int8_gemv_f32(_f32(x2), qweight, s32)

    def bwd(g2):
        return int8_bwd(g2 * s32, qweight)
    return _Linear.apply(x, bias, fwd, bwd, n)


def derived_int4(qweight, scales, zeros, group_size) -> dict[str, torch.Tensor] | None:
    """The tinygemm copy of a robcomp int4 weight: packed codes and ``[K/g, N, 2]`` bf16
    (scale, zp) with ``zp = (8 - zero) * scale``; None where tinygemm cannot take the shape."""
    n, kh = qweight.shape
    if group_size not in (32, 64, 128, 256) or (2 * kh) % group_size:
        return None
    q = torch.stack([qweight & 0xF, qweight >> 4], dim=-1).reshape(n, 2 * kh).to(torch.int32)
    try:
        packed = torch._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
    except RuntimeError:
        return None
    s = scales.float()
    zp = (8.0 - zeros.float()) * s
    sz = torch.stack([s, zp], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return {"int4pack": packed, "scales_zeros": sz}


def int4_linear(x, qweight, scales, zeros, group_size, bias, d):
    """W4A16 forward with tinygemm's CPU kernel (bf16 activations); dX from the stored nibbles."""
    _check(x, qweight.shape[1] * 2)

    def fwd(x2):
        return torch._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), d["int4pack"], group_size,
                                                 d["scales_zeros"])

    def bwd(g2):
        if _tiles_for_grad(g2):
            from robcomp.kernels import bf16_tiles
            return bf16_tiles.int4_input_grad(g2, qweight, scales, zeros, group_size)
        return int4_bwd(g2, qweight, scales, zeros, group_size)
    return _Linear.apply(x, bias, fwd, bwd, qweight.shape[0])


def int8_dynamic_linear(x, qweight, scale, bias):
    """W8A8: per-token int8 (reference rounding), ``torch._int_mm`` int32 dot, float32 rescale; STE dX."""
    _check(x, qweight.shape[1])
    s32 = scale.float()

    def fwd(x2):
        xq, xs = quantize_int8_rows(x2)
        acc = torch._int_mm(xq, qweight.t())
        return acc.to(torch.float32) * xs[:, None] * s32[None, :]

    bwd = _int8_grad(qweight, s32)
    return _Linear.apply(x, bias, fwd, bwd, qweight.shape[0])


def int8_dynamic_linear_gemv(x, qweight, scale, bias):
    """W8A8 as ``int8_dynamic_linear`` (same per-token codes, exact int32 dot, float32 rescale,
    STE dX) with a numba int8 GEMV instead of ``torch._int_mm``, one row of x per pass over the
    weight: faster at M = 1, where ``_int_mm`` reorders the weight on every call."""
    _check(x, qweight.shape[1])
    s32 = scale.float()
    n = qweight.shape[0]

    def fwd(x2):
        xq, xs = quantize_int8_rows(x2)
        return int8_gemv_i32(xq, qweight).to(torch.float32) * xs[:, None] * s32[None, :]

    bwd = _int8_grad(qweight, s32)
    return _Linear.apply(x, bias, fwd, bwd, n)


def fp8_dynamic_linear(x, qweight, scale, bias, nan_codes: bool = True):
    """FP8 e4m3: per-token e4m3 (reference rounding), float32 accumulation; STE dX. The weight's
    codes are decoded by bit arithmetic (numba GEMV at M = 1, else BLAS on the decoded weight);
    ``nan_codes`` (the weight holds NaN codes, see ``bf16_tiles.fp8_has_nan``) selects the
    256-entry-table decoders instead, which map them to NaN."""
    _check(x, qweight.shape[1])
    codes, s32 = qweight.view(torch.uint8), scale.float()
    if nan_codes:
        def fwd(x2):
            xq, xs = quantize_fp8_rows(x2)
            return lut8_fwd(xq, codes, lut_fp8()) * xs[:, None] * s32[None, :]

        def bwd(g2):
            return lut8_bwd(g2 * s32, codes, lut_fp8())
    else:
        def fwd(x2):
            xq, xs = quantize_fp8_rows(x2)
            return fp8_fwd(xq, codes, s32) * xs[:, None]

        def bwd(g2):
            return fp8_bwd(g2 * s32, codes)
    return _Linear.apply(x, bias, fwd, bwd, qweight.shape[0])


def sparse24_linear(x, values, meta, bias):
    """2:4 from kept values + metadata (numba, float32)."""
    _check(x, values.shape[1] * 2)
    return _Linear.apply(x, bias, lambda x2: sp24_fwd(_f32(x2), values, meta),
                         lambda g2: sp24_bwd(g2, values, meta), values.shape[0])


def sparse24_int4_linear(x, qvalues, scales, zeros, meta, group_size, bias):
    """2:4 + int4 from nibbles + metadata (numba, float32)."""
    _check(x, qvalues.shape[1] * 4)
    return _Linear.apply(x, bias, lambda x2: s24i4_fwd(_f32(x2), qvalues, scales, zeros, meta, group_size),
                         lambda g2: s24i4_bwd(g2, qvalues, scales, zeros, meta, group_size), qvalues.shape[0])


# ----------------------------------------------------------------------- dense-from-unpacked
def dense_weight(kind: str, *tensors, group_size: int | None = None) -> torch.Tensor:
    """The dense weight unpacked by numba: ``"int8"``/``"int4"`` into bf16 (the weight-only
    formats' CPU activation precision), ``"sparse24"``/``"sparse24_int4"``/``"fp8"`` into float32."""
    par = _parallel()
    if kind == "fp8":
        q, s = tensors
        return _unpack_f32("lut8", tuple(q.shape), _np(q.view(torch.uint8)), _np(lut_fp8()), _np(s.float()))
    if kind == "int8":
        q, s = tensors
        out = np.empty(tuple(q.shape), np.uint16)
        NB.kernel("int8_unpack_bf16", par)(_np(q), _np(s.float()), out)
        return torch.from_numpy(out).view(torch.bfloat16)
    if kind == "int4":
        q, s, z = tensors
        out = np.empty((q.shape[0], q.shape[1] * 2), np.uint16)
        NB.kernel("int4_unpack_bf16", par)(_np(q), _np(s.float()), _np(z.float()), group_size, out)
        return torch.from_numpy(out).view(torch.bfloat16)
    if kind == "sparse24":
        v, m = tensors
        out = np.empty((v.shape[0], v.shape[1] * 2), np.float32)
        NB.kernel("sp24_unpack", par)(_np(v.float()), _np(m), out)
        return torch.from_numpy(out)
    if kind == "sparse24_int4":
        q, s, z, m = tensors
        out = np.empty((q.shape[0], q.shape[1] * 4), np.float32)
        NB.kernel("s24i4_unpack", par)(_np(q), _np(s.float()), _np(z.float()), _np(m), group_size // 2, out)
        return torch.from_numpy(out)
    raise ValueError(f"kind must be one of 'int8', 'int4', 'sparse24', 'sparse24_int4', got {kind!r}")
