"""Triton 2:4 semi-structured sparse matmul: forward ``y = x · Wᵀ + b`` and input gradient ``dX = dY · W``.

Format (the same as :mod:`robcomp.kernels.reference`, which packs and unpacks it)
--------------------------------------------------------------------------------
``W`` is ``[N, K]`` (``out_features x in_features``), ``K % 4 == 0``. In every group of 4 consecutive
weights along K two are kept.

* ``values``: ``[N, K/2]``, row-major and contiguous, the two kept weights of each group in
  increasing position order. A ``BLOCK_K``-wide slice of W is a contiguous ``BLOCK_K/2`` run of
  ``values`` per row, so the kernels read it as one 2-D tile with vectorised, coalesced loads.
* ``meta``: ``uint8 [N, ceil(K/8)]``, one nibble per group (low nibble = even group, high nibble =
  odd group), nibble = ``idx0 | idx1 << 2`` with ``idx0 < idx1``. A ``BLOCK_K`` slice is a
  contiguous ``BLOCK_K/8``-byte run per row. Metadata costs 2 bits per kept value, so a 2:4 fp16
  weight moves 9/16 of the dense bytes (the 16/9 = 1.78x ceiling of a memory-bound matmul).

We kept the reference layout: both arrays are already contiguous along K, which is the direction
every kernel walks, so a wider word (int16/int32 per row chunk) would not widen the loads of a
tile that already spans several 16-byte sectors per row.

Kernels (one kernel, four layers, as in DESIGN.md)
--------------------------------------------------
1. ``_sparse24_gemv_kernel``: small M (``M <= GEMV_MAX_M``). Works in the compressed domain: for
   each kept value it selects the matching activation from the 4 of its group (register selects,
   no gather loads, no multiplications by the zeros), fp32 FMA accumulation, fused bias.
   ``_sparse24_gemm_kernel``: tiled, expands ``values + meta`` to a dense ``[BLOCK_N, BLOCK_K]``
   tile in registers and feeds ``tl.dot`` (tensor cores), fp32 accumulation, fused bias.
   ``_sparse24_bwd_input_kernel``: ``dX = dY · W`` from the same packed weight (same expansion,
   no dense or transposed copy).
2. ``sparse24_forward`` / ``sparse24_backward_input``: host launchers (validation, grid, config).
3. ``torch.ops.robcomp.sparse24_linear`` (+ ``sparse24_linear_backward_input``): torch.library
   custom ops with fake implementations and a registered autograd formula, so that
   ``torch.compile(model, fullgraph=True)`` traces models with 2:4 layers.
4. ``sparse24_linear(x, values, meta, bias=None)``: the functional form used by
   :class:`robcomp.nn.Sparse24Linear`.

Dtypes: ``x`` is fp16, bf16 or fp32 and fixes the compute dtype; the output (and ``dX``) has
``x``'s dtype. ``values`` may be any of the three float dtypes: it is cast to ``x``'s dtype in
registers before the product (exactly what the reference does with ``w.to(x.dtype)``), ``bias``
likewise. Products accumulate in fp32; fp32 inputs use IEEE fp32 dots (no TF32), matching
``F.linear``'s default.

Gradients: w.r.t. ``x`` and ``bias`` only. Packed weights are frozen; a ``values`` tensor that
requires grad is rejected with an error pointing to masked dense fine-tuning before packing.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import reference as ref
from ._common import FLOAT_DTYPES, check_activation, interpreting, tuning_configs

__all__ = [
    "sparse24_pack",
    "sparse24_unpack",
    "sparse24_forward",
    "sparse24_backward_input",
    "sparse24_linear",
    "aot_specs",
    "GEMV_MAX_M",
]

#: largest M served by the GEMV kernel; larger M goes to the tiled tensor-core kernel. The GEMV
#: does ~6 ALU ops per kept value and row, so beyond a few rows it stops being memory-bound and
#: the tensor-core kernel (BLOCK_M=16) wins; the crossover is to be confirmed on the GPU.
GEMV_MAX_M = 4
#: rows per GEMV program = next power of two of M (a launch-time constexpr, not autotuned)
GEMV_BLOCK_MS = (1, 2, 4)


def sparse24_pack(weight: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack ``weight [N, K]`` into ``(values [N, K/2], meta uint8 [N, ceil(K/8)])`` (see module doc).

    Keeps the two largest magnitudes of every group of 4 along K, or the entries of ``mask``.
    Raises ``ValueError`` for ``K % 4 != 0``, a mask that is not 2:4, or NaN/Inf weights.
    """
    return ref.sparse24_pack(weight, mask)


def sparse24_unpack(values: torch.Tensor, meta: torch.Tensor, in_features: int) -> torch.Tensor:
    """Exact inverse of :func:`sparse24_pack` (zeros at the pruned positions)."""
    return ref.sparse24_unpack(values, meta, in_features)


# ============================================================================== Triton kernels
@triton.jit
def _load_meta_idx(meta_ptr, rows, n_mask, g0, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Kept positions ``(idx0, idx1)``, each ``int32 [BLOCK_N, BLOCK_K/4]``, of the groups
    ``g0 .. g0 + BLOCK_K/4`` of the weight rows ``rows`` (int64)."""
    G = K // 4
    KM = (K + 7) // 8
    offs_g = g0 + tl.arange(0, BLOCK_K // 4)
    byte = tl.load(meta_ptr + rows[:, None] * KM + (offs_g // 2)[None, :],
                   mask=n_mask[:, None] & (offs_g < G)[None, :], other=0).to(tl.int32)
    nib = (byte >> ((offs_g % 2) * 4)[None, :]) & 0xF
    return nib & 3, nib >> 2


@triton.jit
def _load_values_pair(v_ptr, rows, n_mask, h0, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The two kept values ``(v0, v1)``, each ``[BLOCK_N, BLOCK_K/4]``, of the same groups: one
    contiguous ``[BLOCK_N, BLOCK_K/2]`` tile split in registers."""
    KH = K // 2
    offs_h = h0 + tl.arange(0, BLOCK_K // 2)
    v = tl.load(v_ptr + rows[:, None] * KH + offs_h[None, :],
                mask=n_mask[:, None] & (offs_h < KH)[None, :], other=0.0)
    return tl.split(tl.reshape(v, (BLOCK_N, BLOCK_K // 4, 2)))


@triton.jit
def _expand_24(v_ptr, meta_ptr, rows, n_mask, k0, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dense ``[BLOCK_N, BLOCK_K]`` tile of W (columns ``k0 .. k0 + BLOCK_K``), built in registers."""
    v0, v1 = _load_values_pair(v_ptr, rows, n_mask, k0 // 2, K, BLOCK_N, BLOCK_K)
    i0, i1 = _load_meta_idx(meta_ptr, rows, n_mask, k0 // 4, K, BLOCK_N, BLOCK_K)
    zero = tl.zeros_like(v0)
    d0 = tl.where(i0 == 0, v0, zero)
    d1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, zero))
    d2 = tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, zero))
    d3 = tl.where(i1 == 3, v1, zero)
    # join(join(d0, d2), join(d1, d3))[n, g, j, i] = d_{2j+i}: flattening (g, j, i) gives k = 4g + p
    return tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), (BLOCK_N, BLOCK_K))


@triton.jit
def _sparse24_gemv_kernel(x_ptr, v_ptr, meta_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym, M_BUCKET,
                          HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    """Small-M forward in the compressed domain: y[m, n] = sum_j values[n, j] * x[m, col(n, j)]."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    cdt = x_ptr.dtype.element_ty
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = offs_n.to(tl.int64)
    m_ids = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        v0, v1 = _load_values_pair(v_ptr, rows, n_mask, k0 // 2, K, BLOCK_N, BLOCK_K)
        v0 = v0.to(cdt).to(tl.float32)
        v1 = v1.to(cdt).to(tl.float32)
        i0, i1 = _load_meta_idx(meta_ptr, rows, n_mask, k0 // 4, K, BLOCK_N, BLOCK_K)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        for mi in tl.static_range(BLOCK_M):
            # rows past M re-read row M-1 (always valid); their results are never stored
            m = tl.minimum(pid_m * BLOCK_M + mi, M - 1)
            xr = tl.load(x_ptr + m.to(tl.int64) * stride_xm + offs_k, mask=k_mask, other=0.0)
            xr = xr.to(tl.float32)
            # [G, 2, 2][g, j, i] = x[4g + 2j + i]; split over i then j
            xe, xo = tl.split(tl.reshape(xr, (BLOCK_K // 4, 2, 2)))
            x0, x2 = tl.split(xe)
            x1, x3 = tl.split(xo)
            # idx0 is in {0, 1, 2} and idx1 in {1, 2, 3} for any valid 2:4 nibble
            xs0 = tl.where(i0 == 0, x0[None, :], tl.where(i0 == 1, x1[None, :], x2[None, :]))
            xs1 = tl.where(i1 == 3, x3[None, :], tl.where(i1 == 2, x2[None, :], x1[None, :]))
            part = tl.sum(v0 * xs0 + v1 * xs1, axis=1)
            acc = tl.where(m_ids[:, None] == mi, acc + part[None, :], acc)
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(cdt).to(tl.float32)
        acc += b[None, :]
    offs_m = pid_m * BLOCK_M + m_ids
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & n_mask[None, :])


@triton.jit
def _sparse24_gemm_kernel(x_ptr, v_ptr, meta_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym, M_BUCKET,
                          HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Tiled forward: expand the packed W tile to dense in registers, then tensor-core ``tl.dot``."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    cdt = x_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    rows = offs_n.to(tl.int64)
    x_rows = offs_m.to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + x_rows[:, None] + offs_k[None, :],
                    mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)
        w = _expand_24(v_ptr, meta_ptr, rows, n_mask, k0, K, BLOCK_N, BLOCK_K).to(cdt)
        if IEEE:
            acc = tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(w), acc)
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(cdt).to(tl.float32)
        acc += b[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _sparse24_bwd_input_kernel(dy_ptr, v_ptr, meta_ptr, dx_ptr, M, N, K, stride_dym, stride_dxm, M_BUCKET,
                               IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Input gradient ``dX[M, K] = dY[M, N] · W[N, K]`` from the packed weight (no transposed copy)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_k = tl.cdiv(K, BLOCK_K)
    group = GROUP_M * num_k
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_k = (pid % group) // size_m
    cdt = dy_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    dy_rows = offs_m.to(tl.int64) * stride_dym
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        g = tl.load(dy_ptr + dy_rows[:, None] + offs_n[None, :], mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        w = _expand_24(v_ptr, meta_ptr, offs_n.to(tl.int64), n_mask, pid_k * BLOCK_K, K, BLOCK_N, BLOCK_K).to(cdt)
        if IEEE:
            acc = tl.dot(g.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(g, w, acc)
    dx_ptrs = dx_ptr + offs_m.to(tl.int64)[:, None] * stride_dxm + offs_k[None, :]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=m_mask[:, None] & (offs_k < K)[None, :])


# ============================================================================ tuning configs
def _cfg(bm, bn, bk, warps, stages, group_m=None):
    kw = {"BLOCK_N": bn, "BLOCK_K": bk} if bm is None else {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
    if group_m is not None:
        kw["GROUP_M"] = group_m
    return triton.Config(kw, num_warps=warps, num_stages=stages)


# Every tl.dot block dimension is >= 16 (the GPU compiler rejects smaller ones).
# GEMV configs leave BLOCK_M to the launcher (next power of two of M)
_GEMV_CONFIGS = [
    _cfg(None, 16, 256, 4, 3),
    _cfg(None, 32, 128, 4, 3),
    _cfg(None, 64, 128, 8, 3),
]
_GEMV_INTERP = _cfg(None, 32, 64, 4, 1)

# small-M configs keep BLOCK_N/BLOCK_K narrow so that enough programs stream the weight in
# parallel (132 SMs on H100); the autotuner picks per (M bucket, N, K)
_GEMM_CONFIGS = [
    _cfg(16, 32, 128, 4, 4, 8),
    _cfg(16, 64, 128, 4, 4, 8),
    _cfg(64, 64, 64, 4, 4, 8),
    _cfg(64, 128, 64, 8, 3, 8),
    _cfg(128, 128, 64, 8, 3, 8),
]
_GEMM_INTERP = _cfg(32, 32, 64, 4, 1, 8)

_BWD_CONFIGS = [
    _cfg(16, 128, 32, 4, 4, 8),
    _cfg(16, 64, 128, 4, 4, 8),
    _cfg(64, 64, 64, 4, 4, 8),
    _cfg(128, 64, 128, 8, 3, 8),
]
_BWD_INTERP = _cfg(32, 32, 64, 4, 1, 8)

# fp32 activations use IEEE fp32 dots, which run on FMA units (no tensor cores): large tiles
# spill there, so they get their own small tiles.
_GEMM_CONFIGS_FP32 = [_cfg(32, 32, 32, 8, 2, 8)]
_BWD_CONFIGS_FP32 = [_cfg(32, 32, 32, 8, 2, 8)]

_KEY = ["M_BUCKET", "N", "K"]
_gemv = triton.autotune(tuning_configs(_GEMV_CONFIGS, _GEMV_INTERP), key=_KEY)(_sparse24_gemv_kernel)
_gemm = triton.autotune(tuning_configs(_GEMM_CONFIGS, _GEMM_INTERP), key=_KEY)(_sparse24_gemm_kernel)
_bwd = triton.autotune(tuning_configs(_BWD_CONFIGS, _BWD_INTERP), key=_KEY)(_sparse24_bwd_input_kernel)
_gemm_fp32 = triton.autotune(tuning_configs(_GEMM_CONFIGS_FP32, _GEMM_INTERP), key=_KEY)(_sparse24_gemm_kernel)
_bwd_fp32 = triton.autotune(tuning_configs(_BWD_CONFIGS_FP32, _BWD_INTERP), key=_KEY)(_sparse24_bwd_input_kernel)


def _ieee_dot(dtype: torch.dtype) -> bool:
    """``IEEE`` constexpr: operands upcast to fp32 and an IEEE fp32 dot. On for fp32 inputs (no
    TF32, as ``F.linear``). Also on for bf16 under the interpreter, whose bf16 ``tl.dot`` returns
    garbage in triton 3.9 (upcasting is exact: bf16 products fit in fp32, as in the bf16 MMA)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())


def _m_bucket(m: int) -> int:
    """Autotuning key for M: powers of two up to 4096 (shapes in a bucket share a config)."""
    return min(triton.next_power_of_2(max(m, 1)), 4096)


# ============================================================================ host launchers
def _check_packed(values, meta) -> tuple[int, int]:
    """Validate the packed weight; returns ``(N, K)``."""
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
    if not isinstance(meta, torch.Tensor):
        raise TypeError(f"meta must be a torch.Tensor, got {type(meta).__name__}")
    if values.dim() != 2:
        raise ValueError(f"values must be 2-D [out_features, in_features/2], got shape {tuple(values.shape)}")
    if values.dtype not in FLOAT_DTYPES:
        raise TypeError(f"values has dtype {values.dtype}; supported: float16, bfloat16, float32")
    n, k = values.shape[0], values.shape[1] * 2
    if k % 4:
        raise ValueError(f"values has {values.shape[1]} columns, so in_features={k} is not divisible by 4 "
                         "as 2:4 sparsity requires")
    if meta.dtype != torch.uint8:
        raise TypeError(f"meta must be uint8 (2-bit indices packed by sparse24_pack), got {meta.dtype}")
    if meta.shape != (n, (k + 7) // 8):
        raise ValueError(f"meta has shape {tuple(meta.shape)}, expected {(n, (k + 7) // 8)} for values of "
                         f"shape {tuple(values.shape)}")
    if meta.device != values.device:
        raise ValueError(f"meta is on {meta.device} but values is on {values.device}")
    if not values.is_contiguous():
        raise ValueError("values must be contiguous (pack with sparse24_pack or call .contiguous() once)")
    if not meta.is_contiguous():
        raise ValueError("meta must be contiguous (pack with sparse24_pack or call .contiguous() once)")
    return n, k


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """View ``t [..., width]`` as 2-D with unit stride along the last dim (copying only if needed)."""
    t2 = t.reshape(-1, width)
    if t2.stride(1) != 1 or (t2.shape[0] > 1 and t2.stride(0) < width):
        t2 = t2.contiguous()
    return t2


def _check_out(out, shape, dtype, device, name="out"):
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(f"{name} must be a {dtype} tensor of shape {tuple(shape)} on {device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    if not out.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return out


def sparse24_forward(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                     bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x · unpack(values, meta)ᵀ + bias`` with the Triton kernels; ``x [..., K]`` -> ``y [..., N]``.

    ``x`` may be non-contiguous (copied to rows with unit stride when needed). ``out`` (optional) is a
    contiguous ``[..., N]`` tensor of ``x``'s dtype that receives the result.
    """
    n, k = _check_packed(values, meta)
    check_activation(x, k, values.device, name="x")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (n,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({n},)")
        if bias.dtype not in FLOAT_DTYPES:
            raise TypeError(f"bias has dtype {bias.dtype}; supported: float16, bfloat16, float32")
        if bias.device != values.device:
            raise ValueError(f"bias is on {bias.device} but values is on {values.device}")
        bias = bias.contiguous()
    lead = tuple(x.shape[:-1])
    y = _check_out(out, lead + (n,), x.dtype, x.device)
    x2 = _rows(x, k)
    m = x2.shape[0]
    if m == 0 or n == 0:
        return y
    y2 = y.view(m, n)
    b = bias if bias is not None else values  # dummy pointer, never read when HAS_BIAS is False
    if m <= GEMV_MAX_M:
        grid = lambda meta_: (triton.cdiv(n, meta_["BLOCK_N"]), triton.cdiv(m, meta_["BLOCK_M"]))  # noqa: E731
        _gemv[grid](x2, values, meta, b, y2, m, n, k, x2.stride(0), y2.stride(0), _m_bucket(m),
                    HAS_BIAS=bias is not None, BLOCK_M=triton.next_power_of_2(m))
    else:
        grid = lambda meta_: (triton.cdiv(m, meta_["BLOCK_M"]) * triton.cdiv(n, meta_["BLOCK_N"]),)  # noqa: E731
        kernel = _gemm_fp32 if x.dtype == torch.float32 else _gemm
        kernel[grid](x2, values, meta, b, y2, m, n, k, x2.stride(0), y2.stride(0), _m_bucket(m),
                    HAS_BIAS=bias is not None, IEEE=_ieee_dot(x.dtype))
    return y


def sparse24_backward_input(dy: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, *,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """``dX = dY · unpack(values, meta)`` from the packed weight; ``dy [..., N]`` -> ``dx [..., K]``
    in ``dy``'s dtype."""
    n, k = _check_packed(values, meta)
    check_activation(dy, n, values.device, name="dy")
    lead = tuple(dy.shape[:-1])
    dx = _check_out(out, lead + (k,), dy.dtype, dy.device)
    dy2 = _rows(dy, n)
    m = dy2.shape[0]
    if m == 0:
        return dx
    if n == 0:
        return dx.zero_()
    dx2 = dx.view(m, k)
    grid = lambda meta_: (triton.cdiv(m, meta_["BLOCK_M"]) * triton.cdiv(k, meta_["BLOCK_K"]),)  # noqa: E731
    kernel = _bwd_fp32 if dy.dtype == torch.float32 else _bwd
    kernel[grid](dy2, values, meta, dx2, m, n, k, dy2.stride(0), dx2.stride(0), _m_bucket(m),
               IEEE=_ieee_dot(dy.dtype))
    return dx


# ======================================================================== torch.library ops
_FROZEN_MSG = ("packed 2:4 weights are frozen: the Triton kernels give gradients w.r.t. the input and "
               "the bias only. Fine-tune the masked dense weight (e.g. nn.Linear with a 2:4 mask) and "
               "pack it afterwards, or call values.requires_grad_(False).")


@torch.library.custom_op("robcomp::sparse24_linear", mutates_args=())
def _sparse24_linear_op(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                        bias: Optional[torch.Tensor]) -> torch.Tensor:
    return sparse24_forward(x, values, meta, bias)


@_sparse24_linear_op.register_fake
def _sparse24_linear_fake(x, values, meta, bias):
    return x.new_empty((*x.shape[:-1], values.shape[0]))


@torch.library.custom_op("robcomp::sparse24_linear_backward_input", mutates_args=())
def _sparse24_bwd_op(dy: torch.Tensor, values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    return sparse24_backward_input(dy, values, meta)


@_sparse24_bwd_op.register_fake
def _sparse24_bwd_fake(dy, values, meta):
    return dy.new_empty((*dy.shape[:-1], values.shape[1] * 2))


def _setup_context(ctx, inputs, output):
    x, values, meta, bias = inputs
    ctx.save_for_backward(values, meta)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    values, meta = ctx.saved_tensors
    if ctx.needs_input_grad[1]:
        raise RuntimeError(_FROZEN_MSG)
    dx = _sparse24_bwd_op(grad, values, meta) if ctx.needs_input_grad[0] else None
    db = None
    if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
        db = grad.reshape(-1, grad.shape[-1]).sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    return dx, None, None, db


_sparse24_linear_op.register_autograd(_backward, setup_context=_setup_context)


def sparse24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """Functional 2:4 linear: ``x [..., K]`` (fp16/bf16/fp32) -> ``[..., N]`` in ``x``'s dtype.

    Differentiable w.r.t. ``x`` and ``bias`` (Triton input-gradient kernel); traceable by
    ``torch.compile(fullgraph=True)`` through the ``robcomp::sparse24_linear`` custom op.
    Raises ``ValueError`` when ``values`` requires grad (packed weights are frozen).
    """
    if isinstance(values, torch.Tensor) and values.requires_grad and torch.is_grad_enabled():
        raise ValueError(_FROZEN_MSG)
    _check_packed(values, meta)
    return _sparse24_linear_op(x, values, meta, bias)


# ====================================================================== ahead-of-time specs
_TL_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


_ALIGNED = ("x_ptr", "v_ptr", "meta_ptr", "b_ptr", "y_ptr", "dy_ptr", "dx_ptr", "N", "K",
            "stride_xm", "stride_ym", "stride_dym", "stride_dxm")


def aot_specs() -> list:
    """Every autotune config of every kernel, for fp16/bf16/fp32 activations (values in the same
    dtype), as ``(name, jit_fn, signature, constexprs, options)`` for :mod:`robcomp.kernels._aot`.
    Compiled with the 16-divisibility Triton infers at run time for aligned shapes (K, N % 16 == 0)."""
    specs = []
    for dt, t in _TL_NAMES.items():
        ieee = dt == torch.float32
        fwd_sig = {"x_ptr": f"*{t}", "v_ptr": f"*{t}", "meta_ptr": "*u8", "b_ptr": f"*{t}", "y_ptr": f"*{t}",
                   "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_ym": "i32", "M_BUCKET": "i32"}
        # BLOCK_M of the GEMV is chosen at launch: every value for fp16, the extremes otherwise
        gemv_ms = GEMV_BLOCK_MS if dt == torch.float16 else (GEMV_BLOCK_MS[0], GEMV_BLOCK_MS[-1])
        for i, c in enumerate(_GEMV_CONFIGS):
            for bm in gemv_ms:
                sig = dict(fwd_sig, HAS_BIAS="constexpr", BLOCK_M="constexpr", BLOCK_N="constexpr",
                           BLOCK_K="constexpr")
                specs.append((f"sparse24_gemv_{t}_c{i}_m{bm}", _sparse24_gemv_kernel, sig,
                              dict(HAS_BIAS=True, BLOCK_M=bm, **c.kwargs),
                              {"num_warps": c.num_warps, "num_stages": c.num_stages, "expect_mma": False,
                               "divisible_by_16": [a for a in _ALIGNED if a in sig]}))
        for i, c in enumerate(_GEMM_CONFIGS_FP32 if ieee else _GEMM_CONFIGS):
            sig = dict(fwd_sig, HAS_BIAS="constexpr", IEEE="constexpr", BLOCK_M="constexpr", BLOCK_N="constexpr",
                       BLOCK_K="constexpr", GROUP_M="constexpr")
            specs.append((f"sparse24_gemm_{t}_c{i}", _sparse24_gemm_kernel, sig,
                          dict(HAS_BIAS=True, IEEE=ieee, **c.kwargs),
                          {"num_warps": c.num_warps, "num_stages": c.num_stages, "expect_mma": not ieee,
                           "divisible_by_16": [a for a in _ALIGNED if a in sig]}))
        bwd_sig = {"dy_ptr": f"*{t}", "v_ptr": f"*{t}", "meta_ptr": "*u8", "dx_ptr": f"*{t}", "M": "i32",
                   "N": "i32", "K": "i32", "stride_dym": "i32", "stride_dxm": "i32", "M_BUCKET": "i32",
                   "IEEE": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
                   "GROUP_M": "constexpr"}
        for i, c in enumerate(_BWD_CONFIGS_FP32 if ieee else _BWD_CONFIGS):
            specs.append((f"sparse24_bwd_input_{t}_c{i}", _sparse24_bwd_input_kernel, dict(bwd_sig),
                          dict(IEEE=ieee, **c.kwargs),
                          {"num_warps": c.num_warps, "num_stages": c.num_stages, "expect_mma": not ieee,
                           "divisible_by_16": [a for a in _ALIGNED if a in bwd_sig]}))
    return specs


# ====================================================================== static-model cases
# TEMPORARY (branch k-static): the interface bench/static_model.py consumes, written for the
# current kernels; the kernel skeleton (branch k-skeleton) replaces this whole section.
def perf_cases(m: int, n: int, k: int, dtype=torch.float16, sm_count: int = 132) -> list[dict]:
    """One dict per op the launchers run for ``x [m, k]``, weight ``[n, k]`` (see bench/static_model.py)."""
    t, e = _TL_NAMES[dtype], torch.tensor([], dtype=dtype).element_size()
    weight = e * n * (k // 2) + n * triton.cdiv(k, 8)
    if m <= GEMV_MAX_M:
        bm = triton.next_power_of_2(m)
        fwd = [{"spec": f"sparse24_gemv_{t}_c{i}_m{bm}", "num_warps": c.num_warps,
                "ctas": triton.cdiv(n, c.kwargs["BLOCK_N"]) * triton.cdiv(m, bm),
                "weights_per_iter": c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"]} for i, c in enumerate(_GEMV_CONFIGS)]
    else:
        fwd = [{"spec": f"sparse24_gemm_{t}_c{i}", "num_warps": c.num_warps,
                "ctas": triton.cdiv(m, c.kwargs["BLOCK_M"]) * triton.cdiv(n, c.kwargs["BLOCK_N"]),
                "weights_per_iter": c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"]} for i, c in enumerate(_GEMM_CONFIGS)]
    bwd = [{"spec": f"sparse24_bwd_input_{t}_c{i}", "num_warps": c.num_warps,
            "ctas": triton.cdiv(m, c.kwargs["BLOCK_M"]) * triton.cdiv(k, c.kwargs["BLOCK_K"]),
            "weights_per_iter": c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"]} for i, c in enumerate(_BWD_CONFIGS)]
    act = e * (m * k + m * n)
    return [{"op": "sparse24.forward", "launches": 1, "bytes": weight + act, "flops": 2 * m * n * k, "candidates": fwd},
            {"op": "sparse24.backward_input", "launches": 1, "bytes": weight + act, "flops": 2 * m * n * k,
             "candidates": bwd}]
