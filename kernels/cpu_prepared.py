"""CPU forwards prepared once per layer, for eager calls without a gradient.

A compressed 256-wide layer's kernel takes ~3 us at one row; looking up the kernel, converting each
weight to numpy and going through the generic launcher (``kernels/cpu.py``) cost several times
that on every call. A :class:`Batch1` does that work once: it holds the compiled numba kernel, the
weights' numpy views (views share memory with the buffers, so in-place edits are seen; the layer
rebuilds it when a buffer is replaced or a converted copy goes stale) and the bias, and a call is
``x -> numpy -> kernel -> + bias -> tensor``. The native PyTorch kernels (tinygemm int4, int8
weight-only, fbgemm's and oneDNN's int8 GEMMs of int8 dynamic) get the same treatment at any M:
their derived copies and the dtype conversions are resolved once (:func:`int4_tinygemm`,
:func:`int8_pack`, :func:`int8_engine`).

Results equal the generic launchers' (same kernels, same float32 order of operations); the bias is
added into the kernel's float32 output before the cast to the activation dtype, as
``cpu._Linear2d`` does. Only the forward is here: a call that records a gradient wraps
:meth:`Batch1.forward_f32` in ``cpu._Linear2d`` with the format's usual input-gradient kernel.
"""
from __future__ import annotations

import numpy as np
import torch

from robcomp.kernels import cpu
from robcomp.kernels import numba_cpu as NB

__all__ = ["Batch1", "int8_weight", "int8_dynamic", "fp8_dynamic", "sparse24", "sparse24_int4", "int4_tinygemm", "int8_pack",
           "int8_engine"]


class Batch1:
    """``x [..., K] (one row) -> y [..., N]``: ``layout(x1)`` gives the kernel's input (a reshape
    when it is a shape), the kernel writes ``out`` of ``out_shape``, ``finish(out, x1)`` applies
    what the kernel leaves out (a rescale)."""

    __slots__ = ("kernel", "weights", "n", "k", "bias", "layout", "out_shape", "finish")

    def __init__(self, kernel, weights, n, k, bias, layout, out_shape=None, finish=None):
        self.kernel, self.weights, self.n, self.k = kernel, weights, n, k
        # a float32 bias is read live (a view); another dtype is converted on each call
        self.bias = None if bias is None or bias.dtype != torch.float32 else cpu._np(bias)
        self.layout, self.out_shape, self.finish = layout, out_shape or (n,), finish

    def numpy_out(self, x: torch.Tensor) -> np.ndarray:
        """The float32 ``[N]`` product (no bias) of the one-row ``x``."""
        x1 = cpu._np(x if x.dtype == torch.float32 else x.float())
        layout = self.layout
        xk = x1.reshape(layout) if type(layout) is tuple else layout(x1)
        out = np.empty(self.out_shape, np.float32)
        self.kernel(xk, *self.weights, out)
        return out if self.finish is None else self.finish(out, x1)

    def forward_f32(self, x2: torch.Tensor) -> torch.Tensor:
        """``[1, K] -> [1, N]`` float32 without bias (the forward inside ``cpu._Linear2d``)."""
        return torch.from_numpy(self.numpy_out(x2).reshape(1, self.n))

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W.T + bias`` for one row, no gradient recorded, in x's dtype."""
        out = self.numpy_out(x)
        if bias is not None:
            if self.bias is not None:
                out += self.bias.reshape(self.out_shape)
            else:
                out = out + cpu._np(bias.float()).reshape(self.out_shape)
        y = torch.from_numpy(out.reshape(*x.shape[:-1], self.n))
        return y if x.dtype == torch.float32 else y.to(x.dtype)


def _by_meta_byte(x1: np.ndarray) -> np.ndarray:
    # xq[h, t, j] = x[8 j + 4 h + t]: the 2:4 batch-1 kernels' layout
    return np.ascontiguousarray(x1.reshape(-1, 2, 4).transpose(1, 2, 0))


def int8_weight(qweight, scale, bias) -> Batch1:
    """Int8 weight-only, float32 activations (``cpu.int8_weight_linear_fp32``'s kernel, which
    applies the per-channel scale)."""
    n, k = qweight.shape
    return Batch1(NB.kernel("int8_fwdb1", cpu._parallel()), (cpu._np(qweight), cpu._np(scale.float())), n, k,
                  bias, (1, 1, k), (1, n))


def int8_dynamic(qweight, scale, bias) -> Batch1:
    """Int8 dynamic (``cpu.int8_dynamic_linear_gemv``): the row quantised to int8 codes and a
    scale in one numba pass, the exact int32 GEMV, then ``acc * x_scale * w_scale`` in float32."""
    n, k = qweight.shape
    quantize = NB.kernel("int8_quantize_rows")
    gemv = NB.kernel("i8i8_fwdb1", cpu._parallel())
    s32 = cpu._np(scale.float())

    def kernel(x1, q, out):
        xq = np.empty((1, 1, k), np.int8)
        xs = np.empty(1, np.float32)
        quantize(x1.reshape(1, k), xq.reshape(1, k), xs, 0)
        acc = np.empty((1, n), np.int32)
        gemv(xq, q, acc)
        out[:] = acc[0]  # int32 -> float32, rounded as torch's .to(float32)
        out *= xs[0]
        out *= s32

    return Batch1(kernel, (cpu._np(qweight),), n, k, bias, (k,))


def fp8_dynamic(qweight_bits, scale, bias) -> Batch1:
    """FP8 dynamic (``cpu.fp8_dynamic_linear`` on a weight without NaN codes): the row quantised to
    e4m3 values and a scale in one numba pass, the bit-decoding GEMV, then ``* w_scale * x_scale``."""
    n, k = qweight_bits.shape
    quantize = NB.kernel("fp8_quantize_rows")
    gemv = NB.kernel("fp8_fwd1", cpu._parallel())
    s32 = cpu._np(scale.float())

    def kernel(x1, codes, out):
        xq = np.empty((1, k), np.float32)
        xs = np.empty(1, np.float32)
        quantize(x1.reshape(1, k), xq, xs)
        gemv(xq.reshape(k), codes, out)
        out *= s32
        out *= xs[0]

    return Batch1(kernel, (cpu._np(qweight_bits),), n, k, bias, (k,))


def sparse24(values, meta, bias) -> Batch1 | None:
    """2:4 (``cpu.sparse24_linear``'s batch-1 kernel); None where K % 8 != 0 (no such kernel)."""
    n, kh = values.shape
    if (2 * kh) % 8:
        return None
    kernel = NB.kernel("sp24_fwd1", cpu._parallel())
    return Batch1(kernel, (cpu._np(values.float()), cpu._np(meta)), n, 2 * kh, bias, _by_meta_byte)


def sparse24_int4(qvalues, scales, zeros, meta, group_size, bias) -> Batch1 | None:
    """2:4 + int4 (``cpu.sparse24_int4_linear``'s batch-1 kernel); None where that kernel cannot
    take the shape (it reads two groups' codes as one uint16, a scale group as whole meta bytes)."""
    n, kq = qvalues.shape
    hg = group_size // 2
    if kq % 2 or hg % 4:
        return None
    kernel = NB.kernel("s24i4_fwd1", cpu._parallel(), hg)
    weights = (cpu._np(qvalues).view(np.uint16), cpu._np(scales.float()), cpu._np(zeros.float()), cpu._np(meta))
    return Batch1(kernel, weights, n, 4 * kq, bias, _by_meta_byte)


def _native(op, n, k):
    """``op(x2 bf16) -> y bf16`` as ``cpu._Linear2d`` runs it: bias added in y's dtype, then cast."""
    def run(x, bias):
        y = op(x.reshape(-1, k).to(torch.bfloat16).contiguous())
        if bias is not None:
            y += bias.to(y.dtype)
        return y.to(x.dtype).reshape(*x.shape[:-1], n)
    return run


def int4_tinygemm(d, group_size, n, k):
    """Int4 weight-only through tinygemm (``cpu.int4_linear``'s forward) on the derived copy ``d``."""
    packed, scales_zeros = d["int4pack"], d["scales_zeros"]
    return _native(lambda xb: torch._weight_int4pack_mm_for_cpu(xb, packed, group_size, scales_zeros), n, k)


def int8_pack(qweight, d):
    """Int8 weight-only through ``_weight_int8pack_mm`` (``cpu.int8_weight_linear``'s forward)."""
    n, k = qweight.shape
    scale = d["scale_bf16"]
    return _native(lambda xb: torch._weight_int8pack_mm(xb, qweight, scale), n, k)


def int8_engine(parts, n, k):
    """Int8 dynamic through fbgemm or oneDNN (``kernels/cpu_int8_gemm.py``'s ``parts``, a
    ``(quantize, mm)`` pair) as its launcher runs it: ``mm(codes) * x_scale``, then the bias in
    float32, then the cast; in place on the GEMM's fresh output."""
    quantize, mm = parts

    def run(x, bias):
        codes, xs = quantize(x.reshape(-1, k))
        y = mm(codes)
        y.mul_(xs[:, None])
        if bias is not None:
            y.add_(bias.to(torch.float32))
        return y.to(x.dtype).reshape(*x.shape[:-1], n)
    return run
