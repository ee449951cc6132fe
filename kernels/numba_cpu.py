"""numba CPU helpers: fast int4 packing of large weights and a batch-1 int4 / int8 matrix-vector
product for CPU inference (the torch reference dequantises the whole weight on every call).

Both produce exactly the reference format (``reference.int4_pack``) / the reference's result up to
fp32 summation order. Import is lazy: ``available()`` says whether numba is installed.
"""
from __future__ import annotations

import numpy as np
import torch

try:
    import numba
    from numba import njit, prange
except Exception:  # pragma: no cover - numba is a declared dependency
    numba = None

__all__ = ["available", "int4_pack", "int4_gemv", "int8_gemv"]


def available() -> bool:
    return numba is not None


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
