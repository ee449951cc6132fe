"""2:4 sparse + int4 matmul kernels (W4A16 on the 2:4 kept values).

Format (exact unpack in ``reference.sparse24_int4_unpack``): ``reference.sparse24_pack`` selects
the 2 kept weights of every 4 along K (values ``[N, K/2]`` + 2-bit metadata); the kept values are
then quantised with ``reference.int4_pack`` using groups of ``group_size/2`` kept values, i.e. one
scale/zero per ``group_size`` dense columns:

    qvalues uint8 [N, K/4]          byte b = the two kept values of 2:4 group b
                                    (low nibble = first kept position, high nibble = second)
    scales, zeros [N, K/group_size] activation dtype, ``v = (q - zero) * scale``
    meta uint8 [N, K/8]             2:4 metadata (two groups per byte, see reference.py)

Bytes per dense weight: 1/4 (codes) + 1/16 (metadata) + 4/group_size (scale, zero): 5.3x fewer than
fp16 at group 128. There is no sparse tensor-core instruction in Triton, so the kernels expand a
tile to dense in registers (``tl.join``/``tl.reshape`` for the nibbles, a 4-way select for the
positions) and run a dense ``tl.dot`` (large M) or an fp32 multiply-reduce (M <= ``SMALL_M``, with
optional split-K). The speed comes from reading 5.3x fewer weight bytes (memory-bound M).

The input gradient ``dX = dY @ dequant(W)`` is exact (the layer's own weight). Packed weights are
frozen. fp32 activations run an exact fp32 dot (see ``lowbit``).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from robcomp.kernels import lowbit as _lb
from robcomp.kernels._common import check_activation, tuning_configs
from robcomp.kernels.lowbit import (_BWD_INTERP, _BWD_TUNE, _GEMM_CONFIGS_F32, _GEMM_INTERP, _GEMV_CONFIGS,
                                    _GEMV_INTERP, _cfg, _epilogue_store, _mma, _prune_bwd, _prune_gemm,
                                    _prune_gemv, _tile_ids)

__all__ = ["sparse24_int4_forward", "sparse24_int4_backward_input", "sparse24_int4_linear", "aot_specs"]


# Tiled forward configs. The 2:4 expansion holds a [BLOCK_N, BLOCK_K/4, 4] fp32 select per tile,
# so lowbit's tiles with BLOCK_K = 128 or a 128 x 128 output spill on sm_90: BLOCK_K <= 64 here,
# 8 warps for the medium / large M tiles. Same M regimes and prune as lowbit; the
# input-gradient kernel shares lowbit's configs (_BWD_TUNE), which do not spill here.
_S24_GEMM_CONFIGS = [
    _cfg(16, 64, 64, 4, 4),    # small (/ medium) M
    _cfg(32, 64, 32, 4, 4),    # small / medium M, group 32
    _cfg(64, 64, 64, 8, 3),    # medium / large M
    _cfg(128, 64, 32, 8, 3),   # large M, group 32 (4 warps use all 255 registers)
]
_S24_GEMM_TUNE = _S24_GEMM_CONFIGS + _GEMM_CONFIGS_F32


@triton.jit
def _s24i4_tile(q_ptr, m_ptr, s_ptr, z_ptr, offs_n, k0, N, K, stride_qn, stride_mn, stride_sn,
                GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dense fp32 ``[BLOCK_N, BLOCK_K]`` tile of columns ``k0 .. k0+BLOCK_K`` (BLOCK_K | GROUP_SIZE)."""
    mask_n = offs_n < N
    offs_b = k0 // 4 + tl.arange(0, BLOCK_K // 4)
    q = tl.load(q_ptr + offs_n[:, None] * stride_qn + offs_b[None, :],
                mask=mask_n[:, None] & (offs_b[None, :] < K // 4), other=0)
    offs_mb = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    meta = tl.load(m_ptr + offs_n[:, None] * stride_mn + offs_mb[None, :],
                   mask=mask_n[:, None] & (offs_mb[None, :] < K // 8), other=0)
    g = k0 // GROUP_SIZE
    mask_s = mask_n & ((offs_n * 0 + k0) < K)
    s = tl.load(s_ptr + offs_n * stride_sn + g, mask=mask_s, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs_n * stride_sn + g, mask=mask_s, other=0.0).to(tl.float32)
    v0 = ((q & 0xF).to(tl.float32) - z[:, None]) * s[:, None]
    v1 = (((q >> 4) & 0xF).to(tl.float32) - z[:, None]) * s[:, None]
    nib = tl.reshape(tl.join(meta & 0xF, (meta >> 4) & 0xF), (BLOCK_N, BLOCK_K // 4)).to(tl.int32)
    idx0 = nib & 3
    idx1 = (nib >> 2) & 3
    j = tl.arange(0, 4)[None, None, :]
    dense = tl.where(j == idx0[:, :, None], v0[:, :, None],
                     tl.where(j == idx1[:, :, None], v1[:, :, None], 0.0))
    return tl.reshape(dense, (BLOCK_N, BLOCK_K))


@triton.autotune(configs=tuning_configs(_S24_GEMM_TUNE, _GEMM_INTERP), key=["M_BUCKET", "N", "K", "GROUP_SIZE"],
                 prune_configs_by={"early_config_prune": _prune_gemm})
@triton.jit
def _s24i4_gemm_kernel(x_ptr, q_ptr, m_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, M_BUCKET,
                       stride_xm, stride_qn, stride_mn, stride_sn, stride_ym,
                       GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, F32: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                    mask=(offs_m[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = _s24i4_tile(q_ptr, m_ptr, s_ptr, z_ptr, offs_n, k0, N, K, stride_qn, stride_mn, stride_sn,
                        GROUP_SIZE, BLOCK_N, BLOCK_K)
        acc = _mma(x, tl.trans(w.to(x.dtype)), acc, F32)
    _epilogue_store(acc, y_ptr, b_ptr, offs_m, offs_n, M, N, stride_ym, HAS_BIAS)


@triton.autotune(configs=tuning_configs(_GEMV_CONFIGS, _GEMV_INTERP), key=["N", "K", "BLOCK_M", "SPLIT_K", "GROUP_SIZE"],
                 prune_configs_by={"early_config_prune": _prune_gemv})
@triton.jit
def _s24i4_gemv_kernel(x_ptr, q_ptr, m_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, K_PER_SPLIT,
                       stride_xm, stride_qn, stride_mn, stride_sn, stride_ym,
                       GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    for k0 in range(k_start, k_start + K_PER_SPLIT, BLOCK_K):
        kk = k0 + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                    mask=(offs_m[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = _s24i4_tile(q_ptr, m_ptr, s_ptr, z_ptr, offs_n, k0, N, K, stride_qn, stride_mn, stride_sn,
                        GROUP_SIZE, BLOCK_N, BLOCK_K)
        w = w.to(x.dtype).to(tl.float32)
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    if SPLIT_K == 1:
        _epilogue_store(acc, y_ptr, b_ptr, offs_m, offs_n, M, N, stride_ym, HAS_BIAS)
    else:
        _epilogue_store(acc, y_ptr + pid_k * M * stride_ym, b_ptr, offs_m, offs_n, M, N, stride_ym, False)


@triton.autotune(configs=tuning_configs(_BWD_TUNE, _BWD_INTERP), key=["M_BUCKET", "N", "K", "GROUP_SIZE"],
                 prune_configs_by={"early_config_prune": _prune_bwd})
@triton.jit
def _s24i4_bwd_kernel(dy_ptr, q_ptr, m_ptr, s_ptr, z_ptr, dx_ptr, M, N, K, M_BUCKET,
                      stride_dym, stride_qn, stride_mn, stride_sn, stride_dxm,
                      GROUP_SIZE: tl.constexpr, F32: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr):
    pid_m, pid_k = _tile_ids(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        nn = n0 + offs_n
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + nn[None, :],
                     mask=(offs_m[:, None] < M) & (nn[None, :] < N), other=0.0)
        w = _s24i4_tile(q_ptr, m_ptr, s_ptr, z_ptr, nn, k0, N, K, stride_qn, stride_mn, stride_sn,
                        GROUP_SIZE, BLOCK_N, BLOCK_K)
        acc = _mma(dy, w.to(dy.dtype), acc, F32)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :], acc.to(dx_ptr.dtype.element_ty), mask=mask)


# ============================================================================ launchers
def _check(qvalues, scales, zeros, meta, group_size):
    _lb._check_tensor(qvalues, "qvalues", (torch.uint8,))
    if qvalues.dim() != 2:
        raise ValueError(f"qvalues must be 2-D [N, K/4], got shape {tuple(qvalues.shape)}")
    n, k = qvalues.shape[0], qvalues.shape[1] * 4
    if not isinstance(group_size, int) or group_size < 32 or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two >= 32 (32, 64 or 128), got {group_size!r}")
    if k % group_size:
        raise ValueError(f"group_size={group_size} does not divide in_features={k}")
    _lb._check_tensor(scales, "scales", _lb._FLOATS, (n, k // group_size), qvalues.device)
    _lb._check_tensor(zeros, "zeros", _lb._FLOATS, (n, k // group_size), qvalues.device)
    _lb._check_tensor(meta, "meta", (torch.uint8,), (n, k // 8), qvalues.device)
    return n, k


def sparse24_int4_forward(x: torch.Tensor, qvalues: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                          meta: torch.Tensor, group_size: int, bias: Optional[torch.Tensor] = None, *,
                          split_k: Optional[int] = None) -> torch.Tensor:
    """2:4+int4 forward launcher: ``y = x @ dequant(W).T + bias`` (no autograd)."""
    n, k = _check(qvalues, scales, zeros, meta, group_size)
    check_activation(x, k, qvalues.device)
    _lb._check_bias(bias, n, qvalues.device)
    _lb._check_nonempty(x)
    x2 = _lb._flat(x, k)
    m = x2.shape[0]
    if m <= _lb.SMALL_M:
        y = _lb._gemv(_s24i4_gemv_kernel, x2, n, k, bias, (qvalues, meta, scales, zeros),
                      (qvalues.stride(0), meta.stride(0), scales.stride(0)), {"GROUP_SIZE": group_size},
                      split_k, max(group_size, 256), x.dtype)
    else:
        y = torch.empty(m, n, device=x.device, dtype=x.dtype)
        _s24i4_gemm_kernel[_lb._gemm_grid(m, n)](
            x2, qvalues, meta, scales, zeros, bias if bias is not None else x2, y, m, n, k, _lb._m_bucket(m),
            x2.stride(0), qvalues.stride(0), meta.stride(0), scales.stride(0), y.stride(0),
            GROUP_SIZE=group_size, HAS_BIAS=bias is not None, F32=_lb._f32_dot(x.dtype))
    return y.reshape(*x.shape[:-1], n)


def sparse24_int4_backward_input(grad_out: torch.Tensor, qvalues: torch.Tensor, scales: torch.Tensor,
                                 zeros: torch.Tensor, meta: torch.Tensor, group_size: int) -> torch.Tensor:
    """``dX = dY @ dequant(W)`` (exact input gradient of the 2:4+int4 layer)."""
    n, k = _check(qvalues, scales, zeros, meta, group_size)
    check_activation(grad_out, n, qvalues.device, name="grad_out")
    _lb._check_nonempty(grad_out)
    g2 = _lb._flat(grad_out, n)
    m = g2.shape[0]
    dx = torch.empty(m, k, device=g2.device, dtype=g2.dtype)
    _s24i4_bwd_kernel[_lb._bwd_grid(m, k)](
        g2, qvalues, meta, scales, zeros, dx, m, n, k, _lb._m_bucket(m),
        g2.stride(0), qvalues.stride(0), meta.stride(0), scales.stride(0), dx.stride(0),
        GROUP_SIZE=group_size, F32=_lb._f32_dot(g2.dtype))
    return dx.reshape(*grad_out.shape[:-1], k)


# ============================================================================ custom op
@torch.library.custom_op("robcomp::sparse24_int4_linear", mutates_args=())
def _s24i4_op(x: torch.Tensor, qvalues: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              meta: torch.Tensor, group_size: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return sparse24_int4_forward(x, qvalues, scales, zeros, meta, group_size, bias)


@_s24i4_op.register_fake
def _(x, qvalues, scales, zeros, meta, group_size, bias):
    return x.new_empty((*x.shape[:-1], qvalues.shape[0]))


@torch.library.custom_op("robcomp::sparse24_int4_backward_input", mutates_args=())
def _s24i4_bwd_op(grad_out: torch.Tensor, qvalues: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  meta: torch.Tensor, group_size: int) -> torch.Tensor:
    return sparse24_int4_backward_input(grad_out, qvalues, scales, zeros, meta, group_size)


@_s24i4_bwd_op.register_fake
def _(grad_out, qvalues, scales, zeros, meta, group_size):
    return grad_out.new_empty((*grad_out.shape[:-1], qvalues.shape[1] * 4))


def _setup(ctx, inputs, output):
    x, qvalues, scales, zeros, meta, group_size, bias = inputs
    _lb._frozen("robcomp::sparse24_int4_linear", scales, zeros)
    ctx.save_for_backward(qvalues, scales, zeros, meta)
    ctx.group_size = group_size
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, gy):
    qvalues, scales, zeros, meta = ctx.saved_tensors
    gx = None
    if ctx.needs_input_grad[0]:
        gx = _s24i4_bwd_op(gy.contiguous(), qvalues, scales, zeros, meta, ctx.group_size)
    gb = _lb._bias_grad(gy, ctx.bias_dtype) if ctx.needs_input_grad[6] else None
    return gx, None, None, None, None, None, gb


_s24i4_op.register_autograd(_backward, setup_context=_setup)


def sparse24_int4_linear(x: torch.Tensor, qvalues: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                         meta: torch.Tensor, group_size: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """2:4+int4 linear (Triton), differentiable w.r.t. ``x`` (exact) and ``bias``."""
    n, k = _check(qvalues, scales, zeros, meta, group_size)
    check_activation(x, k, qvalues.device)
    _lb._check_bias(bias, n, qvalues.device)
    _lb._check_nonempty(x)
    return _s24i4_op(x, qvalues, scales, zeros, meta, group_size, bias)


# ============================================================================ AOT specs
def aot_specs(dtypes=(torch.float16, torch.bfloat16, torch.float32)):
    """``(name, jit fn, signature, constexprs, options)`` for every kernel x autotune config x
    activation dtype (int4 group 128; bf16 without the matrix-vector kernel), for
    ``robcomp.kernels._aot``; the configs are the autotuners' own (see ``lowbit.aot_specs``)."""
    out = []
    for dt in dtypes:
        t = _lb._TL[dt]
        f32 = dt == torch.float32
        types = {"x_ptr": f"*{t}", "y_ptr": f"*{t}", "b_ptr": f"*{t}", "dy_ptr": f"*{t}", "dx_ptr": f"*{t}",
                 "q_ptr": "*u8", "m_ptr": "*u8", "s_ptr": f"*{t}", "z_ptr": f"*{t}"}
        for g in _lb._AOT_GROUPS:
            for c in _lb._tiled_configs(_S24_GEMM_TUNE, f32, g):
                out.append(_lb._spec(f"s24i4_gemm_{t}_g{g}", _s24i4_gemm_kernel, types,
                                     {"GROUP_SIZE": g, "HAS_BIAS": True, "F32": f32}, c, not f32))
            for c, bm in _lb._gemv_configs(g) if _lb._aot_gemv(dt) else ():
                out.append(_lb._spec(f"s24i4_gemv_{t}_g{g}_m{bm}", _s24i4_gemv_kernel, types,
                                     {"GROUP_SIZE": g, "HAS_BIAS": True, "SPLIT_K": 2, "BLOCK_M": bm}, c, False))
            for c in _lb._tiled_configs(_BWD_TUNE, f32, g):
                out.append(_lb._spec(f"s24i4_bwd_{t}_g{g}", _s24i4_bwd_kernel, types,
                                     {"GROUP_SIZE": g, "F32": f32}, c, not f32))
    return out


# ============================================================================ static-model cases
# TEMPORARY (branch k-static): the interface bench/static_model.py consumes, written for the
# current kernels; the kernel skeleton (branch k-skeleton) replaces this whole section.
def perf_cases(m: int, n: int, k: int, dtype=torch.float16, sm_count: int = 132) -> list[dict]:
    """One dict per op the launchers run for ``x [m, k]``, weight ``[n, k]`` (see bench/static_model.py)."""
    t, e, g = _lb._TL[dtype], torch.tensor([], dtype=dtype).element_size(), 128
    if m <= _lb.SMALL_M:
        fwd, launches = _lb._perf_gemv(f"s24i4_gemv_{t}_g{g}", m, n, k, g, sm_count, 256)
    else:
        fwd, launches = _lb._perf_tiled(f"s24i4_gemm_{t}_g{g}", _S24_GEMM_TUNE, m, None, n, g), 1
    weight = n * k // 4 + n * k // 8 + 2 * e * n * (k // g)
    act = e * (m * k + m * n)
    return [{"op": f"sparse24_int4_g{g}.forward", "launches": launches, "bytes": weight + act,
             "flops": 2 * m * n * k, "candidates": fwd},
            {"op": f"sparse24_int4_g{g}.backward_input", "launches": 1, "bytes": weight + act, "flops": 2 * m * n * k,
             "candidates": _lb._perf_tiled(f"s24i4_bwd_{t}_g{g}", _BWD_TUNE, m, n, k, g)}]


_aot_specs_of_configs = aot_specs


def aot_specs(dtypes=(torch.float16, torch.bfloat16, torch.float32)):  # noqa: F811
    """The configs' specs plus the fp16 matrix-vector kernel at BLOCK_M = 1 (what M = 1 runs)."""
    out = _aot_specs_of_configs(dtypes)
    if torch.float16 in dtypes:
        types = {"x_ptr": "*fp16", "y_ptr": "*fp16", "b_ptr": "*fp16", "dy_ptr": "*fp16", "dx_ptr": "*fp16",
                 "q_ptr": "*u8", "m_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*fp16"}
        for c in _prune_gemv(_GEMV_CONFIGS, {"BLOCK_M": 1, "GROUP_SIZE": 128}):
            out.append(_lb._spec("s24i4_gemv_fp16_g128_m1", _s24i4_gemv_kernel, types,
                                 {"GROUP_SIZE": 128, "HAS_BIAS": True, "SPLIT_K": 2, "BLOCK_M": 1}, c, False))
    return out
