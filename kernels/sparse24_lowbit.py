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
fp16 at group 128. The kernels are the shared skeleton's (``_skeleton``, ``FORMAT = S24I4``): for
``M <= SMALL_M`` a compressed-domain GEMV (each dequantised kept value selects its activation among
the 4 of its group; fp32 partials reduced once after the K loop; split-K with fp32 atomics; fp16
at M = 1 in packed half2 registers: metadata-driven byte permutes select the activations, the
kept pairs are dequantised to the reference's fp16 weights and each code word's 8 products sum in
fp16 before fp32, which roughly doubles the rounding error of fp32 partials, still within fp16
output precision, and overflows only where 8 products of one code word sum past the fp16 range); for
larger M the tile is expanded to dense in registers (a rank-3 select) and fed to ``tl.dot`` (there
is no sparse tensor-core instruction in Triton). The speed comes from reading 5.3x fewer weight
bytes (memory-bound M).

The input gradient ``dX = dY @ dequant(W)`` is exact (the layer's own weight). Packed weights are
frozen. fp32 activations run an exact fp32 dot (see ``lowbit``).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _skeleton as sk
from . import _specs
from ._common import FLOAT_DTYPES, check_activation, check_bias, check_group, check_nonempty, check_tensor, rows
from ._ops import check_frozen, define_linear

__all__ = ["sparse24_int4_forward", "sparse24_int4_backward_input", "sparse24_int4_linear", "aot_specs",
           "perf_cases"]


def _check(qvalues, scales, zeros, meta, group_size):
    check_tensor(qvalues, "qvalues", (torch.uint8,))
    if qvalues.dim() != 2:
        raise ValueError(f"qvalues must be 2-D [N, K/4], got shape {tuple(qvalues.shape)}")
    n, k = qvalues.shape[0], qvalues.shape[1] * 4
    check_group(group_size, k)
    check_tensor(scales, "scales", FLOAT_DTYPES, (n, k // group_size), qvalues.device)
    check_tensor(zeros, "zeros", FLOAT_DTYPES, (n, k // group_size), qvalues.device)
    check_tensor(meta, "meta", (torch.uint8,), (n, k // 8), qvalues.device)
    return n, k


def _strides(qvalues, meta, scales):
    return (qvalues.stride(0), meta.stride(0), scales.stride(0))


def sparse24_int4_forward(x: torch.Tensor, qvalues: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                          meta: torch.Tensor, group_size: int, bias: Optional[torch.Tensor] = None, *,
                          split_k: Optional[int] = None) -> torch.Tensor:
    """2:4+int4 forward launcher: ``y = x @ dequant(W).T + bias`` (no autograd)."""
    n, k = _check(qvalues, scales, zeros, meta, group_size)
    check_activation(x, k, qvalues.device)
    check_bias(bias, n, qvalues.device)
    check_nonempty(x)
    x2 = rows(x, k)
    y = sk.run_forward(sk.S24I4.value, x2, qvalues, meta, scales, zeros, bias, n, k, group_size,
                       _strides(qvalues, meta, scales), split_k=split_k)
    return y.reshape(*x.shape[:-1], n)


def sparse24_int4_backward_input(grad_out: torch.Tensor, qvalues: torch.Tensor, scales: torch.Tensor,
                                 zeros: torch.Tensor, meta: torch.Tensor, group_size: int) -> torch.Tensor:
    """``dX = dY @ dequant(W)`` (exact input gradient of the 2:4+int4 layer)."""
    n, k = _check(qvalues, scales, zeros, meta, group_size)
    check_activation(grad_out, n, qvalues.device, name="grad_out")
    check_nonempty(grad_out, "grad_out")
    g2 = rows(grad_out, n)
    dx = sk.run_backward_input(sk.S24I4.value, g2, qvalues, meta, scales, zeros, n, k, group_size,
                               _strides(qvalues, meta, scales))
    return dx.reshape(*grad_out.shape[:-1], k)


_s24i4_op = define_linear(
    "sparse24_int4_linear",
    [("qvalues", "Tensor"), ("scales", "Tensor"), ("zeros", "Tensor"), ("meta", "Tensor"), ("group_size", "int")],
    sparse24_int4_forward, sparse24_int4_backward_input, "sparse24_int4_backward_input",
    lambda q, s, z, m, g: q.shape[0], lambda q, s, z, m, g: q.shape[1] * 4)


def sparse24_int4_linear(x: torch.Tensor, qvalues: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                         meta: torch.Tensor, group_size: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """2:4+int4 linear (Triton), differentiable w.r.t. ``x`` (exact) and ``bias``."""
    n, k = _check(qvalues, scales, zeros, meta, group_size)
    check_activation(x, k, qvalues.device)
    check_bias(bias, n, qvalues.device)
    check_nonempty(x)
    check_frozen("robcomp::sparse24_int4_linear", scales=scales, zeros=zeros)
    return _s24i4_op(x, qvalues, scales, zeros, meta, group_size, bias)


def aot_specs(dtypes=_specs.DTYPES):
    """Every GEMV / GEMM / input-gradient variant the launchers run (int4 group 128), for
    ``robcomp.kernels._aot`` (built by ``_specs.skeleton_specs``)."""
    return _specs.skeleton_specs(sk.S24I4.value, dtypes)


def perf_cases(m: int, n: int, k: int, dtype=torch.float16, sm_count: int = 132) -> list[dict]:
    """Static-model records of the 2:4+int4 (group 128) forward and input gradient."""
    e = torch.empty((), dtype=dtype).element_size()
    g = _specs.AOT_GROUP
    wbytes = n * k // 4 + n * k // 8 + 2 * n * (k // g) * e
    return _specs.skeleton_cases(f"sparse24_int4_g{g}", sk.S24I4.value, m, n, k, wbytes, dtype, sm_count, group=g)
