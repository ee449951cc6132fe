"""Low-bit matmul kernels: int8 / int4 weight-only, int8 and fp8 dynamic (W8A8 / FP8).

Formats (weights ``[N, K]`` = ``[out_features, in_features]``; exact unpack in ``reference.py``):

int8 weight-only (W8A16)
    ``qweight int8 [N, K]`` (K contiguous) + ``scale [N]`` (symmetric per output channel). The
    kernels multiply the activation by the integer codes (exact in fp16/bf16, |q| <= 127) and apply
    ``scale[n]`` once to the fp32 accumulator, with the bias, in the epilogue.
int4 weight-only (W4A16)
    ``qweight uint8 [N, K/2]``: two codes per byte, low nibble = even k, high nibble = odd k, so a
    ``BLOCK_K`` row segment is ``BLOCK_K/2`` contiguous bytes; ``scales``/``zeros
    [N, K/group_size]`` in the activation dtype, ``w = (q - zero) * scale``. A tile's ``BLOCK_K``
    divides ``group_size`` (one scale and zero per row and tile).
int8 dynamic (W8A8)
    int8 weight with a float32 per-channel scale; activations quantised per token by a pre-pass
    kernel (``x_q = round_half_away(x / s_x)``, ``s_x = max|x_row| / 127``), then an
    int8 x int8 -> int32 ``tl.dot`` with both scales and the bias in the epilogue.
fp8 dynamic (e4m3)
    As W8A8 with ``float8_e4m3fn`` codes and 448 in place of 127, fp32 accumulation. Needs a CUDA
    GPU with compute capability >= 8.9; elsewhere (CPU included) the launchers raise ``ValueError``:
    use ``backend="torch"`` (the reference emulates e4m3 with torch casts).

Kernels: the weight-only formats run the shared skeleton (``_skeleton``: GEMV with split-K for
``M <= SMALL_M``, narrow split-K tiles up to M = 64, autotuned tensor-core tiles above, one
input-gradient kernel); see that module for the techniques. The genuinely different pieces live
here: the per-token quantiser and the W8A8/FP8 dot (autotuned over ``W8A8_CONFIGS``, pruned to
the M regime).

Activations: float16 and bfloat16 run the tensor cores; float32 runs exact IEEE fp32 dots (no TF32,
slower). Under the CPU interpreter bf16 dots are computed in fp32 (the interpreter mis-multiplies
bf16 operands).

Gradients: ``dX = dY @ dequant(W)``; exact for the weight-only formats, the straight-through
estimator (STE) for the dynamic ones (the activation quantiser counts as the identity). Packed
weights are frozen (``FrozenWeightError``, a ``ValueError``). Each format is a ``torch.library``
custom op (``robcomp::...``) with a fake implementation and an autograd formula, so
``torch.compile(fullgraph=True)`` traces through it.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _skeleton as sk
from . import _specs
from ._common import (FLOAT_DTYPES, check_activation, check_bias, check_group, check_nonempty, check_tensor,
                      interpreting, rows, tuning_configs)
from ._ops import check_frozen, define_linear

__all__ = [
    "SMALL_M",
    "int8_weight_forward", "int8_weight_backward_input", "int8_weight_linear",
    "int4_forward", "int4_backward_input", "int4_linear",
    "quantize_rows", "int8_dynamic_forward", "int8_dynamic_linear",
    "fp8_dynamic_forward", "fp8_dynamic_linear", "fp8_supported",
    "per_channel_backward_input",
    "aot_specs", "aot_specs_fp8", "perf_cases",
]

#: largest M that runs the matrix-vector (no tensor core) kernel of the weight-only formats
SMALL_M = sk.SMALL_M

# tests set this to run the fp8 kernels in the CPU interpreter (the public path refuses CPU)
_FP8_INTERPRETER_OK = False


# ============================================================================ dynamic-activation kernels
@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm,
                       FP8: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per-row symmetric quantisation: int8 (round half away from zero) or e4m3 (hardware cast)."""
    row = tl.program_id(0).to(tl.int64)
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


@triton.jit
def _w8a8_gemm_kernel(xq_ptr, wq_ptr, xs_ptr, ws_ptr, b_ptr, y_ptr, M, N, K, M_BUCKET,
                      stride_xm, stride_wn, stride_ym,
                      HAS_BIAS: tl.constexpr, FP8: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr):
    """``y = (x_q @ w_q.T) * s_x[:, None] * s_w[None, :] + b``; int32 (int8) or fp32 (fp8) accumulator."""
    pid_m, pid_n = sk.tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    x_rows = sk.row_offsets(offs_m, stride_xm)
    w_rows = sk.row_offsets(offs_n, stride_wn)
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
            x = tl.load(xq_ptr.to(tl.pointer_type(tl.uint8)) + x_rows[:, None] + kk[None, :],
                        mask=x_mask, other=0).to(tl.float8e4nv, bitcast=True)
            w = tl.load(wq_ptr.to(tl.pointer_type(tl.uint8)) + w_rows[:, None] + kk[None, :],
                        mask=w_mask, other=0).to(tl.float8e4nv, bitcast=True)
            acc = tl.dot(x, tl.trans(w), acc, out_dtype=tl.float32)
        else:
            x = tl.load(xq_ptr + x_rows[:, None] + kk[None, :], mask=x_mask, other=0)
            w = tl.load(wq_ptr + w_rows[:, None] + kk[None, :], mask=w_mask, other=0)
            acc = tl.dot(x, tl.trans(w), acc, out_dtype=tl.int32)
    xs = tl.load(xs_ptr + offs_m, mask=offs_m < M, other=0.0)
    out = acc.to(tl.float32) * xs[:, None]
    sk.epilogue(out, y_ptr, ws_ptr, b_ptr, offs_m, offs_n, M, N, stride_ym, True, True, HAS_BIAS, False)


# W8A8 / FP8 tiles (int8 mma needs BLOCK_K >= 32), pruned to the M regime by ``_prune_w8a8``:
# M <= 64: BLOCK_M <= 32; M <= 256: BLOCK_M <= 64; larger: BLOCK_M >= 64
W8A8_CONFIGS = [
    sk.cfg(16, 64, 128, 4, 4),
    sk.cfg(32, 64, 64, 4, 4),
    sk.cfg(64, 64, 64, 4, 4),
    sk.cfg(128, 128, 64, 8, 3),
    sk.cfg(128, 64, 64, 4, 4),
]
_W8A8_INTERP = sk.cfg(32, 32, 32, 4, 1)


def _w8a8_regime(configs, m_bucket: int) -> list:
    kept = [c for c in configs if not (m_bucket <= 64 and c.kwargs["BLOCK_M"] > 32
                                       or 64 < m_bucket <= 256 and c.kwargs["BLOCK_M"] > 64
                                       or m_bucket > 256 and c.kwargs["BLOCK_M"] < 64)]
    return kept or list(configs[:1])


def _prune_w8a8(configs, named_args, **kwargs):
    return _w8a8_regime(configs, {**named_args, **kwargs}.get("M_BUCKET", 128))


_w8a8_gemm = triton.autotune(tuning_configs(W8A8_CONFIGS, _W8A8_INTERP), key=["M_BUCKET", "N", "K", "FP8"],
                             prune_configs_by={"early_config_prune": _prune_w8a8})(_w8a8_gemm_kernel)


# ============================================================================ weight-only launchers
def _check_int8(x, qweight, scale, bias=None, scale_dtypes=FLOAT_DTYPES):
    check_tensor(qweight, "qweight", (torch.int8,))
    if qweight.dim() != 2:
        raise ValueError(f"qweight must be 2-D [N, K], got shape {tuple(qweight.shape)}")
    n, k = qweight.shape
    check_tensor(scale, "scale", scale_dtypes, (n,), qweight.device)
    check_activation(x, k, qweight.device)
    check_bias(bias, n, qweight.device)
    check_nonempty(x)
    return n, k


def int8_weight_forward(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                        bias: Optional[torch.Tensor] = None, *, split_k: Optional[int] = None) -> torch.Tensor:
    """W8A16 forward launcher: ``y = x @ (qweight * scale[:, None]).T + bias`` (no autograd)."""
    n, k = _check_int8(x, qweight, scale, bias)
    x2 = rows(x, k)
    y = sk.run_forward(sk.INT8.value, x2, qweight, None, scale, None, bias, n, k, None,
                       (qweight.stride(0), 1, 1), split_k=split_k)
    return y.reshape(*x.shape[:-1], n)


def per_channel_backward_input(grad_out: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``dX = dY @ (qweight * scale[:, None])`` for int8 or fp8 codes (W8A16 exact; W8A8/FP8 STE)."""
    check_tensor(qweight, "qweight", (torch.int8, torch.float8_e4m3fn))
    if qweight.dim() != 2:
        raise ValueError(f"qweight must be 2-D [N, K], got shape {tuple(qweight.shape)}")
    n, k = qweight.shape
    check_tensor(scale, "scale", FLOAT_DTYPES, (n,), qweight.device)
    check_activation(grad_out, n, qweight.device, name="grad_out")
    check_nonempty(grad_out, "grad_out")
    fmt = sk.FP8.value if qweight.dtype == torch.float8_e4m3fn else sk.INT8.value
    if fmt == sk.FP8.value:
        _check_fp8_device(grad_out.device)
    g2 = rows(grad_out, n)
    dx = sk.run_backward_input(fmt, g2, qweight, None, scale, None, n, k, None, (qweight.stride(0), 1, 1))
    return dx.reshape(*grad_out.shape[:-1], k)


int8_weight_backward_input = per_channel_backward_input


def _check_int4(x, qweight, scales, zeros, group_size, bias=None, name="x"):
    check_tensor(qweight, "qweight", (torch.uint8,))
    if qweight.dim() != 2:
        raise ValueError(f"qweight must be 2-D [N, K/2], got shape {tuple(qweight.shape)}")
    n, k = qweight.shape[0], qweight.shape[1] * 2
    check_group(group_size, k)
    check_tensor(scales, "scales", FLOAT_DTYPES, (n, k // group_size), qweight.device)
    check_tensor(zeros, "zeros", FLOAT_DTYPES, (n, k // group_size), qweight.device)
    check_activation(x, k if name == "x" else n, qweight.device, name=name)
    check_bias(bias, n, qweight.device)
    check_nonempty(x, name)
    return n, k


def int4_forward(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int, bias: Optional[torch.Tensor] = None, *, split_k: Optional[int] = None) -> torch.Tensor:
    """W4A16 forward launcher: ``y = x @ dequant(W).T + bias`` (no autograd)."""
    n, k = _check_int4(x, qweight, scales, zeros, group_size, bias)
    x2 = rows(x, k)
    y = sk.run_forward(sk.INT4.value, x2, qweight, None, scales, zeros, bias, n, k, group_size,
                       (qweight.stride(0), 1, scales.stride(0)), split_k=split_k)
    return y.reshape(*x.shape[:-1], n)


def int4_backward_input(grad_out: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                        zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """``dX = dY @ dequant(W)`` for int4 (the exact input gradient of the W4A16 layer)."""
    n, k = _check_int4(grad_out, qweight, scales, zeros, group_size, name="grad_out")
    g2 = rows(grad_out, n)
    dx = sk.run_backward_input(sk.INT4.value, g2, qweight, None, scales, zeros, n, k, group_size,
                               (qweight.stride(0), 1, scales.stride(0)))
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


def _quant_block(k: int) -> int:
    return min(triton.next_power_of_2(k), 1024 if not interpreting() else 256)


def quantize_rows(x2: torch.Tensor, fp8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per-token) quantisation kernel: ``(x_q int8|e4m3 [M, K], scale float32 [M])``."""
    if x2.dim() != 2 or x2.stride(-1) != 1:
        raise ValueError(f"x must be 2-D with contiguous rows, got shape {tuple(x2.shape)}")
    m, k = x2.shape
    q = torch.empty(m, k, device=x2.device, dtype=torch.float8_e4m3fn if fp8 else torch.int8)
    s = torch.empty(m, device=x2.device, dtype=torch.float32)
    block = _quant_block(k)
    _quant_rows_kernel[(m,)](x2, q, s, k, x2.stride(0), q.stride(0), FP8=fp8, BLOCK_K=block,
                             num_warps=4 if block >= 512 else 2)
    return q, s


def _dynamic_forward(x, qweight, scale, bias, fp8):
    wdt = torch.float8_e4m3fn if fp8 else torch.int8
    check_tensor(qweight, "qweight", (wdt,))
    if qweight.dim() != 2:
        raise ValueError(f"qweight must be 2-D [N, K], got shape {tuple(qweight.shape)}")
    n, k = qweight.shape
    check_tensor(scale, "scale", (torch.float32,), (n,), qweight.device)
    check_activation(x, k, qweight.device)
    check_bias(bias, n, qweight.device)
    check_nonempty(x)
    if fp8:
        _check_fp8_device(x.device)
    x2 = rows(x, k)
    m = x2.shape[0]
    xq, xs = quantize_rows(x2, fp8)
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _w8a8_gemm[grid](xq, qweight, xs, scale, bias if bias is not None else xs, y, m, n, k, sk.m_bucket(m),
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
_PER_CHANNEL = [("qweight", "Tensor"), ("scale", "Tensor")]
_int8_weight_op = define_linear("int8_weight_linear", _PER_CHANNEL, int8_weight_forward,
                                per_channel_backward_input, "per_channel_backward_input",
                                lambda q, s: q.shape[0], lambda q, s: q.shape[1])
_int4_op = define_linear("int4_linear", [("qweight", "Tensor"), ("scales", "Tensor"), ("zeros", "Tensor"),
                                         ("group_size", "int")],
                         int4_forward, int4_backward_input, "int4_backward_input",
                         lambda q, s, z, g: q.shape[0], lambda q, s, z, g: q.shape[1] * 2)
# STE: dX = dY @ (q * s_w), the per-channel input-gradient kernel
_int8_dynamic_op = define_linear("int8_dynamic_linear", _PER_CHANNEL, int8_dynamic_forward,
                                 per_channel_backward_input, "int8_dynamic_backward_input",
                                 lambda q, s: q.shape[0], lambda q, s: q.shape[1])
_fp8_dynamic_op = define_linear("fp8_dynamic_linear", _PER_CHANNEL, fp8_dynamic_forward,
                                per_channel_backward_input, "fp8_dynamic_backward_input",
                                lambda q, s: q.shape[0], lambda q, s: q.shape[1])


def int8_weight_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                       bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W8A16 linear (Triton), differentiable w.r.t. ``x`` (exact) and ``bias``."""
    _check_int8(x, qweight, scale, bias)
    check_frozen("robcomp::int8_weight_linear", scale=scale)
    return _int8_weight_op(x, qweight, scale, bias)


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W4A16 linear (Triton), differentiable w.r.t. ``x`` (exact) and ``bias``."""
    _check_int4(x, qweight, scales, zeros, group_size, bias)
    check_frozen("robcomp::int4_linear", scales=scales, zeros=zeros)
    return _int4_op(x, qweight, scales, zeros, group_size, bias)


def int8_dynamic_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                        bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W8A8 linear (Triton); input gradient by the straight-through estimator."""
    check_frozen("robcomp::int8_dynamic_linear", scale=scale)
    return _int8_dynamic_op(x, qweight, scale, bias)


def fp8_dynamic_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                       bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """FP8 (e4m3) linear (Triton); raises ``ValueError`` without fp8 hardware; STE input gradient."""
    if isinstance(x, torch.Tensor):
        _check_fp8_device(x.device)
    check_frozen("robcomp::fp8_dynamic_linear", scale=scale)
    return _fp8_dynamic_op(x, qweight, scale, bias)


# ============================================================================ AOT specs + perf cases
def _w8a8_specs(dt, fp8: bool) -> list:
    t = _specs.TL[dt]
    code = "*fp8e4nv" if fp8 else "*i8"
    types = {"xq_ptr": code, "wq_ptr": code, "xs_ptr": "*fp32", "ws_ptr": "*fp32", "b_ptr": f"*{t}", "y_ptr": f"*{t}"}
    label = "fp8" if fp8 else "w8a8"
    return [_specs.spec(_specs.spec_name("gemm", label, t, c), _w8a8_gemm_kernel, types,
                        {"HAS_BIAS": True, "FP8": fp8}, c, True) for c in W8A8_CONFIGS]


def _quant_spec(dt, fp8: bool):
    t = _specs.TL[dt]
    c = triton.Config({"BLOCK_K": 1024}, num_warps=4, num_stages=1)
    return _specs.spec(f"quant_rows_{'fp8' if fp8 else 'int8'}_{t}", _quant_rows_kernel,
                       {"x_ptr": f"*{t}", "q_ptr": "*fp8e4nv" if fp8 else "*i8", "s_ptr": "*fp32"},
                       {"FP8": fp8}, c, False)


def aot_specs(dtypes=_specs.DTYPES):
    """Every kernel x launch config x activation dtype of the int8 / int4 weight-only and W8A8
    paths (int4 group 128), for ``robcomp.kernels._aot``: the skeleton's variants
    (``_specs.skeleton_specs``), the input gradient with the float32 scale of W8A8, the quantiser,
    and the W8A8 dot (int8 for every activation dtype: compiled with fp16 output). The fp8 kernels
    are in ``aot_specs_fp8`` (they compile only for sm_89 and newer, the AOT test also targets sm_80)."""
    out = _specs.skeleton_specs(sk.INT8.value, dtypes) + _specs.skeleton_specs(sk.INT4.value, dtypes)
    out += _specs.skeleton_specs(sk.INT8.value, [d for d in dtypes if d != torch.float32], forward=False,
                                 scale_fp32=True)
    out += [_quant_spec(dt, False) for dt in dtypes]
    if torch.float16 in dtypes:
        out += _w8a8_specs(torch.float16, False)
    return out


def aot_specs_fp8(dtypes=_specs.DTYPES):
    """The fp8 kernels (quantiser, e4m3 dot, input gradient): compile for sm_89 / sm_90 only."""
    out = [_quant_spec(dt, True) for dt in dtypes if dt != torch.float32]
    out += _w8a8_specs(torch.float16, True)
    out += _specs.skeleton_specs(sk.FP8.value, dtypes)
    return out


def _w8a8_cases(op, fp8, m, n, k, dtype, sms):
    e = torch.empty((), dtype=dtype).element_size()
    t = _specs.TL[torch.float16]
    label = "fp8" if fp8 else "w8a8"
    cands = [{"spec": _specs.spec_name("gemm", label, t, c),
              "ctas": triton.cdiv(m, c.kwargs["BLOCK_M"]) * triton.cdiv(n, c.kwargs["BLOCK_N"]),
              "weights_per_iter": c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"], "num_warps": c.num_warps}
             for c in _w8a8_regime(W8A8_CONFIGS, sk.m_bucket(m))]
    fwd = {"op": f"{op}_forward", "launches": 2, "bytes": n * k + 4 * n + m * k * (e + 1) + 4 * m + m * n * e,
           "flops": 2 * m * n * k, "candidates": cands}
    wfmt = sk.FP8.value if fp8 else sk.INT8.value
    bwd = _specs.skeleton_cases(op, wfmt, m, n, k, n * k + 4 * n, dtype, sms)[-1]
    if not fp8:
        for c in bwd["candidates"]:
            c["spec"] = c["spec"].replace(f"_{_specs.TL[dtype]}_", f"_{_specs.TL[dtype]}_s32_", 1) \
                if dtype != torch.float32 else c["spec"]
    return [fwd, bwd]


def perf_cases(m: int, n: int, k: int, dtype=torch.float16, sm_count: int = 132) -> list[dict]:
    """Static-model records of every op this module launches for ``x [m, k]``, ``W [n, k]``: int8
    and int4 (group 128) weight-only, W8A8 and FP8 (forward and input gradient)."""
    e = torch.empty((), dtype=dtype).element_size()
    g = _specs.AOT_GROUP
    out = _specs.skeleton_cases("int8_weight", sk.INT8.value, m, n, k, n * k + n * e, dtype, sm_count)
    out += _specs.skeleton_cases(f"int4_g{g}", sk.INT4.value, m, n, k, n * k // 2 + 2 * n * (k // g) * e,
                                 dtype, sm_count, group=g)
    out += _w8a8_cases("int8_dynamic", False, m, n, k, dtype, sm_count)
    if dtype != torch.float32:
        out += _w8a8_cases("fp8_dynamic", True, m, n, k, dtype, sm_count)
    return out
