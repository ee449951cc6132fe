"""Peer implementations the GPU suite times beside robcomp's kernels, built from plain torch (so
each is what a user of that peer pays, quantisation of the activations included):

* ``semi_structured``: ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt/CUTLASS), peer of 2:4;
* ``int8pack_mm``: ``torch._weight_int8pack_mm``, W8A16 per-channel, peer of int8 weight-only;
* ``tinygemm_int4``: torchao's tinygemm, ``torch._convert_weight_to_int4pack(w_uint8 [N, K/2],
  inner_k_tiles)`` + ``torch._weight_int4pack_mm(x, w, group_size, scales_and_zeros)``
  (``[K/group, N, 2]`` scales and zeros, dequant ``(q - 8) * s + z``; the ``_for_cpu`` variants,
  which take the unpacked int32 codes, on CPU), peer of int4 g128;
* ``int_mm``: per-token int8 activations + ``torch._int_mm`` (cuBLASLt) + rescale, peer of W8A8.
  ``_int_mm`` needs more than 16 rows on CUDA: at M <= 16 the activations are padded to 17 rows
  inside the timed call (a user pays that too);
* ``scaled_mm_fp8``: per-token e4m3 activations + row-wise ``torch._scaled_mm``, rows padded to a
  multiple of 16; ``out_dtype`` falls back to bf16 where the activation dtype is refused;
* ``bnb_int8`` / ``bnb_nf4``: bitsandbytes where installed.

Each baseline is checked once on random input against the float64 product (SQNR bound) before it
is timed; a baseline that cannot be built is reported with its reason, never fatal.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import harness as H

INT_MM_MIN_ROWS = 17
SCALED_MM_ROW_MULTIPLE = 16
TINYGEMM_INNER_K_TILES = 8


@dataclass
class Baseline:
    name: str
    peer_of: str              # the robcomp format it is compared with
    run: Callable             # x [M, K] -> y [M, N]
    weight_bytes: int
    sqnr_min: float           # dB against x @ w.T in float64
    compute_dtype: str = ""
    note: str = ""


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t if t.shape[0] >= rows else F.pad(t, (0, 0, 0, rows - t.shape[0]))


def semi_structured(w, dtype, device):
    from torch.sparse import to_sparse_semi_structured
    from robcomp.kernels import reference as R
    w24 = w * R.sparse24_mask(w)
    ws = to_sparse_semi_structured(w24)
    return Baseline("semi_structured", "sparse24", lambda x: F.linear(x, ws), w24.numel() * w24.element_size() // 2
                    + w24.numel() // 8, 40.0, note="exact 2:4 product of the masked weight; weight bytes = values + 2 bits/value metadata")


def int8pack_mm(w, dtype, device):
    s = w.float().abs().amax(1).clamp_min(1e-12) / 127
    q = (w.float() / s[:, None]).round().clamp(-127, 127).to(torch.int8)
    sc = s.to(dtype)
    return Baseline("int8pack_mm", "int8_weight", lambda x: torch._weight_int8pack_mm(x, q, sc), H.nbytes(q, sc), 35.0)


def tinygemm_int4(w, dtype, device, group: int = 128):
    n, k = w.shape
    wg = w.float().reshape(-1, group)
    lo, hi = wg.amin(1, keepdim=True), wg.amax(1, keepdim=True)
    s = (hi - lo).clamp(min=1e-6) / 15
    z = lo + s * 8
    q = ((wg - lo) / s).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    sz = torch.cat([s.reshape(n, -1, 1), z.reshape(n, -1, 1)], 2).transpose(0, 1).contiguous()
    note = ""
    if device.type == "cuda":
        packed = torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), TINYGEMM_INNER_K_TILES)
        mm = torch._weight_int4pack_mm
    else:
        packed = torch._convert_weight_to_int4pack_for_cpu(q, TINYGEMM_INNER_K_TILES)
        mm = torch._weight_int4pack_mm_for_cpu
    act = dtype
    try:  # tinygemm's CUDA kernel has taken bf16 only in some versions: then it runs on bf16 activations
        mm(torch.randn(1, k, device=device, dtype=dtype), packed, group, sz.to(dtype))
    except RuntimeError:
        act, note = torch.bfloat16, "bf16 activations (this torch's tinygemm refused the activation dtype)"
    szd = sz.to(act)

    def run(x):
        return mm(x if x.dtype == act else x.to(act), packed, group, szd)
    return Baseline("tinygemm_int4", "int4_g128", run, H.nbytes(packed, szd), 17.0, note=note)


def int_mm(w, dtype, device):
    s = w.float().abs().amax(1).clamp_min(1e-12) / 127
    qt = (w.float() / s[:, None]).round().clamp(-127, 127).to(torch.int8).t()

    def run(x):
        m = x.shape[0]
        xf = _pad_rows(x.float(), INT_MM_MIN_ROWS)  # padded before quantising: zero rows stay zero
        xs = xf.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
        xq = (xf / xs).round().clamp(-127, 127).to(torch.int8)
        acc = torch._int_mm(xq, qt)[:m]
        return (acc.float() * xs[:m] * s[None, :]).to(dtype)
    return Baseline("int_mm", "int8_dynamic", run, H.nbytes(qt, s), 30.0, compute_dtype="int8",
                    note=f"rows padded to {INT_MM_MIN_ROWS} at M <= 16 (_int_mm needs M > 16 on CUDA)")


def scaled_mm_fp8(w, dtype, device):
    f8 = torch.float8_e4m3fn
    fmax = torch.finfo(f8).max
    sw = (w.float().abs().amax(1, keepdim=True).clamp_min(1e-12) / fmax)
    qt = (w.float() / sw).to(f8).t()
    sb = sw.reshape(1, -1).contiguous()

    def quantize(x):  # rows padded in float before the cast (no padding op on an fp8 tensor)
        m = x.shape[0]
        xf = _pad_rows(x.float(), -(-m // SCALED_MM_ROW_MULTIPLE) * SCALED_MM_ROW_MULTIPLE)
        xs = xf.abs().amax(1, keepdim=True).clamp_min(1e-12) / fmax
        return (xf / xs).to(f8), xs, m

    out_dtype, note = dtype, f"rows padded to a multiple of {SCALED_MM_ROW_MULTIPLE}"
    xq, xs, _ = quantize(torch.randn(1, w.shape[1], device=device, dtype=dtype))
    try:
        torch._scaled_mm(xq, qt, scale_a=xs, scale_b=sb, out_dtype=dtype)
    except RuntimeError:
        out_dtype, note = torch.bfloat16, note + "; bf16 output (row-wise scaling refused the activation dtype)"

    def run(x):
        xq, xs, m = quantize(x)
        y = torch._scaled_mm(xq, qt, scale_a=xs, scale_b=sb, out_dtype=out_dtype)[:m]
        return y if y.dtype == dtype else y.to(dtype)
    return Baseline("scaled_mm_fp8", "fp8_dynamic", run, H.nbytes(qt, sb), 15.0, compute_dtype="float8", note=note)


def bitsandbytes_int8(w, dtype, device):
    import bitsandbytes as bnb
    n, k = w.shape
    mod = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=0.0)
    mod.weight = bnb.nn.Int8Params(w.half().cpu(), requires_grad=False, has_fp16_weights=False)
    mod = mod.to(device)
    return Baseline("bnb_int8", "int8_weight", mod, k * n + 4 * n, 30.0)


def bitsandbytes_nf4(w, dtype, device):
    import bitsandbytes as bnb
    n, k = w.shape
    mod = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, quant_type="nf4")
    mod.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type="nf4")
    mod = mod.to(device)
    return Baseline("bnb_nf4", "int4_g128", mod, k * n // 2 + 4 * (k * n // 64), 15.0)


BUILDERS = {"semi_structured": semi_structured, "int8pack_mm": int8pack_mm, "tinygemm_int4": tinygemm_int4,
            "int_mm": int_mm, "scaled_mm_fp8": scaled_mm_fp8}
BNB_BUILDERS = {"bnb_int8": bitsandbytes_int8, "bnb_nf4": bitsandbytes_nf4}


def build(w: torch.Tensor, dtype: torch.dtype, *, with_bitsandbytes: bool = False,
          builders: dict | None = None) -> tuple[list[Baseline], dict]:
    """The baselines that build and pass their check for weight ``w`` [N, K], and a status per name
    (``{"status": "ok", "sqnr_db": ...}``, ``{"status": "check failed", ...}`` (still timed) or
    ``{"status": "unavailable", "reason": ...}``)."""
    device = w.device
    todo = dict(builders if builders is not None else BUILDERS)
    if with_bitsandbytes and builders is None:
        todo.update(BNB_BUILDERS)
    out, status = [], {}
    probe = H.randn(3, w.shape[1], dtype=dtype, device=device)
    exact = probe.double() @ w.double().T
    for name, make in todo.items():
        try:
            b = make(w, dtype, device)
            with torch.no_grad():
                y = b.run(probe)
            sq = H.sqnr_db(y, exact if b.peer_of != "sparse24" else probe.double() @ _masked(w).double().T)
        except Exception as e:
            status[name] = {"status": "unavailable", "reason": f"{type(e).__name__}: {e}"[:300]}
            continue
        ok = bool(torch.isfinite(y).all()) and sq > b.sqnr_min
        status[name] = {"status": "ok" if ok else "check failed", "sqnr_db": round(sq, 2), "sqnr_min": b.sqnr_min,
                        "peer_of": b.peer_of, "note": b.note}
        out.append(b)
    return out, status


def _masked(w):
    from robcomp.kernels import reference as R
    return w * R.sparse24_mask(w)
