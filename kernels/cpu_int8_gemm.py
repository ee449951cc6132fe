"""Int8 dynamic's exact u8 x s8 GEMMs from PyTorch's x86 quantized engines: oneDNN and fbgemm.

Both multiply the reference's per-token int8 codes, shifted by 128 into uint8 (zero point 128),
with the stored int8 codes (zero point 0) and sum in int32, then scale by the per-channel weight
scale in float32: ``(xu - 128) @ codes.T * w_scale``; robcomp multiplies by the per-token scale
after. Each needs its own prepacked copy of the codes, built once per layer and counted in its
bytes. Where the CPU has VNNI dot products the sums are exact; older AVX2 CPUs sum byte pairs in
int16 with saturation, so each engine is offered only where a worst-case product (codes of +-127
against +-127) comes out exact (:func:`onednn_int8`, :func:`fbgemm_int8`).

Which is faster depends on M and the weight (bench/RESULTS.md, "fbgemm for int8 dynamic"):
fbgemm's GEMV-like kernel wins at few rows, oneDNN's blocked GEMM from a few dozen rows.
"""
from __future__ import annotations

import contextlib
import functools
import warnings

import torch

from robcomp.kernels import cpu

__all__ = ["onednn_int8", "derived_int8_onednn", "onednn_parts", "int8_dynamic_linear_onednn",
           "fbgemm_int8", "derived_int8_fbgemm", "fbgemm_parts", "int8_dynamic_linear_fbgemm"]


def _worst_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes +-127 against uint8 rows of 255 and 1 (codes +127 and -127): the products whose
    byte-pair sums overflow int16, with the exact result."""
    n, k = 16, 64
    w = torch.full((n, k), 127, dtype=torch.int8)
    w[1::2] = -127
    xu = torch.full((2, k), 255, dtype=torch.uint8)
    xu[1] = 1
    want = (xu.to(torch.int64) - 128) @ w.to(torch.int64).t()
    return w, xu, want.to(torch.float32)


def _probe(build, mm) -> bool:
    w, xu, want = _worst_case()
    try:
        got = mm(xu, build(w, torch.ones(w.shape[0])), torch.ones(w.shape[0]))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return torch.equal(got, want)


def _dynamic_linear(x, qweight, scale, bias, parts):
    """W8A8 as ``cpu.int8_dynamic_linear`` (the reference's per-token codes, exact int32 dot,
    float32 rescale, STE dX) with ``parts = (quantize, mm)``: ``codes, xs = quantize(x2)``, then
    ``mm(codes) * xs``."""
    cpu._check(x, qweight.shape[1])
    s32 = scale.float().contiguous()
    quantize, mm = parts

    def fwd(x2):
        codes, xs = quantize(x2)
        return mm(codes) * xs[:, None]

    return cpu._Linear.apply(x, bias, fwd, cpu._int8_grad(qweight, s32), qweight.shape[0])


# ---------------------------------------------------------------------------------- oneDNN
@functools.lru_cache(maxsize=None)
def onednn_int8() -> bool:
    """Whether oneDNN's u8 x s8 GEMM runs here and sums exactly in int32."""
    return _probe(lambda w, s: derived_int8_onednn(w), _onednn_mm)


def derived_int8_onednn(qweight) -> dict[str, torch.Tensor]:
    """oneDNN's prepacked (blocked) copy of the int8 codes, and its per-channel zero points (0)."""
    return {"weight": torch.ops.onednn.qlinear_prepack(qweight.contiguous(), None),
            "zero_points": torch.zeros(qweight.shape[0], dtype=torch.int64)}


def _onednn_mm_op(xu: torch.Tensor, weight: torch.Tensor, s32: torch.Tensor, zero_points: torch.Tensor) -> torch.Tensor:
    return torch.ops.onednn.qlinear_pointwise(xu, 1.0, 128, weight, s32, zero_points, None,
                                              1.0, 0, torch.float32, "none", [], "")


# an op of robcomp's own: inductor lowers onednn.qlinear_pointwise only on frozen constant weights
_onednn_mm_lib = cpu._op("onednn_int8_mm", _onednn_mm_op,
                         lambda xu, w, s32, zp: xu.new_empty((xu.shape[0], s32.shape[0]), dtype=torch.float32))


def _onednn_mm(xu, d, s32):
    """``(xu - 128) @ codes.T * s32`` in float32: int32 sums (exact), one rounding per scale."""
    return _onednn_mm_lib(xu, d["weight"], s32, d["zero_points"])


def onednn_parts(d, scale):
    """``(quantize, mm)``: the uint8 codes (+128) and oneDNN's product ``(xu - 128) @ codes.T * scale``."""
    s32 = scale.float().contiguous()
    return cpu.quantize_uint8_rows, lambda xu: _onednn_mm(xu, d, s32)


def int8_dynamic_linear_onednn(x, qweight, scale, bias, d):
    """Int8 dynamic through oneDNN's u8 x s8 GEMM on the prepacked copy ``d``
    (:func:`derived_int8_onednn`)."""
    return _dynamic_linear(x, qweight, scale, bias, onednn_parts(d, scale))


# ---------------------------------------------------------------------------------- fbgemm
@contextlib.contextmanager
def _engine(name: str):
    # prepacking dispatches on the process-wide engine; restore the user's choice at once
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


@functools.lru_cache(maxsize=None)
def fbgemm_int8() -> bool:
    """Whether fbgemm's u8 x s8 GEMM runs here and sums exactly in int32."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    return _probe(derived_int8_fbgemm, lambda xu, d, s32: _fbgemm_mm(xu.float() - 128.0, d))


def derived_int8_fbgemm(qweight, scale) -> dict:
    """fbgemm's packed params of the int8 codes with the per-channel scales (float32 values, kept
    exactly), for ``quantized::linear_with_input_q_dq_qweight_dq_output_fp32``. ``weight`` is the
    quantized copy of the codes fbgemm keeps beside its packed matrix; ``opaque_bytes`` counts that
    packed matrix (K x N bytes) and its per-channel offsets, scales and zero points, which live in
    an opaque object (``CompressedLinear.derived_bytes``)."""
    n, k = qweight.shape
    with torch.no_grad(), _engine("fbgemm"), warnings.catch_warnings():
        # PyTorch deprecates quantized tensors; fbgemm's packed params still take one
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions", category=UserWarning)
        wq = torch._make_per_channel_quantized_tensor(
            qweight.detach().contiguous(), scale.detach().float().double(), torch.zeros(n, dtype=torch.int64), 0)
        packed = torch.ops.quantized.linear_prepack(wq, None)
    return {"packed": packed, "weight": wq, "opaque_bytes": n * k + 12 * n}


def _fbgemm_mm(codes, d):
    """``codes @ weight_codes.T * w_scale`` in float32 on the int8 codes held as float32 values
    (the op quantises its float input with scale 1 and zero point 128: exact on integers, into
    the uint8 codes of oneDNN's path); the weight scales are baked into ``d``."""
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(codes, 1.0, 128, d["packed"])


def fbgemm_parts(d):
    """``(quantize, mm)``: the int8 codes as float32 and fbgemm's product (scales in ``d``)."""
    return cpu.quantize_int8_rows_f32, lambda codes: _fbgemm_mm(codes, d)


def int8_dynamic_linear_fbgemm(x, qweight, scale, bias, d):
    """Int8 dynamic through fbgemm's u8 x s8 GEMM on the packed params ``d``
    (:func:`derived_int8_fbgemm`, built from the same ``scale``)."""
    return _dynamic_linear(x, qweight, scale, bias, fbgemm_parts(d))
