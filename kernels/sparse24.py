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

We kept the reference layout: both arrays are contiguous along K, the direction every kernel
walks; a tile reads ``BLOCK_K/2`` values and ``BLOCK_K/8`` metadata bytes per row as contiguous runs.

Kernels (one kernel, four layers, as in DESIGN.md)
--------------------------------------------------
1. The shared skeleton (``_skeleton``, ``FORMAT = S24``). ``gemv_kernel`` for ``M <= GEMV_MAX_M``
   works in the compressed domain: each kept value selects its activation among the 4 of its
   group (register selects, no gather loads, no multiplications by the zeros); fp32 partials are
   reduced once after the K loop; split-K with fp32 atomics fills the GPU. ``gemm_kernel``
   expands ``values + meta`` to a dense ``[BLOCK_N, BLOCK_K]`` tile in registers (a rank-3
   select, which triton 3.6 accepts as a wgmma operand) and feeds ``tl.dot``. ``dx_kernel``:
   ``dX = dY · W`` from the same packed weight (same expansion, no dense or transposed copy).
2. ``sparse24_forward`` / ``sparse24_backward_input``: host launchers (validation, grid, config).
3. ``torch.ops.robcomp.sparse24_linear`` (+ ``sparse24_linear_backward_input``): torch.library
   custom ops with fake implementations and a registered autograd formula, so that
   ``torch.compile(model, fullgraph=True)`` traces models with 2:4 layers.
4. ``sparse24_linear(x, values, meta, bias=None)``: the functional form used by
   :class:`robcomp.layers.linear.Sparse24Linear`.

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

from . import _skeleton as sk
from . import _specs
from . import reference as ref
from ._common import FLOAT_DTYPES, check_activation, rows
from ._ops import check_frozen, define_linear

__all__ = [
    "sparse24_pack",
    "sparse24_unpack",
    "sparse24_forward",
    "sparse24_backward_input",
    "sparse24_linear",
    "aot_specs",
    "perf_cases",
    "GEMV_MAX_M",
]

#: largest M served by the compressed-domain GEMV; larger M runs the tensor-core tiles
GEMV_MAX_M = sk.SMALL_M


def sparse24_pack(weight: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack ``weight [N, K]`` into ``(values [N, K/2], meta uint8 [N, ceil(K/8)])`` (see module doc).

    Keeps the two largest magnitudes of every group of 4 along K, or the entries of ``mask``.
    Raises ``ValueError`` for ``K % 4 != 0``, a mask that is not 2:4, or NaN/Inf weights.
    """
    return ref.sparse24_pack(weight, mask)


def sparse24_unpack(values: torch.Tensor, meta: torch.Tensor, in_features: int) -> torch.Tensor:
    """Exact inverse of :func:`sparse24_pack` (zeros at the pruned positions)."""
    return ref.sparse24_unpack(values, meta, in_features)


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
    x2 = rows(x, k)
    m = x2.shape[0]
    if m == 0 or n == 0:
        return y
    sk.run_forward(sk.S24.value, x2, values, meta, values, None, bias, n, k, None,
                   (values.stride(0), meta.stride(0), 1), out=y.view(m, n))
    return y


def sparse24_backward_input(dy: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, *,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """``dX = dY · unpack(values, meta)`` from the packed weight; ``dy [..., N]`` -> ``dx [..., K]``
    in ``dy``'s dtype."""
    n, k = _check_packed(values, meta)
    check_activation(dy, n, values.device, name="dy")
    lead = tuple(dy.shape[:-1])
    dx = _check_out(out, lead + (k,), dy.dtype, dy.device)
    dy2 = rows(dy, n)
    m = dy2.shape[0]
    if m == 0:
        return dx
    if n == 0:
        return dx.zero_()
    sk.run_backward_input(sk.S24.value, dy2, values, meta, values, None, n, k, None,
                          (values.stride(0), meta.stride(0), 1), out=dx.view(m, k))
    return dx


# ======================================================================== torch.library ops
_sparse24_linear_op = define_linear(
    "sparse24_linear", [("values", "Tensor"), ("meta", "Tensor")],
    lambda x, values, meta, bias: sparse24_forward(x, values, meta, bias),
    lambda dy, values, meta: sparse24_backward_input(dy, values, meta), "sparse24_linear_backward_input",
    lambda values, meta: values.shape[0], lambda values, meta: values.shape[1] * 2)


def sparse24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """Functional 2:4 linear: ``x [..., K]`` (fp16/bf16/fp32) -> ``[..., N]`` in ``x``'s dtype.

    Differentiable w.r.t. ``x`` and ``bias`` (Triton input-gradient kernel); traceable by
    ``torch.compile(fullgraph=True)`` through the ``robcomp::sparse24_linear`` custom op.
    Raises ``ValueError`` when ``values`` requires grad (packed weights are frozen).
    """
    _check_packed(values, meta)
    check_frozen("robcomp::sparse24_linear", values=values)
    return _sparse24_linear_op(x, values, meta, bias)


# ====================================================================== AOT specs + perf cases
def aot_specs(dtypes=_specs.DTYPES) -> list:
    """Every GEMV / GEMM / input-gradient variant the launchers run, for fp16/bf16/fp32 activations
    (values in the same dtype), as ``(name, jit_fn, signature, constexprs, options)`` for
    :mod:`robcomp.kernels._aot`, hinted as Triton specialises aligned shapes (K, N % 16 == 0)."""
    return _specs.skeleton_specs(sk.S24.value, dtypes)


def perf_cases(m: int, n: int, k: int, dtype=torch.float16, sm_count: int = 132) -> list[dict]:
    """Static-model records of ``sparse24_forward`` and ``sparse24_backward_input`` at ``x [m, k]``,
    ``W [n, k]`` (values in ``dtype``)."""
    e = torch.empty((), dtype=dtype).element_size()
    return _specs.skeleton_cases("sparse24", sk.S24.value, m, n, k, n * (k // 2) * e + n * ((k + 7) // 8),
                                 dtype, sm_count)
