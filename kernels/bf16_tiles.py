"""The ``bf16_tiles`` CPU path: the packed weight decoded tile by tile into bf16 and multiplied by
oneDNN's bf16 GEMM, so the dense weight never exists in full: a tile (1-2 MB forward, 4 MB for
the input gradient, 8 MB float32) is read back from L2 or L3 right after it is written.

On CPUs with bf16 dot products (AVX512-BF16, AMX) a bf16 GEMM runs ~3x faster than the float32
one, and a tile of ``TILE_BYTES`` decoded by numba is still in L2 when the GEMM reads it: memory
traffic is the packed bytes, compute is the bf16 GEMM plus a vectorised decode (~1 ms per 16 M
weights on one core). Which path wins is measured per shape by ``robcomp.tune``; on CPUs without
fast bf16 this path loses and is not picked.

Precision (the weight-only formats' CPU convention, ``kernels/cpu.py``): activations and dY are
rounded to bf16, products accumulate in float32, each tile's output is rounded to bf16.

* int8 and fp8 codes are exact in bf16 (8 significant bits); their per-channel (and fp8's
  per-token) scales are applied to the float32 output, so the only roundings are the
  activations' and the output's;
* int4, 2:4 and 2:4+int4 tiles hold the dequantised value ``(q - z) * s`` (or the kept 2:4
  value) rounded to nearest even bf16, expanded with zeros for the 2:4 formats.

The input gradient ``dX = dY W`` walks the same row tiles, ``dX += dY[:, tile] @ W[tile]``, in
float32 across tiles.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from robcomp.kernels import cpu as CPU
from robcomp.kernels import numba_tiles as NT
from robcomp.kernels import reference as ref

__all__ = ["TILE_BYTES", "tile_rows", "fast_bf16", "fp8_has_nan", "int8_weight_linear", "int4_linear", "fp8_dynamic_linear",
           "sparse24_linear", "sparse24_int4_linear", "int8_input_grad", "int4_input_grad",
           "sparse24_input_grad_f32"]

#: bytes of one decoded bf16 tile: about half of a Zen 4 / Sapphire Rapids core's L2
TILE_BYTES = 1 << 20
#: bytes of one forward tile for 8 to 63 rows of x: 2 MB tiles (half as many GEMM calls, each
#: longer) measured 5-15% faster than 1 MB ones there at 4096x4096, 1 MB ones faster at M = 64
MID_M_TILE_BYTES = 2 << 20
#: bytes of one tile of an input gradient ``dY @ W``, bf16 and float32 (the 2:4 gradient): the
#: tiles split the GEMM's reduction over N, and every tile adds its partial product into the
#: float32 dX, so taller tiles (in L3) pay off: 4 MB bf16 tiles measured 1.2x faster than 1 MB
#: ones at M = 16..256, 4096x4096; 1 MB float32 ones 1.4x slower than 8 MB at M = 256
DX_TILE_BYTES = 4 << 20
F32_DX_TILE_BYTES = 8 << 20

def _probe_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


_FAST_BF16 = _probe_bf16()  # probed once: torch.compile cannot trace the probe, it reads this bool


def fast_bf16() -> bool:
    """Whether oneDNN runs bf16 GEMMs natively here (AVX512-BF16 / AMX): where it does not, the
    layers do not take this path by default (``robcomp.tune`` still measures it)."""
    return _FAST_BF16


def fp8_has_nan(codes: torch.Tensor) -> bool:
    """Whether e4m3 ``codes`` (uint8 bits) hold a NaN (0x7F / 0xFF), which the fast decoders do not map."""
    return bool(((codes & 0x7F) == 0x7F).any())


def tile_rows(n: int, k: int, tile_bytes: int | None = None) -> int:
    """Rows of W per decoded tile: ``tile_bytes`` (default :data:`TILE_BYTES`) of bf16, a
    multiple of 16, at most ``n``."""
    return min(n, max(16, ((tile_bytes or TILE_BYTES) // (2 * k)) // 16 * 16))


#: per decoder kind: (view of the tile buffer the decoder writes, tile dtype, tile bytes or None)
_KINDS = {"int8": (np.uint16, torch.bfloat16), "fp8": (np.uint16, torch.bfloat16), "int4": (np.uint32, torch.bfloat16),
          "sp24": (np.uint64, torch.bfloat16), "s24i4": (np.uint64, torch.bfloat16),
          "sp24_f32": (np.uint64, torch.float32)}


def _tile_bytes(dtype: torch.dtype, transpose: bool, m: int) -> int:
    """Bytes of one decoded tile for ``m`` rows of x (or of dY with ``transpose``)."""
    if dtype == torch.float32:
        return F32_DX_TILE_BYTES
    if transpose:
        return DX_TILE_BYTES
    return MID_M_TILE_BYTES if 8 <= m < 64 else TILE_BYTES


class _Tiles:
    """Decodes rows ``[r0, r1)`` of one packed weight (numpy arrays, then the int parameter where
    the kind has one) into a reused tile buffer."""

    def __init__(self, kind: str, n: int, k: int, weights: tuple, transpose: bool = False, m: int = 1):
        view, dtype = _KINDS[kind]
        self.kind, self.n, self.k, self.weights = kind, n, k, weights
        bits = np.uint16 if dtype == torch.bfloat16 else np.uint32
        tile_bytes = _tile_bytes(dtype, transpose, m)
        self.rows = tile_rows(n, k * np.dtype(bits).itemsize // 2, tile_bytes)
        self.buf = np.empty((self.rows, k), bits)
        self.out = self.buf.view(view)
        self.tile = torch.from_numpy(self.buf).view(dtype)
        self.fn = NT.decoder(kind, CPU._parallel())

    def __iter__(self):
        for r0 in range(0, self.n, self.rows):
            r1 = min(self.n, r0 + self.rows)
            self.fn(*self.weights, r0, r1, self.out)
            yield r0, r1, self.tile[: r1 - r0]


def _tiles_mm_impl(a: torch.Tensor, kind: str, weights: list[torch.Tensor], extra: int, n: int, k: int,
                   transpose: bool) -> torch.Tensor:
    """``a @ W.T`` (``a [M, K]``) or, with ``transpose``, ``a @ W`` (``a [M, N]``), float32 out."""
    arrays = [CPU._np(w) for w in weights]
    if kind == "sp24_f32":
        arrays[0] = arrays[0].view(np.uint32)  # the float32 kept values as bits
    tiles = _Tiles(kind, n, k, tuple(arrays) + ((extra,) if extra >= 0 else ()), transpose, a.shape[0])
    if not transpose:
        xb = a.to(torch.bfloat16).contiguous()
        return torch.cat([torch.mm(xb, tile.t()) for _, _, tile in tiles], dim=1).to(torch.float32)
    ab = a.to(tiles.tile.dtype)
    out = torch.zeros(a.shape[0], k, dtype=torch.float32)
    for r0, r1, tile in tiles:
        if tile.dtype == torch.float32:
            out.addmm_(ab[:, r0:r1], tile)
        else:
            out += torch.mm(ab[:, r0:r1], tile)  # a bf16 partial product, summed in float32
    return out


# a torch.library op, so that torch.compile traces this path (fake: the output's shape)
_tiles_mm_op = torch.library.custom_op("robcomp::cpu_bf16_tiles_mm", mutates_args=())(_tiles_mm_impl)
_tiles_mm_op.register_fake(lambda a, kind, weights, extra, n, k, transpose:
                           a.new_empty((a.shape[0], k if transpose else n), dtype=torch.float32))


def _mm(a, kind, weights, extra, n, k, transpose=False):
    fn = _tiles_mm_op if torch.compiler.is_compiling() else _tiles_mm_impl
    return fn(a, kind, list(weights), extra, n, k, transpose)


def _run(x, bias, kind, weights, extra, n, k, out_scale=None, grad_scale=None):
    """``y = (x W.T) * out_scale + bias`` with ``dX = (dY * grad_scale) W`` (``W`` as decoded)."""
    CPU._check(x, k)

    def fwd(x2):
        y = _mm(x2, kind, weights, extra, n, k)
        return y if out_scale is None else y * out_scale

    def bwd(g2):
        return _mm(g2 if grad_scale is None else g2 * grad_scale, kind, weights, extra, n, k, transpose=True)
    return CPU._Linear.apply(x, bias, fwd, bwd, n)


def int8_input_grad(g2, qweight):
    """``g2 @ q`` (int8 codes; the caller folds the per-channel scale into ``g2``) in bf16 tiles."""
    return _mm(g2, "int8", (qweight,), -1, *qweight.shape, transpose=True)


def int4_input_grad(g2, qweight, scales, zeros, group_size):
    """``g2 @ ((q - z) * s)`` in bf16 tiles."""
    return _mm(g2, "int4", (qweight, scales.float(), zeros.float()), group_size, qweight.shape[0],
               qweight.shape[1] * 2, transpose=True)


def sparse24_input_grad_f32(g2, values, meta):
    """``g2 @ W`` of a 2:4 weight in exact float32 tiles (BLAS per tile): the 2:4 dX at large M,
    where it beats the blocked numba kernel, without leaving float32."""
    return _mm(g2, "sp24_f32", (values.float(), meta), -1, values.shape[0], values.shape[1] * 2, transpose=True)


def int8_weight_linear(x, qweight, scale, bias):
    """W8A16: exact int8 codes in bf16 tiles, per-channel scale on the float32 output."""
    s = scale.float()
    return _run(x, bias, "int8", (qweight,), -1, *qweight.shape, out_scale=s, grad_scale=s)


def fp8_dynamic_linear(x, qweight, scale, bias):
    """FP8: per-token e4m3 activations (reference rounding, exact in bf16), exact e4m3 weight
    tiles, both scales on the float32 output; straight-through dX ``(dY * s) W``."""
    n, k = qweight.shape
    s = scale.float()
    codes = qweight.view(torch.uint8)
    CPU._check(x, k)

    def fwd(x2):
        xq, xs = ref.quantize_rows_fp8(x2)
        return _mm(xq.to(torch.bfloat16), "fp8", (codes,), -1, n, k) * xs[:, None] * s[None, :]

    def bwd(g2):
        return _mm(g2 * s, "fp8", (codes,), -1, n, k, transpose=True)
    return CPU._Linear.apply(x, bias, fwd, bwd, n)


def int4_linear(x, qweight, scales, zeros, group_size, bias):
    """W4A16: ``(q - z) * s`` tiles rounded to bf16."""
    return _run(x, bias, "int4", (qweight, scales.float(), zeros.float()), group_size, qweight.shape[0],
                qweight.shape[1] * 2)


def sparse24_linear(x, values, meta, bias):
    """2:4: kept values rounded to bf16, expanded with zeros."""
    return _run(x, bias, "sp24", (values.float(), meta), -1, values.shape[0], values.shape[1] * 2)


def sparse24_int4_linear(x, qvalues, scales, zeros, meta, group_size, bias):
    """2:4 + int4: ``(q - z) * s`` kept values rounded to bf16, expanded with zeros."""
    return _run(x, bias, "s24i4", (qvalues, scales.float(), zeros.float(), meta), group_size // 2,
                qvalues.shape[0], qvalues.shape[1] * 4)
