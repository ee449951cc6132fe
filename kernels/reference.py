"""Plain-PyTorch reference of every compressed weight format and matmul.

This module is the oracle for the Triton kernels and the CPU ("torch") backend of the
compressed layers. It favours clarity over speed; nothing here launches a kernel.

Formats (weights are ``[N, K]`` = ``[out_features, in_features]``, as in ``nn.Linear``):

2:4 semi-structured sparse
    In every group of 4 consecutive weights along K, 2 are kept. ``values`` is ``[N, K/2]`` in
    the weight dtype, the two kept weights of each group in increasing position order.
    ``meta`` is ``uint8 [N, ceil(K/8)]``: one nibble per group, low nibble for even groups,
    high nibble for odd groups; a nibble is ``idx0 | idx1 << 2`` with ``idx0 < idx1`` the kept
    positions inside the group. 2 metadata bits per kept value is what gives the 16/9 byte
    ratio against dense fp16. The round trip ``unpack(pack(w))`` is exact on the kept entries.

int8 weight-only (W8A16)
    Symmetric per output channel: ``scale[n] = max|w[n, :]| / 127``, ``q = round(w / scale)``
    in [-127, 127] stored as ``int8 [N, K]``; ``w ~= q * scale[:, None]``.

int4 weight-only (W4A16)
    Asymmetric per group of ``group_size`` consecutive weights along K:
    ``scale = (max - min) / 15``, ``zero = round(-min / scale)`` in [0, 15],
    ``q = clamp(round(w / scale) + zero, 0, 15)``, ``w ~= (q - zero) * scale``.
    Two values per byte, ``uint8 [N, K/2]``: low nibble = even k, high nibble = odd k.
    ``scales`` and ``zeros`` are ``[N, K / group_size]`` in the weight (activation) dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "check_weight",
    "sparse24_mask",
    "sparse24_pack",
    "sparse24_unpack",
    "sparse24_linear",
    "int8_weight_pack",
    "int8_weight_unpack",
    "int8_weight_linear",
    "int4_pack",
    "int4_unpack",
    "int4_linear",
]


def check_weight(weight: torch.Tensor, name: str = "weight") -> None:
    """Reject weights that cannot be packed: not 2-D, not floating point, or not finite."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {weight.dtype}")
    if not torch.isfinite(weight).all():
        raise ValueError(f"{name} contains NaN or Inf values; cannot pack a non-finite weight")


# ----------------------------------------------------------------------------------------- 2:4
def sparse24_mask(weight: torch.Tensor) -> torch.Tensor:
    """Boolean mask keeping the 2 largest-magnitude weights of every group of 4 along K."""
    n, k = weight.shape
    if k % 4:
        raise ValueError(f"2:4 sparsity needs in_features divisible by 4, got {k}")
    groups = weight.detach().abs().reshape(n, k // 4, 4)
    top2 = groups.topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top2, True)
    return mask.reshape(n, k)


def _check_24_mask(mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if mask.shape != shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(shape)}")
    mask = mask.to(torch.bool)
    per_group = mask.reshape(shape[0], shape[1] // 4, 4).sum(-1)
    if not (per_group == 2).all():
        raise ValueError("mask is not 2:4: every group of 4 along in_features must keep exactly 2")
    return mask


def sparse24_pack(weight: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack a dense ``[N, K]`` weight into 2:4 ``(values [N, K/2], meta uint8 [N, ceil(K/8)])``.

    The kept entries are the largest two magnitudes per group, or those of a given 2:4 ``mask``.
    """
    check_weight(weight)
    n, k = weight.shape
    if k % 4:
        raise ValueError(f"2:4 sparsity needs in_features divisible by 4, got in_features={k}")
    mask = sparse24_mask(weight) if mask is None else _check_24_mask(mask, weight.shape)
    g = k // 4
    groups_mask = mask.reshape(n, g, 4)
    # positions of the kept entries, ascending: sort keeps order among True
    pos = torch.arange(4, device=weight.device).expand(n, g, 4)
    kept_pos = torch.where(groups_mask, pos, pos + 4).sort(dim=-1).values[..., :2]  # [n, g, 2]
    values = weight.reshape(n, g, 4).gather(-1, kept_pos).reshape(n, k // 2).contiguous()
    nibble = (kept_pos[..., 0] | (kept_pos[..., 1] << 2)).to(torch.int32)  # [n, g]
    if g % 2:
        nibble = F.pad(nibble, (0, 1))
    nib = nibble.reshape(n, -1, 2)
    meta = (nib[..., 0] | (nib[..., 1] << 4)).to(torch.uint8).contiguous()
    return values, meta


def sparse24_unpack(values: torch.Tensor, meta: torch.Tensor, in_features: int) -> torch.Tensor:
    """Expand packed 2:4 ``values``/``meta`` back to a dense ``[N, in_features]`` weight (zeros elsewhere)."""
    n, half = values.shape
    if in_features % 4 or half * 2 != in_features:
        raise ValueError(f"values of shape {tuple(values.shape)} do not match in_features={in_features}")
    g = in_features // 4
    m = meta.to(torch.int32)
    nibble = torch.stack([m & 0xF, (m >> 4) & 0xF], dim=-1).reshape(n, -1)[:, :g]
    idx = torch.stack([nibble & 0x3, (nibble >> 2) & 0x3], dim=-1)  # [n, g, 2]
    dense = torch.zeros(n, g, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, idx.long(), values.reshape(n, g, 2))
    return dense.reshape(n, in_features)


def sparse24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x @ unpack(values, meta).T + bias``; differentiable w.r.t. ``x``."""
    w = sparse24_unpack(values, meta, values.shape[1] * 2)
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


# ---------------------------------------------------------------------------------- int8 (W8A16)
def int8_weight_pack(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: returns ``(qweight int8 [N, K], scale [N])``."""
    check_weight(weight)
    w = weight.detach().to(torch.float64)
    amax = w.abs().amax(dim=1).clamp_min(1e-12)
    scale = amax / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.to(weight.dtype)


def int8_weight_unpack(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    dtype = dtype or scale.dtype
    return (qweight.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)


def int8_weight_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    w = int8_weight_unpack(qweight, scale, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


# ---------------------------------------------------------------------------------- int4 (W4A16)
def _check_group(k: int, group_size: int) -> None:
    if group_size <= 0 or group_size % 2:
        raise ValueError(f"group_size must be a positive even integer, got {group_size}")
    if k % group_size:
        raise ValueError(f"group_size={group_size} does not divide in_features={k}")


def int4_pack(weight: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group along K: ``(qweight uint8 [N, K/2], scales, zeros [N, K/group_size])``."""
    check_weight(weight)
    n, k = weight.shape
    _check_group(k, group_size)
    w = weight.detach().to(torch.float64).reshape(n, k // group_size, group_size)
    wmin = w.amin(-1).clamp(max=0.0)  # include 0 so that zero weights stay exact
    wmax = w.amax(-1).clamp(min=0.0)
    scale = ((wmax - wmin) / 15.0).clamp_min(1e-12)
    # quantise with the stored (rounded) scale so that unpack reproduces exactly what was chosen
    scale = scale.to(weight.dtype).to(torch.float64)
    zero = torch.round(-wmin / scale).clamp_(0, 15)
    q = torch.clamp(torch.round(w / scale[..., None]) + zero[..., None], 0, 15).to(torch.uint8).reshape(n, k)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
    return packed, scale.to(weight.dtype).contiguous(), zero.to(weight.dtype).contiguous()


def int4_unpack(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    n, half = qweight.shape
    k = half * 2
    q = torch.stack([qweight & 0xF, qweight >> 4], dim=-1).reshape(n, k).to(torch.float32)
    q = q.reshape(n, k // group_size, group_size)
    w = (q - zeros.to(torch.float32)[..., None]) * scales.to(torch.float32)[..., None]
    return w.reshape(n, k).to(dtype or scales.dtype)


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    w = int4_unpack(qweight, scales, zeros, group_size, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


# ------------------------------------------------------------------- dynamic formats (W8A8, FP8)
# int8 dynamic (W8A8)
#     Weight: symmetric per output channel, exactly as int8 weight-only, but the scale is kept in
#     float32 (``qweight int8 [N, K]``, ``scale float32 [N]``).  Activation: quantised per token
#     (per row of the flattened ``[M, K]`` input) at run time: ``s_x = max(|x|, 1e-12) / 127``,
#     ``x_q = round_half_away(x / s_x)`` clamped to [-127, 127]; ``y = (x_q @ q.T) * s_x * s_w``,
#     the integer dot product exact (int32 accumulation).
# fp8 dynamic (e4m3)
#     As int8 dynamic with float8_e4m3fn codes and 448 (the largest e4m3 value) in place of 127:
#     ``qweight float8_e4m3fn [N, K]`` + ``scale float32 [N]``; activations per token.
# Gradient: both dynamic formats differentiate w.r.t. the input with the straight-through
#     estimator (STE) for the activation rounding: ``dX = dY @ dequant(W)``, i.e. the activation
#     quantiser counts as the identity in the backward pass. The weight term is exact.
INT8_MAX = 127.0
FP8_E4M3_MAX = 448.0


def round_half_away(v: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties away from zero (what the kernels compute with floor/ceil)."""
    return torch.where(v >= 0, torch.floor(v + 0.5), torch.ceil(v - 0.5))


def _check_rows(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [tokens, in_features], got shape {tuple(x.shape)}")


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per-token) symmetric int8: ``(x_q int8 [M, K], scale float32 [M])``."""
    _check_rows(x)
    xf = x.detach().to(torch.float32)
    scale = xf.abs().amax(dim=1).clamp_min(1e-12) / INT8_MAX
    q = round_half_away(xf / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per-token) e4m3: ``(x_q float8_e4m3fn [M, K], scale float32 [M])``."""
    _check_rows(x)
    xf = x.detach().to(torch.float32)
    scale = xf.abs().amax(dim=1).clamp_min(1e-12) / FP8_E4M3_MAX
    q = (xf / scale[:, None]).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def int8_dynamic_pack(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W8A8 weight: ``(qweight int8 [N, K], scale float32 [N])`` (symmetric per output channel)."""
    check_weight(weight)
    return int8_weight_pack(weight.detach().to(torch.float32))


def int8_dynamic_unpack(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return int8_weight_unpack(qweight, scale, dtype or torch.float32)


def fp8_dynamic_pack(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 weight: ``(qweight float8_e4m3fn [N, K], scale float32 [N])``, per output channel."""
    check_weight(weight)
    w = weight.detach().to(torch.float32)
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / FP8_E4M3_MAX
    q = (w / scale[:, None]).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q.contiguous(), scale.contiguous()


def fp8_dynamic_unpack(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return (qweight.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype or torch.float32)


class _StraightThrough(torch.autograd.Function):
    """``y = quantised_linear(x)`` forward; ``dX = dY @ W_deq`` backward (STE for the activation)."""

    @staticmethod
    def forward(ctx, x, w_deq, bias, fn):
        ctx.save_for_backward(w_deq)
        ctx.bias_dtype = None if bias is None else bias.dtype
        with torch.no_grad():
            y = fn(x.detach())
            if bias is not None:
                y = y + bias.to(y.dtype)
        return y

    @staticmethod
    def backward(ctx, gy):
        (w,) = ctx.saved_tensors
        gx = gy @ w.to(gy.dtype) if ctx.needs_input_grad[0] else None
        gb = None
        if ctx.needs_input_grad[2]:
            gb = gy.reshape(-1, gy.shape[-1]).sum(0).to(ctx.bias_dtype)
        return gx, None, gb, None


def _dynamic_linear(x, qweight, scale, bias, quantize, unpack):
    if x.numel() == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)}); nothing to multiply")
    k = qweight.shape[1]

    def fn(xd):
        x2 = xd.reshape(-1, k)
        xq, xs = quantize(x2)
        acc = xq.to(torch.float64) @ qweight.to(torch.float64).T  # exact integer / fp8 products
        y = (acc * xs.to(torch.float64)[:, None] * scale.to(torch.float64)[None, :]).to(torch.float32)
        return y.to(xd.dtype).reshape(*xd.shape[:-1], qweight.shape[0])

    return _StraightThrough.apply(x, unpack(qweight, scale, torch.float32), bias, fn)


def int8_dynamic_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 reference: per-token int8 activations, exact integer dot, STE gradient w.r.t. ``x``."""
    return _dynamic_linear(x, qweight, scale, bias, quantize_rows_int8, int8_dynamic_unpack)


def fp8_dynamic_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """FP8 (e4m3) reference, emulated with float8_e4m3fn casts (runs on CPU); STE gradient."""
    return _dynamic_linear(x, qweight, scale, bias, quantize_rows_fp8, fp8_dynamic_unpack)


# ------------------------------------------------------------------------------ 2:4 + int4
# The 2:4 values of ``sparse24_pack`` ([N, K/2]) quantised with ``int4_pack`` using groups of
# ``group_size / 2`` kept values, i.e. one group per ``group_size`` columns of the dense weight:
#     qvalues uint8 [N, K/4]   two int4 codes per byte, low nibble = even kept-value index
#     scales, zeros [N, K/group_size] in the weight dtype (asymmetric, as int4 weight-only)
#     meta uint8 [N, ceil(K/8)]  the 2:4 metadata, unchanged (see the 2:4 format above)
# K must be divisible by group_size (and so by 4).
def sparse24_int4_pack(weight: torch.Tensor, group_size: int = 128, mask: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack ``[N, K]`` into 2:4 + int4: ``(qvalues, scales, zeros, meta)``."""
    check_weight(weight)
    n, k = weight.shape
    if group_size <= 0 or group_size % 4:
        raise ValueError(f"group_size must be a positive multiple of 4, got {group_size}")
    if k % group_size:
        raise ValueError(f"group_size={group_size} does not divide in_features={k}")
    values, meta = sparse24_pack(weight, mask)
    qvalues, scales, zeros = int4_pack(values, group_size // 2)
    return qvalues, scales, zeros, meta


def sparse24_int4_unpack(qvalues: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, meta: torch.Tensor,
                         group_size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense ``[N, K]`` weight of a 2:4 + int4 packed weight (exact: what the kernels compute with)."""
    values = int4_unpack(qvalues, scales, zeros, group_size // 2, torch.float32)
    return sparse24_unpack(values, meta, qvalues.shape[1] * 4).to(dtype or scales.dtype)


def sparse24_int4_linear(x: torch.Tensor, qvalues: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                         meta: torch.Tensor, group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    w = sparse24_int4_unpack(qvalues, scales, zeros, meta, group_size, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


__all__ += [
    "round_half_away", "quantize_rows_int8", "quantize_rows_fp8",
    "int8_dynamic_pack", "int8_dynamic_unpack", "int8_dynamic_linear",
    "fp8_dynamic_pack", "fp8_dynamic_unpack", "fp8_dynamic_linear",
    "sparse24_int4_pack", "sparse24_int4_unpack", "sparse24_int4_linear",
]
