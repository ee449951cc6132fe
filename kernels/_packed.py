"""Packed-register primitives: byte permute and half2 arithmetic on int32 containers.

Triton has no variable byte permute and no guaranteed packed fp16 arithmetic, so the fp16 GEMV of
2:4 + int4 holds two fp16 values in each int32 (low half = lane 0) and calls these helpers. On the
GPU each is one PTX instruction (``prmt.b32``, ``fma.rn.f16x2``, ``mul.rn.f16x2``: one SASS
PRMT / HFMA2 / HMUL2, sm_53 and newer); the interpreter cannot run inline assembly, so there each
is computed from its PTX definition on the same containers (fp16 lanes, one rounding: the fp64
result of fp16 operands is exact for a product and rounded once to fp16 for an FMA, up to a
double rounding in the sum, which the tests' fp16 tolerances cover).
"""
import triton
import triton.language as tl

from ._common import interpreting

#: inline assembly (GPU) or its emulation (interpreter); a module constant so it compiles away
ASM = tl.constexpr(not interpreting())


@triton.jit
def prmt(a, b, sel):
    """PTX ``prmt.b32`` (default mode): byte ``i`` of the result is byte ``sel[4i+2:4i]`` of the
    8 bytes ``{b, a}`` (``a`` = bytes 0-3), or that byte's sign replicated when ``sel`` bit
    ``4i+3`` is set; only ``sel``'s low 16 bits count."""
    if ASM:
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, sel],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        out = tl.zeros_like(a | b | sel)
        for i in tl.static_range(4):
            s = (sel >> (4 * i)) & 0xF
            idx = s & 7
            byte = (tl.where(idx < 4, a, b) >> (8 * (idx & 3))) & 0xFF
            byte = tl.where(s >= 8, tl.where(byte >= 0x80, 0xFF, 0), byte)
            out = out | (byte << (8 * i))
        return out


@triton.jit
def _lanes(h):
    """fp16 lanes (low, high) of int32 containers."""
    return h.to(tl.int16).to(tl.float16, bitcast=True), (h >> 16).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _pack(lo, hi):
    lo16 = lo.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return lo16 | (hi.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) << 16)


@triton.jit
def hfma2(a, b, c):
    """``a * b + c`` per fp16 lane, one rounding (PTX ``fma.rn.f16x2``)."""
    if ASM:
        return tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        a0, a1 = _lanes(a)
        b0, b1 = _lanes(b)
        c0, c1 = _lanes(c)
        r0 = a0.to(tl.float64) * b0.to(tl.float64) + c0.to(tl.float64)
        r1 = a1.to(tl.float64) * b1.to(tl.float64) + c1.to(tl.float64)
        return _pack(r0, r1)


@triton.jit
def hmul2(a, b):
    """``a * b`` per fp16 lane, rounded once (PTX ``mul.rn.f16x2``)."""
    if ASM:
        return tl.inline_asm_elementwise("mul.rn.f16x2 $0, $1, $2;", "=r,r,r", [a, b],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        a0, a1 = _lanes(a)
        b0, b1 = _lanes(b)
        return _pack(a0.to(tl.float64) * b0.to(tl.float64), a1.to(tl.float64) * b1.to(tl.float64))


@triton.jit
def lane_sum(h):
    """Sum of the two fp16 lanes of int32 containers, in fp32 (exact)."""
    if ASM:
        return tl.inline_asm_elementwise(
            "{.reg .f16 l, h; .reg .f32 a, b; mov.b32 {l, h}, $1; cvt.f32.f16 a, l; cvt.f32.f16 b, h; "
            "add.f32 $0, a, b;}", "=r,r", [h], dtype=tl.float32, is_pure=True, pack=1)
    else:
        lo, hi = _lanes(h)
        return lo.to(tl.float32) + hi.to(tl.float32)


@triton.jit
def half2_of(lo, hi):
    """int32 containers of fp16 ``(lo, hi)`` (values rounded to fp16)."""
    return _pack(lo, hi)
