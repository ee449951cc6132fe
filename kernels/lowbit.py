"""Low-bit matmul kernels: int8 / int4 weight-only, int8 and fp8 dynamic (W8A8 / FP8).

Formats (weights ``[N, K]`` = ``[out_features, in_features]``; exact unpack in ``reference.py``):

int8 weight-only (W8A16)
    ``qweight int8 [N, K]`` (K contiguous) + ``scale [N]`` (symmetric per output channel).
    The forward kernels multiply the activation by the integer codes (exact in fp16/bf16,
    |q| <= 127) and apply ``scale[n]`` once to the fp32 accumulator, with the bias, in the epilogue.
int4 weight-only (W4A16)
    ``qweight uint8 [N, K/2]``: two codes per byte, low nibble = even k, high nibble = odd k, so a
    row segment of ``BLOCK_K`` columns is ``BLOCK_K/2`` contiguous bytes (one or more 16-byte vector
    loads per row, no gather); the kernel splits the nibbles and re-interleaves them with
    ``tl.join`` + ``tl.reshape``. ``scales``/``zeros [N, K/group_size]`` in the activation dtype,
    ``w = (q - zero) * scale``. The K tile always lies inside one group (``BLOCK_K`` divides
    ``group_size``), so one scale and zero per row and tile.
int8 dynamic (W8A8)
    int8 weight with a float32 per-channel scale; activations quantised per token by a pre-pass
    kernel (``x_q = round_half_away(x / s_x)``, ``s_x = max|x_row| / 127``), then an
    int8 x int8 -> int32 ``tl.dot`` with both scales and the bias in the epilogue.
fp8 dynamic (e4m3)
    As W8A8 with ``float8_e4m3fn`` codes and 448 in place of 127, fp32 accumulation. Needs a CUDA
    GPU with compute capability >= 8.9; on anything else (CPU included) the Triton launchers raise
    ``ValueError``: use ``backend="torch"`` (the reference emulates e4m3 with torch casts).

Kernel variants: for ``M <= SMALL_M`` the weight-only formats run a matrix-vector kernel (no
``tl.dot``; a broadcast multiply-reduce in fp32 over ``[BLOCK_M, BLOCK_N, BLOCK_K]``) with an
optional split over K (partials in an fp32 workspace, reduced on the host) so that batch-1 GEMV
fills the GPU; larger M runs the tiled ``tl.dot`` kernel whose autotune configurations depend on
the M bucket (``BLOCK_M`` 16-32 for small M, 64-128 for large M). All accumulate in fp32 (int32 for
W8A8).

Activations: float16 and bfloat16 run the tensor cores. float32 activations are accepted (the CPU
models are fp32): the dot then runs with ``input_precision="ieee"`` (exact fp32, no TF32, slower);
cast the model to half precision for speed. Under the CPU interpreter (``TRITON_INTERPRET=1``)
bf16 dots are computed in fp32 (``UPCAST``) because the interpreter mis-multiplies bf16 operands.

Gradients: every format has an input-gradient kernel ``dX = dY @ dequant(W)``. For the weight-only
formats this is the exact gradient of the deployed layer. For the dynamic formats it is the
straight-through estimator (STE): the activation quantiser counts as the identity in the backward
pass (the weight term is exact). Packed weights are frozen: asking for a gradient of ``qweight``,
``scale``, ``scales`` or ``zeros`` raises. Each format is a ``torch.library`` custom op
(``robcomp::...``) with a fake implementation and a registered autograd formula, so
``torch.compile(fullgraph=True)`` traces through it.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from robcomp.kernels._common import check_activation, interpreting, tuning_configs

__all__ = [
    "SMALL_M",
    "int8_weight_forward", "int8_weight_backward_input", "int8_weight_linear",
    "int4_forward", "int4_backward_input", "int4_linear",
    "quantize_rows", "int8_dynamic_forward", "int8_dynamic_linear",
    "fp8_dynamic_forward", "fp8_dynamic_linear", "fp8_supported",
    "per_channel_backward_input",
    "aot_specs",
]

#: largest M that runs the matrix-vector (no tensor core) kernels of the weight-only formats
SMALL_M = 8
#: the matrix-vector kernel keeps BLOCK_M * BLOCK_N * BLOCK_K products live; cap that
_GEMV_MAX_ELEMS = 16384
_FP8_MAX = 448.0
_INT8_MAX = 127.0

# tests set this to run the fp8 kernels in the CPU interpreter (the public path refuses CPU)
_FP8_INTERPRETER_OK = False


# ============================================================================ jit helpers
@triton.jit
def _tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped (L2-friendly) ordering of output tiles."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    group_id = pid // width
    first_m = group_id * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _mma(a, b, acc, F32: tl.constexpr):
    """``acc + a @ b``: tensor cores in ``a``'s dtype, or exact fp32 when ``F32``."""
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b.to(a.dtype), acc)


@triton.jit
def _int4_tile(q_ptr, s_ptr, z_ptr, offs_n, k0, N, K, stride_qn, stride_sn,
               GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dequantised fp32 ``[BLOCK_N, BLOCK_K]`` int4 weight tile for columns ``k0 .. k0+BLOCK_K``
    (``BLOCK_K`` divides ``GROUP_SIZE``, ``k0`` a multiple of ``BLOCK_K``)."""
    offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    mask_n = offs_n < N
    q = tl.load(q_ptr + offs_n[:, None] * stride_qn + offs_b[None, :],
                mask=mask_n[:, None] & (offs_b[None, :] < K // 2), other=0)
    lo = (q & 0xF).to(tl.float32)
    hi = ((q >> 4) & 0xF).to(tl.float32)
    w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))
    g = k0 // GROUP_SIZE
    mask_s = mask_n & ((offs_n * 0 + k0) < K)
    s = tl.load(s_ptr + offs_n * stride_sn + g, mask=mask_s, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs_n * stride_sn + g, mask=mask_s, other=0.0).to(tl.float32)
    return (w - z[:, None]) * s[:, None]


@triton.jit
def _epilogue_store(acc, y_ptr, b_ptr, offs_m, offs_n, M, N, stride_ym, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        acc = acc + b[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


# ============================================================================ configs
def _cfg(bm, bn, bk, warps, stages, gm=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm},
                         num_warps=warps, num_stages=stages)


# Tiled tensor-core configs (fp16/bf16 activations; the W8A8/FP8 kernel for every activation
# dtype). ``_prune_gemm`` keeps those of the M regime: small M (M_BUCKET <= 64) BLOCK_M <= 32,
# medium (<= 256) BLOCK_M <= 64, large BLOCK_M >= 64. Every regime has a BLOCK_K = 32 tile, the
# only one that fits int4 group_size 32 (BLOCK_K must divide the group). Each list is exactly
# what ``aot_specs`` compiles for sm_80/sm_90 (no spills on sm_90 with aligned shapes).
_GEMM_CONFIGS = [
    _cfg(16, 64, 128, 4, 4),   # small (/ medium) M: few rows, wide K to stream the weight
    _cfg(32, 64, 32, 4, 4),    # small / medium M, group 32
    _cfg(64, 64, 64, 4, 4),    # medium / large M
    _cfg(128, 128, 64, 8, 3),  # large M
    _cfg(128, 64, 32, 4, 4),   # large M, group 32
]
# fp32 activations run IEEE fp32 dots on the FMA units (no tensor cores): the tensor-core tiles
# spill there, so they get one small tile of their own (selected by the F32 flag in the prune).
_GEMM_CONFIGS_F32 = [_cfg(32, 32, 32, 8, 2)]
_GEMM_INTERP = _cfg(32, 32, 32, 4, 1)

# matrix-vector (M <= SMALL_M) configs; ``_prune_gemv`` keeps BLOCK_M * BLOCK_N * BLOCK_K <=
# _GEMV_MAX_ELEMS, so BLOCK_M = 8 and group 32 run (64, 32) only (8 warps: with 4 the int4
# variants spill on sm_90).
_GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in ((64, 64, 4, 3), (64, 32, 8, 3))
]
_GEMV_INTERP = triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)

# input-gradient configs (output tile [BLOCK_M, BLOCK_K], loop over N), same M regimes; shared
# with the 2:4+int4 kernel (none spills there either)
_BWD_CONFIGS = [
    _cfg(32, 64, 32, 4, 4),    # small / medium M, group 32
    _cfg(64, 64, 64, 8, 3),    # medium / large M (8 warps: 4 use all 255 registers in 2:4+int4)
    _cfg(128, 64, 32, 4, 4),   # large M, group 32
]
_BWD_CONFIGS_F32 = [_cfg(32, 32, 32, 8, 2)]
_BWD_INTERP = _cfg(32, 32, 32, 4, 1)

# what the autotuners hold (the prune picks the F32 or tensor-core part)
_GEMM_TUNE = _GEMM_CONFIGS + _GEMM_CONFIGS_F32
_BWD_TUNE = _BWD_CONFIGS + _BWD_CONFIGS_F32
_F32_IDS = frozenset(id(c) for c in _GEMM_CONFIGS_F32 + _BWD_CONFIGS_F32)


def _m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), 4096)


def _args(named_args, kwargs):
    return {**named_args, **kwargs}


def _fits_group(c, group) -> bool:
    return group is None or group % c.kwargs["BLOCK_K"] == 0


def _prune_tiled(configs, named_args, **kwargs):
    """Keep the F32 (or tensor-core) configs of the M regime whose BLOCK_K divides the int4 group."""
    a = _args(named_args, kwargs)
    m = a.get("M_BUCKET", a.get("M", 128))
    group = a.get("GROUP_SIZE", None)
    f32 = bool(a.get("F32", False))
    pool = [c for c in configs if (id(c) in _F32_IDS) == f32] or list(configs)
    fits = [c for c in pool if _fits_group(c, group)] or pool
    kept = []
    for c in fits:
        bm = c.kwargs["BLOCK_M"]
        if f32 or not (m <= 64 and bm > 32 or 64 < m <= 256 and bm > 64 or m > 256 and bm < 64):
            kept.append(c)
    return kept or fits[:1]


_prune_gemm = _prune_tiled
_prune_bwd = _prune_tiled


def _prune_gemv(configs, named_args, **kwargs):
    a = _args(named_args, kwargs)
    bm = a.get("BLOCK_M", 1)
    group = a.get("GROUP_SIZE", None)
    kept = [c for c in configs if bm * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= _GEMV_MAX_ELEMS
            and _fits_group(c, group)]
    return kept or [c for c in configs if _fits_group(c, group)][-1:] or configs[-1:]


# ============================================================================ kernels
@triton.autotune(configs=tuning_configs(_GEMM_TUNE, _GEMM_INTERP), key=["M_BUCKET", "N", "K"],
                 prune_configs_by={"early_config_prune": _prune_gemm})
@triton.jit
def _w8a16_gemm_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, M_BUCKET,
                       stride_xm, stride_wn, stride_ym,
                       HAS_BIAS: tl.constexpr, F32: tl.constexpr,
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
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + kk[None, :],
                    mask=(offs_n[:, None] < N) & (kk[None, :] < K), other=0)
        acc = _mma(x, tl.trans(w), acc, F32)
    s = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    _epilogue_store(acc * s[None, :], y_ptr, b_ptr, offs_m, offs_n, M, N, stride_ym, HAS_BIAS)


@triton.autotune(configs=tuning_configs(_GEMM_TUNE, _GEMM_INTERP), key=["M_BUCKET", "N", "K", "GROUP_SIZE"],
                 prune_configs_by={"early_config_prune": _prune_gemm})
@triton.jit
def _w4a16_gemm_kernel(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, M_BUCKET,
                       stride_xm, stride_qn, stride_sn, stride_ym,
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
        w = _int4_tile(q_ptr, s_ptr, z_ptr, offs_n, k0, N, K, stride_qn, stride_sn, GROUP_SIZE, BLOCK_N, BLOCK_K)
        acc = _mma(x, tl.trans(w.to(x.dtype)), acc, F32)
    _epilogue_store(acc, y_ptr, b_ptr, offs_m, offs_n, M, N, stride_ym, HAS_BIAS)


@triton.autotune(configs=tuning_configs(_GEMV_CONFIGS, _GEMV_INTERP), key=["N", "K", "BLOCK_M", "SPLIT_K"],
                 prune_configs_by={"early_config_prune": _prune_gemv})
@triton.jit
def _w8a16_gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, K_PER_SPLIT,
                       stride_xm, stride_wn, stride_ym,
                       HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Small-M kernel. SPLIT_K > 1 writes fp32 partials ``y[pid_k, m, n]`` (scale applied, no bias)."""
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
                    mask=(offs_m[:, None] < M) & (kk[None, :] < K), other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + kk[None, :],
                    mask=(offs_n[:, None] < N) & (kk[None, :] < K), other=0).to(tl.float32)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    s = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    acc = acc * s[None, :]
    if SPLIT_K == 1:
        _epilogue_store(acc, y_ptr, b_ptr, offs_m, offs_n, M, N, stride_ym, HAS_BIAS)
    else:
        _epilogue_store(acc, y_ptr + pid_k * M * stride_ym, b_ptr, offs_m, offs_n, M, N, stride_ym, False)


@triton.autotune(configs=tuning_configs(_GEMV_CONFIGS, _GEMV_INTERP), key=["N", "K", "BLOCK_M", "SPLIT_K", "GROUP_SIZE"],
                 prune_configs_by={"early_config_prune": _prune_gemv})
@triton.jit
def _w4a16_gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, K_PER_SPLIT,
                       stride_xm, stride_qn, stride_sn, stride_ym,
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
        w = _int4_tile(q_ptr, s_ptr, z_ptr, offs_n, k0, N, K, stride_qn, stride_sn, GROUP_SIZE, BLOCK_N, BLOCK_K)
        # round the weight to the activation dtype, as the dot-product kernel does
        w = w.to(x.dtype).to(tl.float32)
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    if SPLIT_K == 1:
        _epilogue_store(acc, y_ptr, b_ptr, offs_m, offs_n, M, N, stride_ym, HAS_BIAS)
    else:
        _epilogue_store(acc, y_ptr + pid_k * M * stride_ym, b_ptr, offs_m, offs_n, M, N, stride_ym, False)


@triton.autotune(configs=tuning_configs(_BWD_TUNE, _BWD_INTERP), key=["M_BUCKET", "N", "K"],
                 prune_configs_by={"early_config_prune": _prune_bwd})
@triton.jit
def _per_channel_bwd_kernel(dy_ptr, w_ptr, s_ptr, dx_ptr, M, N, K, M_BUCKET,
                            stride_dym, stride_wn, stride_dxm,
                            F32: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            GROUP_M: tl.constexpr):
    """``dX = dY @ (q * scale[:, None])`` for int8 or fp8 codes with a per-output-channel scale."""
    pid_m, pid_k = _tile_ids(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        nn = n0 + offs_n
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + nn[None, :],
                     mask=(offs_m[:, None] < M) & (nn[None, :] < N), other=0.0)
        w_mask = (nn[:, None] < N) & (offs_k[None, :] < K)
        q = tl.load(w_ptr + nn[:, None] * stride_wn + offs_k[None, :], mask=w_mask)
        s = tl.load(s_ptr + nn, mask=nn < N, other=0.0).to(tl.float32)
        w = tl.where(w_mask, q.to(tl.float32) * s[:, None], 0.0).to(dy.dtype)
        acc = _mma(dy, w, acc, F32)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :], acc.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=tuning_configs(_BWD_TUNE, _BWD_INTERP), key=["M_BUCKET", "N", "K", "GROUP_SIZE"],
                 prune_configs_by={"early_config_prune": _prune_bwd})
@triton.jit
def _w4_bwd_kernel(dy_ptr, q_ptr, s_ptr, z_ptr, dx_ptr, M, N, K, M_BUCKET,
                   stride_dym, stride_qn, stride_sn, stride_dxm,
                   GROUP_SIZE: tl.constexpr, F32: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr):
    """``dX = dY @ dequant(W)`` for the int4 format (exact gradient of the W4A16 layer)."""
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
        w = _int4_tile(q_ptr, s_ptr, z_ptr, nn, k0, N, K, stride_qn, stride_sn, GROUP_SIZE, BLOCK_N, BLOCK_K)
        acc = _mma(dy, w.to(dy.dtype), acc, F32)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :], acc.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm,
                       FP8: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per-row symmetric quantisation: int8 (round half away from zero) or e4m3 (hardware cast)."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        v = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    if FP8:
        qmax = 448.0
    else:
        qmax = 127.0
    scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / qmax
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        m = k0 + offs < K
        v = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=m, other=0.0).to(tl.float32) / scale
        v = tl.minimum(tl.maximum(v, -qmax), qmax)
        if FP8:
            q = v.to(q_ptr.dtype.element_ty)
        else:
            q = tl.where(v >= 0, tl.floor(v + 0.5), tl.ceil(v - 0.5)).to(tl.int8)
        tl.store(q_ptr + row * stride_qm + k0 + offs, q, mask=m)


@triton.autotune(configs=tuning_configs(_GEMM_CONFIGS, _GEMM_INTERP), key=["M_BUCKET", "N", "K"],
                 prune_configs_by={"early_config_prune": _prune_gemm})
@triton.jit
def _w8a8_gemm_kernel(xq_ptr, wq_ptr, xs_ptr, ws_ptr, b_ptr, y_ptr, M, N, K, M_BUCKET,
                      stride_xm, stride_wn, stride_ym,
                      HAS_BIAS: tl.constexpr, FP8: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr):
    """``y = (x_q @ w_q.T) * s_x[:, None] * s_w[None, :] + b``; int32 (int8) or fp32 (fp8) accumulator."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    if FP8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        x_mask = (offs_m[:, None] < M) & (kk[None, :] < K)
        w_mask = (offs_n[:, None] < N) & (kk[None, :] < K)
        if FP8:  # masked lanes as raw zero bytes (+0.0 in e4m3), then reinterpret
            x = tl.load(xq_ptr.to(tl.pointer_type(tl.uint8)) + offs_m[:, None] * stride_xm + kk[None, :],
                        mask=x_mask, other=0).to(tl.float8e4nv, bitcast=True)
            w = tl.load(wq_ptr.to(tl.pointer_type(tl.uint8)) + offs_n[:, None] * stride_wn + kk[None, :],
                        mask=w_mask, other=0).to(tl.float8e4nv, bitcast=True)
        else:
            x = tl.load(xq_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=x_mask, other=0)
            w = tl.load(wq_ptr + offs_n[:, None] * stride_wn + kk[None, :], mask=w_mask, other=0)
        acc = tl.dot(x, tl.trans(w), acc)
    xs = tl.load(xs_ptr + offs_m, mask=offs_m < M, other=0.0)
    ws = tl.load(ws_ptr + offs_n, mask=offs_n < N, other=0.0)
    out = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    _epilogue_store(out, y_ptr, b_ptr, offs_m, offs_n, M, N, stride_ym, HAS_BIAS)


# ============================================================================ host helpers
def _flat(x: torch.Tensor, k: int) -> torch.Tensor:
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


def _check_nonempty(x: torch.Tensor) -> None:
    if x.numel() == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)}): expected at least one token")


def _f32_dot(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())


def _check_tensor(t, name, dtypes, shape=None, device=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; expected {' or '.join(str(d) for d in dtypes)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (the packed weight's device)")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _check_bias(bias, n, device):
    if bias is not None:
        _check_tensor(bias, "bias", _FLOATS, (n,), device)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _choose_split_k(n: int, k: int, device: torch.device, quantum: int) -> int:
    """Split K until the N tiles (assuming 64 wide) fill about two waves of the GPU."""
    tiles = triton.cdiv(n, 64)
    target = 2 * _sm_count(device)
    split = 1
    while tiles * split < target and k // (split * 2) >= max(quantum, 512):
        split *= 2
    return split


def _gemv(kernel, x2, n, k, bias, weight_args, weight_strides, extra, split_k, quantum, out_dtype):
    m = x2.shape[0]
    split = _choose_split_k(n, k, x2.device, quantum) if split_k is None else int(split_k)
    if split < 1:
        raise ValueError(f"split_k must be >= 1, got {split_k}")
    k_per = triton.cdiv(triton.cdiv(k, split), quantum) * quantum
    split = triton.cdiv(k, k_per)
    block_m = triton.next_power_of_2(m)
    if split == 1:
        y = torch.empty(m, n, device=x2.device, dtype=out_dtype)
    else:
        y = torch.empty(split, m, n, device=x2.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), split)  # noqa: E731
    kernel[grid](x2, *weight_args, bias if bias is not None else x2, y, m, n, k, k_per,
                 x2.stride(0), *weight_strides, n, HAS_BIAS=bias is not None and split == 1,
                 SPLIT_K=split, BLOCK_M=block_m, **extra)
    if split == 1:
        return y
    out = y.sum(0)
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype)


def _gemm_grid(m, n):
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)


def _bwd_grid(m, k):
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]),)


# ============================================================================ int8 weight-only
def _check_int8(x, qweight, scale, bias=None, scale_dtypes=_FLOATS):
    _check_tensor(qweight, "qweight", (torch.int8,))
    if qweight.dim() != 2:
        raise ValueError(f"qweight must be 2-D [N, K], got shape {tuple(qweight.shape)}")
    n, k = qweight.shape
    _check_tensor(scale, "scale", scale_dtypes, (n,), qweight.device)
    check_activation(x, k, qweight.device)
    _check_bias(bias, n, qweight.device)
    _check_nonempty(x)
    return n, k


def int8_weight_forward(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                        bias: Optional[torch.Tensor] = None, *, split_k: Optional[int] = None) -> torch.Tensor:
    """W8A16 forward launcher: ``y = x @ (qweight * scale[:, None]).T + bias`` (no autograd)."""
    n, k = _check_int8(x, qweight, scale, bias)
    x2 = _flat(x, k)
    m = x2.shape[0]
    if m <= SMALL_M:
        y = _gemv(_w8a16_gemv_kernel, x2, n, k, bias, (qweight, scale), (qweight.stride(0),), {},
                  split_k, 256, x.dtype)
    else:
        y = torch.empty(m, n, device=x.device, dtype=x.dtype)
        _w8a16_gemm_kernel[_gemm_grid(m, n)](
            x2, qweight, scale, bias if bias is not None else x2, y, m, n, k, _m_bucket(m),
            x2.stride(0), qweight.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, F32=_f32_dot(x.dtype))
    return y.reshape(*x.shape[:-1], n)


def per_channel_backward_input(grad_out: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``dX = dY @ (qweight * scale[:, None])`` for int8 or fp8 codes (W8A16 exact; W8A8/FP8 STE)."""
    _check_tensor(qweight, "qweight", (torch.int8, torch.float8_e4m3fn))
    n, k = qweight.shape
    _check_tensor(scale, "scale", _FLOATS, (n,), qweight.device)
    check_activation(grad_out, n, qweight.device, name="grad_out")
    _check_nonempty(grad_out)
    g2 = _flat(grad_out, n)
    m = g2.shape[0]
    dx = torch.empty(m, k, device=g2.device, dtype=g2.dtype)
    _per_channel_bwd_kernel[_bwd_grid(m, k)](
        g2, qweight, scale, dx, m, n, k, _m_bucket(m), g2.stride(0), qweight.stride(0), dx.stride(0),
        F32=_f32_dot(g2.dtype))
    return dx.reshape(*grad_out.shape[:-1], k)


int8_weight_backward_input = per_channel_backward_input


# ============================================================================ int4 weight-only
def _check_int4(x, qweight, scales, zeros, group_size, bias=None):
    _check_tensor(qweight, "qweight", (torch.uint8,))
    if qweight.dim() != 2:
        raise ValueError(f"qweight must be 2-D [N, K/2], got shape {tuple(qweight.shape)}")
    n, k = qweight.shape[0], qweight.shape[1] * 2
    if not isinstance(group_size, int) or group_size < 32 or group_size & (group_size - 1):
        # BLOCK_K must divide the group and tl.dot needs BLOCK_K >= 16; the configs stop at 32
        raise ValueError(f"group_size must be a power of two >= 32 (32, 64 or 128), got {group_size!r}")
    if k % group_size:
        raise ValueError(f"group_size={group_size} does not divide in_features={k}")
    _check_tensor(scales, "scales", _FLOATS, (n, k // group_size), qweight.device)
    _check_tensor(zeros, "zeros", _FLOATS, (n, k // group_size), qweight.device)
    check_activation(x, k, qweight.device)
    _check_bias(bias, n, qweight.device)
    _check_nonempty(x)
    return n, k


def int4_forward(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int, bias: Optional[torch.Tensor] = None, *, split_k: Optional[int] = None) -> torch.Tensor:
    """W4A16 forward launcher: ``y = x @ dequant(W).T + bias`` (no autograd)."""
    n, k = _check_int4(x, qweight, scales, zeros, group_size, bias)
    x2 = _flat(x, k)
    m = x2.shape[0]
    if m <= SMALL_M:
        y = _gemv(_w4a16_gemv_kernel, x2, n, k, bias, (qweight, scales, zeros),
                  (qweight.stride(0), scales.stride(0)), {"GROUP_SIZE": group_size},
                  split_k, max(group_size, 256), x.dtype)
    else:
        y = torch.empty(m, n, device=x.device, dtype=x.dtype)
        _w4a16_gemm_kernel[_gemm_grid(m, n)](
            x2, qweight, scales, zeros, bias if bias is not None else x2, y, m, n, k, _m_bucket(m),
            x2.stride(0), qweight.stride(0), scales.stride(0), y.stride(0),
            GROUP_SIZE=group_size, HAS_BIAS=bias is not None, F32=_f32_dot(x.dtype))
    return y.reshape(*x.shape[:-1], n)


def int4_backward_input(grad_out: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                        zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """``dX = dY @ dequant(W)`` for int4 (the exact input gradient of the W4A16 layer)."""
    n = qweight.shape[0]
    k = qweight.shape[1] * 2
    dummy = grad_out.new_empty((1, k))
    _check_int4(dummy, qweight, scales, zeros, group_size)
    check_activation(grad_out, n, qweight.device, name="grad_out")
    _check_nonempty(grad_out)
    g2 = _flat(grad_out, n)
    m = g2.shape[0]
    dx = torch.empty(m, k, device=g2.device, dtype=g2.dtype)
    _w4_bwd_kernel[_bwd_grid(m, k)](
        g2, qweight, scales, zeros, dx, m, n, k, _m_bucket(m),
        g2.stride(0), qweight.stride(0), scales.stride(0), dx.stride(0),
        GROUP_SIZE=group_size, F32=_f32_dot(g2.dtype))
    return dx.reshape(*grad_out.shape[:-1], k)


# ============================================================================ dynamic (W8A8 / FP8)
def fp8_supported(device: torch.device | str | None = None) -> bool:
    """True when the Triton fp8 (e4m3) kernels can run on ``device`` (CUDA, capability >= 8.9)."""
    device = torch.device(device) if device is not None else torch.device("cuda")
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _check_fp8_device(device: torch.device) -> None:
    if device.type == "cpu" and interpreting() and _FP8_INTERPRETER_OK:
        return
    if not fp8_supported(device):
        what = (f"CUDA device with compute capability {torch.cuda.get_device_capability(device)}"
                if device.type == "cuda" and torch.cuda.is_available() else f"device {device}")
        raise ValueError(f"fp8 (e4m3) kernels need a CUDA GPU with compute capability >= 8.9 (Ada, Hopper "
                         f"or newer); got {what}. Use backend='torch' (emulated e4m3 reference) or the "
                         "Int8Dynamic recipe instead.")


def quantize_rows(x2: torch.Tensor, fp8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per-token) quantisation kernel: ``(x_q int8|e4m3 [M, K], scale float32 [M])``."""
    if x2.dim() != 2 or x2.stride(-1) != 1:
        raise ValueError(f"x must be 2-D with contiguous rows, got shape {tuple(x2.shape)}")
    m, k = x2.shape
    q = torch.empty(m, k, device=x2.device, dtype=torch.float8_e4m3fn if fp8 else torch.int8)
    s = torch.empty(m, device=x2.device, dtype=torch.float32)
    block = min(triton.next_power_of_2(k), 1024 if not interpreting() else 256)
    _quant_rows_kernel[(m,)](x2, q, s, k, x2.stride(0), q.stride(0), FP8=fp8, BLOCK_K=block,
                             num_warps=4 if block >= 512 else 2)
    return q, s


def _dynamic_forward(x, qweight, scale, bias, fp8):
    wdt = torch.float8_e4m3fn if fp8 else torch.int8
    _check_tensor(qweight, "qweight", (wdt,))
    if qweight.dim() != 2:
        raise ValueError(f"qweight must be 2-D [N, K], got shape {tuple(qweight.shape)}")
    n, k = qweight.shape
    _check_tensor(scale, "scale", (torch.float32,), (n,), qweight.device)
    check_activation(x, k, qweight.device)
    _check_bias(bias, n, qweight.device)
    _check_nonempty(x)
    if fp8:
        _check_fp8_device(x.device)
    x2 = _flat(x, k)
    m = x2.shape[0]
    xq, xs = quantize_rows(x2, fp8)
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    _w8a8_gemm_kernel[_gemm_grid(m, n)](
        xq, qweight, xs, scale, bias if bias is not None else xs, y, m, n, k, _m_bucket(m),
        xq.stride(0), qweight.stride(0), y.stride(0), HAS_BIAS=bias is not None, FP8=fp8)
    return y.reshape(*x.shape[:-1], n)


def int8_dynamic_forward(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                         bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W8A8 forward launcher: per-token int8 pre-pass, then int8 x int8 -> int32 ``tl.dot``."""
    return _dynamic_forward(x, qweight, scale, bias, fp8=False)


def fp8_dynamic_forward(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                        bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """FP8 forward launcher (e4m3 x e4m3 -> fp32 ``tl.dot``); raises ``ValueError`` without fp8 support."""
    return _dynamic_forward(x, qweight, scale, bias, fp8=True)


# ============================================================================ custom ops + autograd
def _frozen(name: str, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise RuntimeError(f"{name}: the packed weight (qweight/scales/zeros) is frozen and has no gradient; "
                               "call .detach() / requires_grad_(False) on it, or fine-tune the dense weight "
                               "before packing")


def _bias_grad(gy: torch.Tensor, bias_dtype):
    return gy.reshape(-1, gy.shape[-1]).sum(0).to(bias_dtype)


def _fake_out(x, n):
    return x.new_empty((*x.shape[:-1], n))


# ---- int8 weight-only
@torch.library.custom_op("robcomp::int8_weight_linear", mutates_args=())
def _int8_weight_op(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                    bias: Optional[torch.Tensor]) -> torch.Tensor:
    return int8_weight_forward(x, qweight, scale, bias)


@_int8_weight_op.register_fake
def _(x, qweight, scale, bias):
    return _fake_out(x, qweight.shape[0])


@torch.library.custom_op("robcomp::per_channel_backward_input", mutates_args=())
def _per_channel_bwd_op(grad_out: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return per_channel_backward_input(grad_out, qweight, scale)


@_per_channel_bwd_op.register_fake
def _(grad_out, qweight, scale):
    return _fake_out(grad_out, qweight.shape[1])


def _setup_per_channel(ctx, inputs, output):
    x, qweight, scale, bias = inputs
    _frozen("robcomp per-channel linear", scale)
    ctx.save_for_backward(qweight, scale)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward_per_channel(ctx, gy):
    qweight, scale = ctx.saved_tensors
    gx = _per_channel_bwd_op(gy.contiguous(), qweight, scale) if ctx.needs_input_grad[0] else None
    gb = _bias_grad(gy, ctx.bias_dtype) if ctx.needs_input_grad[3] else None
    return gx, None, None, gb


_int8_weight_op.register_autograd(_backward_per_channel, setup_context=_setup_per_channel)


def int8_weight_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                       bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W8A16 linear (Triton), differentiable w.r.t. ``x`` (exact) and ``bias``."""
    _check_int8(x, qweight, scale, bias)
    return _int8_weight_op(x, qweight, scale, bias)


# ---- int4 weight-only
@torch.library.custom_op("robcomp::int4_linear", mutates_args=())
def _int4_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
             group_size: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return int4_forward(x, qweight, scales, zeros, group_size, bias)


@_int4_op.register_fake
def _(x, qweight, scales, zeros, group_size, bias):
    return _fake_out(x, qweight.shape[0])


@torch.library.custom_op("robcomp::int4_backward_input", mutates_args=())
def _int4_bwd_op(grad_out: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int) -> torch.Tensor:
    return int4_backward_input(grad_out, qweight, scales, zeros, group_size)


@_int4_bwd_op.register_fake
def _(grad_out, qweight, scales, zeros, group_size):
    return _fake_out(grad_out, qweight.shape[1] * 2)


def _setup_int4(ctx, inputs, output):
    x, qweight, scales, zeros, group_size, bias = inputs
    _frozen("robcomp::int4_linear", scales, zeros)
    ctx.save_for_backward(qweight, scales, zeros)
    ctx.group_size = group_size
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward_int4(ctx, gy):
    qweight, scales, zeros = ctx.saved_tensors
    gx = _int4_bwd_op(gy.contiguous(), qweight, scales, zeros, ctx.group_size) if ctx.needs_input_grad[0] else None
    gb = _bias_grad(gy, ctx.bias_dtype) if ctx.needs_input_grad[5] else None
    return gx, None, None, None, None, gb


_int4_op.register_autograd(_backward_int4, setup_context=_setup_int4)


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W4A16 linear (Triton), differentiable w.r.t. ``x`` (exact) and ``bias``."""
    _check_int4(x, qweight, scales, zeros, group_size, bias)
    return _int4_op(x, qweight, scales, zeros, group_size, bias)


# ---- int8 / fp8 dynamic (straight-through input gradient)
@torch.library.custom_op("robcomp::int8_dynamic_linear", mutates_args=())
def _int8_dynamic_op(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                     bias: Optional[torch.Tensor]) -> torch.Tensor:
    return int8_dynamic_forward(x, qweight, scale, bias)


@_int8_dynamic_op.register_fake
def _(x, qweight, scale, bias):
    return _fake_out(x, qweight.shape[0])


@torch.library.custom_op("robcomp::fp8_dynamic_linear", mutates_args=())
def _fp8_dynamic_op(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                    bias: Optional[torch.Tensor]) -> torch.Tensor:
    return fp8_dynamic_forward(x, qweight, scale, bias)


@_fp8_dynamic_op.register_fake
def _(x, qweight, scale, bias):
    return _fake_out(x, qweight.shape[0])


# STE: dX = dY @ (q * s_w), the same per-channel input-gradient kernel as W8A16
_int8_dynamic_op.register_autograd(_backward_per_channel, setup_context=_setup_per_channel)
_fp8_dynamic_op.register_autograd(_backward_per_channel, setup_context=_setup_per_channel)


def int8_dynamic_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                        bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W8A8 linear (Triton); input gradient by the straight-through estimator."""
    return _int8_dynamic_op(x, qweight, scale, bias)


def fp8_dynamic_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                       bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """FP8 (e4m3) linear (Triton); raises ``ValueError`` without fp8 hardware; STE input gradient."""
    if isinstance(x, torch.Tensor):
        _check_fp8_device(x.device)
    return _fp8_dynamic_op(x, qweight, scale, bias)


# ============================================================================ ahead-of-time specs
_TL = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _jit(kernel):
    from triton.runtime.autotuner import Autotuner, Heuristics
    while isinstance(kernel, (Autotuner, Heuristics)):
        kernel = kernel.fn  # autotune wrapper -> the jit (or, interpreting, interpreted) function
    return kernel


#: arguments that are multiples of 16 (pointers: 16-byte aligned) at run time for aligned shapes
#: (N, K multiples of 128), as Triton specialises them; compiled with that hint. Left out: M,
#: M_BUCKET and stride_sn (= K / group_size, often small and odd, e.g. 768 / 128).
_ALIGNED = ("N", "K", "K_PER_SPLIT", "stride_xm", "stride_wn", "stride_ym", "stride_qn", "stride_mn",
            "stride_dym", "stride_dxm", "stride_qm")


def _spec(name, kernel, types: dict, constexprs: dict, config, expect_mma: bool):
    """One ``robcomp.kernels._aot`` entry ``(name, fn, signature, constexprs, options)``: the
    signature lists every parameter (``"constexpr"`` for compile-time ones, ``"i32"`` for ints)."""
    fn = _jit(kernel)
    consts = dict(constexprs, **config.kwargs)
    sig = {}
    for arg in fn.arg_names:
        if arg in consts:
            sig[arg] = "constexpr"
        elif arg in types:
            sig[arg] = types[arg]
        elif arg.endswith("_ptr"):
            raise KeyError(f"{name}: no type for pointer argument {arg}")
        else:
            sig[arg] = "i32"
    label = name + "_" + "_".join(f"{k}{v}" for k, v in config.kwargs.items())
    label += f"_w{config.num_warps}s{config.num_stages}"
    aligned = [a for a, t in sig.items() if t != "constexpr" and (a.endswith("_ptr") or a in _ALIGNED)]
    opts = {"num_warps": config.num_warps, "num_stages": config.num_stages, "expect_mma": expect_mma,
            "divisible_by_16": aligned}
    return (label, fn, sig, consts, opts)


def _act_types(t):
    return {"x_ptr": f"*{t}", "y_ptr": f"*{t}", "b_ptr": f"*{t}", "dy_ptr": f"*{t}", "dx_ptr": f"*{t}"}


#: M buckets standing for the small / medium / large regimes of ``_prune_tiled``
_AOT_M_BUCKETS = (16, 128, 4096)


def _tiled_configs(configs, f32=False, group=None):
    """The configs the autotuner runs for these flags, over every M regime (the prune's union)."""
    out = []
    for mb in _AOT_M_BUCKETS:
        kw = {"M_BUCKET": mb, "F32": f32, **({} if group is None else {"GROUP_SIZE": group})}
        out += [c for c in _prune_tiled(configs, {}, **kw) if all(c is not o for o in out)]
    return out


def _gemv_configs(group=None):
    """``(config, BLOCK_M)`` for every matrix-vector config the autotuner runs, each compiled at
    the largest ``BLOCK_M`` (1..8) that keeps it: the highest register pressure it runs with."""
    out = []
    for bm in (8, 4, 2, 1):
        for c in _prune_gemv(_GEMV_CONFIGS, {"BLOCK_M": bm, **({} if group is None else {"GROUP_SIZE": group})}):
            if all(c is not o for o, _ in out):
                out.append((c, bm))
    return out


#: int4 group size compiled ahead of time: 128 runs every config; smaller groups run the subset
#: whose BLOCK_K divides them (BLOCK_K = 32 for group 32), compiled identically but for the
#: constexpr group divisor, so compiling them again would only double the cost of the test
_AOT_GROUPS = (128,)


def _aot_gemv(dt) -> bool:
    """The matrix-vector kernels convert every tile to fp32 on load, so fp16 and fp32 (wider loads,
    more registers) bound what bf16 does; bf16 is not compiled a third time."""
    return dt != torch.bfloat16


def aot_specs(dtypes=(torch.float16, torch.bfloat16, torch.float32)):
    """Every kernel x autotune config x activation dtype, int4 group 128 (see ``_AOT_GROUPS``,
    ``_aot_gemv``), for ``robcomp.kernels._aot``. The configs are the autotuners' own, derived
    by their prune functions (``_tiled_configs``, ``_gemv_configs``); the tiled kernels are
    compiled for every dtype (fp16 / bf16 tensor-core MMAs, fp32 FMA dots). The W8A8 dot is int8
    for every activation dtype (only the epilogue's store differs), compiled with fp16 output.
    The fp8 kernels are in ``aot_specs_fp8`` (they compile only for sm_89 and newer, while the AOT
    test also targets sm_80)."""
    out = []
    for dt in dtypes:
        t = _TL[dt]
        f32 = dt == torch.float32
        mma = not f32
        act = _act_types(t)
        i8 = {**act, "w_ptr": "*i8", "s_ptr": f"*{t}"}
        for c in _tiled_configs(_GEMM_TUNE, f32):
            out.append(_spec(f"w8a16_gemm_{t}", _w8a16_gemm_kernel, i8, {"HAS_BIAS": True, "F32": f32}, c, mma))
        for c, bm in _gemv_configs() if _aot_gemv(dt) else ():
            out.append(_spec(f"w8a16_gemv_{t}_m{bm}", _w8a16_gemv_kernel, i8,
                             {"HAS_BIAS": True, "SPLIT_K": 1, "BLOCK_M": bm}, c, False))
        for c in _tiled_configs(_BWD_TUNE, f32):
            out.append(_spec(f"per_channel_bwd_{t}", _per_channel_bwd_kernel, i8, {"F32": f32}, c, mma))
        i4 = {**act, "q_ptr": "*u8", "s_ptr": f"*{t}", "z_ptr": f"*{t}"}
        for g in _AOT_GROUPS:
            for c in _tiled_configs(_GEMM_TUNE, f32, g):
                out.append(_spec(f"w4a16_gemm_{t}_g{g}", _w4a16_gemm_kernel, i4,
                                 {"GROUP_SIZE": g, "HAS_BIAS": True, "F32": f32}, c, mma))
            for c, bm in _gemv_configs(g) if _aot_gemv(dt) else ():
                out.append(_spec(f"w4a16_gemv_{t}_g{g}_m{bm}", _w4a16_gemv_kernel, i4,
                                 {"GROUP_SIZE": g, "HAS_BIAS": True, "SPLIT_K": 2, "BLOCK_M": bm}, c, False))
            for c in _tiled_configs(_BWD_TUNE, f32, g):
                out.append(_spec(f"w4_bwd_{t}_g{g}", _w4_bwd_kernel, i4, {"GROUP_SIZE": g, "F32": f32}, c, mma))
        out.append(_spec(f"quant_rows_int8_{t}", _quant_rows_kernel,
                         {"x_ptr": f"*{t}", "q_ptr": "*i8", "s_ptr": "*fp32"}, {"FP8": False},
                         triton.Config({"BLOCK_K": 1024}, num_warps=4, num_stages=1), False))
        if dt == torch.float16:  # the dot is int8 x int8 for every activation dtype
            w8a8 = {"xq_ptr": "*i8", "wq_ptr": "*i8", "xs_ptr": "*fp32", "ws_ptr": "*fp32",
                    "b_ptr": f"*{t}", "y_ptr": f"*{t}"}
            for c in _tiled_configs(_GEMM_CONFIGS):
                out.append(_spec(f"w8a8_gemm_{t}", _w8a8_gemm_kernel, w8a8, {"HAS_BIAS": True, "FP8": False}, c, True))
    return out


def aot_specs_fp8(dtypes=(torch.float16, torch.bfloat16)):
    """The fp8 kernels' specs: compile only for targets with fp8 (sm_89 / sm_90)."""
    out = []
    for dt in dtypes:
        t = _TL[dt]
        out.append(_spec(f"quant_rows_fp8_{t}", _quant_rows_kernel,
                         {"x_ptr": f"*{t}", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32"}, {"FP8": True},
                         triton.Config({"BLOCK_K": 1024}, num_warps=4, num_stages=1), False))
        types = {"xq_ptr": "*fp8e4nv", "wq_ptr": "*fp8e4nv", "xs_ptr": "*fp32", "ws_ptr": "*fp32",
                 "b_ptr": f"*{t}", "y_ptr": f"*{t}"}
        for c in _tiled_configs(_GEMM_CONFIGS):
            out.append(_spec(f"fp8_gemm_{t}", _w8a8_gemm_kernel, types, {"HAS_BIAS": True, "FP8": True}, c, True))
        for c in _tiled_configs(_BWD_TUNE):
            out.append(_spec(f"fp8_bwd_{t}", _per_channel_bwd_kernel,
                             {"dy_ptr": f"*{t}", "dx_ptr": f"*{t}", "w_ptr": "*fp8e4nv", "s_ptr": "*fp32"},
                             {"F32": False}, c, True))
    return out


# ============================================================================ static-model cases
# TEMPORARY (branch k-static): the interface bench/static_model.py consumes, written for the
# current kernels; the kernel skeleton (branch k-skeleton) replaces this whole section.
def _perf_label(base: str, config) -> str:
    """The ``aot_specs`` name of ``base`` compiled with ``config`` (as ``_spec`` labels it)."""
    kw = "_".join(f"{k}{v}" for k, v in config.kwargs.items())
    return f"{base}_{kw}_w{config.num_warps}s{config.num_stages}"


def _perf_split_k(n: int, k: int, sm_count: int, quantum: int) -> int:
    """``_choose_split_k`` for a GPU with ``sm_count`` SMs (the launcher asks the device)."""
    tiles, split = triton.cdiv(n, 64), 1
    while tiles * split < 2 * sm_count and k // (split * 2) >= max(quantum, 512):
        split *= 2
    k_per = triton.cdiv(triton.cdiv(k, split), quantum) * quantum
    return triton.cdiv(k, k_per)


def _perf_gemv(base, m, n, k, group, sm_count, quantum):
    split = _perf_split_k(n, k, sm_count, quantum)
    bm = triton.next_power_of_2(m)
    extra = {} if group is None else {"GROUP_SIZE": group}
    cands = [{"spec": _perf_label(f"{base}_m{bm}", c), "ctas": triton.cdiv(n, c.kwargs["BLOCK_N"]) * split,
              "weights_per_iter": c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"], "num_warps": c.num_warps}
             for c in _prune_gemv(_GEMV_CONFIGS, {"BLOCK_M": bm, **extra})]
    return cands, (3 if split > 1 else 1)  # split-K: + the host sum and the cast


def _perf_tiled(base, configs, m, rows, cols, group=None):
    """Candidates of a tiled kernel whose grid is ``cdiv(m, BLOCK_M) * cdiv(cols, BLOCK_<cols>)``
    and whose loop walks ``rows``; ``cols`` is N (forward) or K (input gradient)."""
    extra = {} if group is None else {"GROUP_SIZE": group}
    fwd = rows is None
    out = []
    for c in _prune_tiled(configs, {}, M_BUCKET=_m_bucket(m), F32=False, **extra):
        tile = c.kwargs["BLOCK_N"] if fwd else c.kwargs["BLOCK_K"]
        out.append({"spec": _perf_label(base, c), "ctas": triton.cdiv(m, c.kwargs["BLOCK_M"]) * triton.cdiv(cols, tile),
                    "weights_per_iter": c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"], "num_warps": c.num_warps})
    return out


def perf_cases(m: int, n: int, k: int, dtype=torch.float16, sm_count: int = 132) -> list[dict]:
    """One dict per op the launchers run for ``x [m, k]``, weight ``[n, k]`` (see bench/static_model.py)."""
    t, e = _TL[dtype], torch.tensor([], dtype=dtype).element_size()
    act_fwd, act_bwd, flops = e * m * k + e * m * n, e * m * n + e * m * k, 2 * m * n * k
    g = 128
    cases = []
    if m <= SMALL_M:
        c8, l8 = _perf_gemv(f"w8a16_gemv_{t}", m, n, k, None, sm_count, 256)
        c4, l4 = _perf_gemv(f"w4a16_gemv_{t}_g{g}", m, n, k, g, sm_count, 256)
    else:
        c8, l8 = _perf_tiled(f"w8a16_gemm_{t}", _GEMM_TUNE, m, None, n), 1
        c4, l4 = _perf_tiled(f"w4a16_gemm_{t}_g{g}", _GEMM_TUNE, m, None, n, g), 1
    w8, w4 = n * k + e * n, n * k // 2 + 2 * e * n * (k // g)
    cases.append({"op": "int8_weight.forward", "launches": l8, "bytes": w8 + act_fwd, "flops": flops, "candidates": c8})
    cases.append({"op": "int8_weight.backward_input", "launches": 1, "bytes": w8 + act_bwd, "flops": flops,
                  "candidates": _perf_tiled(f"per_channel_bwd_{t}", _BWD_TUNE, m, n, k)})
    cases.append({"op": f"int4_g{g}.forward", "launches": l4, "bytes": w4 + act_fwd, "flops": flops, "candidates": c4})
    cases.append({"op": f"int4_g{g}.backward_input", "launches": 1, "bytes": w4 + act_bwd, "flops": flops,
                  "candidates": _perf_tiled(f"w4_bwd_{t}_g{g}", _BWD_TUNE, m, n, k, g)})
    # dynamic: the per-token quantiser (x read, codes written and read back), then the int8/fp8 dot
    dyn = n * k + 4 * n + e * m * k + 2 * m * k + 8 * m + e * m * n
    cases.append({"op": "int8_dynamic.forward", "launches": 2, "bytes": dyn, "flops": flops,
                  "candidates": _perf_tiled(f"w8a8_gemm_{t}", _GEMM_CONFIGS, m, None, n)})
    cases.append({"op": "fp8_dynamic.forward", "launches": 2, "bytes": dyn, "flops": flops,
                  "candidates": _perf_tiled(f"fp8_gemm_{t}", _GEMM_CONFIGS, m, None, n)})
    cases.append({"op": "fp8_dynamic.backward_input", "launches": 1, "bytes": n * k + 4 * n + act_bwd, "flops": flops,
                  "candidates": _perf_tiled(f"fp8_bwd_{t}", _BWD_TUNE, m, n, k)})
    return cases


_aot_specs_of_configs = aot_specs


def aot_specs(dtypes=(torch.float16, torch.bfloat16, torch.float32)):  # noqa: F811
    """The configs' specs plus the fp16 matrix-vector kernels at BLOCK_M = 1 (what M = 1 runs;
    the configs' own specs are compiled at the largest BLOCK_M each runs with)."""
    out = _aot_specs_of_configs(dtypes)
    if torch.float16 in dtypes:
        i8 = {**_act_types("fp16"), "w_ptr": "*i8", "s_ptr": "*fp16"}
        i4 = {**_act_types("fp16"), "q_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*fp16"}
        for c in _prune_gemv(_GEMV_CONFIGS, {"BLOCK_M": 1}):
            out.append(_spec("w8a16_gemv_fp16_m1", _w8a16_gemv_kernel, i8,
                             {"HAS_BIAS": True, "SPLIT_K": 1, "BLOCK_M": 1}, c, False))
        for c in _prune_gemv(_GEMV_CONFIGS, {"BLOCK_M": 1, "GROUP_SIZE": 128}):
            out.append(_spec("w4a16_gemv_fp16_g128_m1", _w4a16_gemv_kernel, i4,
                             {"GROUP_SIZE": 128, "HAS_BIAS": True, "SPLIT_K": 2, "BLOCK_M": 1}, c, False))
    return out
