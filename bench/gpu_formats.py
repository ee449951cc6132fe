"""The compressed formats the GPU suite measures, and its correctness check of each.

A :class:`Format` names how to pack a weight, the raw kernel launchers (forward, input gradient),
the autograd functional form, the recipe that builds the dispatched layer, and how to check it
against ``kernels/reference.py`` in float64. The check runs on fresh random inputs with outputs
poisoned (NaN), with the per-dtype bounds of the kernel tests (bench/harness.TOL).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

import harness as H

GROUP = 128  # int4 group size along K


@dataclass
class Format:
    name: str
    pack: Callable            # w [N, K] (dtype) -> tuple of packed tensors (+ group size)
    forward: Callable         # (x, *packed) -> y            raw forward launcher
    linear: Callable          # (x, *packed, bias) -> y      autograd functional form
    backward: Callable        # (dy, *packed) -> dx          raw input-gradient launcher
    dequant: Callable         # packed -> dense float64 [N, K]
    recipe: Callable          # () -> the robcomp recipe whose layer is the dispatched path
    sqnr_min: float           # dB against the original (2:4-masked) weight, as in the tests
    sparse: bool = False
    grad_kernel: str = ""     # input-gradient kernel's name when several formats share it
    compute_dtype: str = ""   # the tensor-core rate that applies ("int8", "float8"); default activations'
    expected: Callable | None = None  # (x, packed, bias, deq) -> float64 y; default x @ deq.T + b

    def incompatible(self, k: int) -> str | None:
        if "int4" in self.name and k % GROUP:
            return f"group_size {GROUP} does not divide K={k}"
        return None

    def weight_bytes(self, packed) -> int:
        return H.nbytes(*[t for t in packed if isinstance(t, torch.Tensor)])


def formats(device: torch.device) -> list[Format]:
    import robcomp as rc
    from robcomp.kernels import lowbit as L
    from robcomp.kernels import reference as R
    from robcomp.kernels import sparse24 as S
    from robcomp.kernels import sparse24_lowbit as SL

    def fp8_expected(x, packed, bias, deq):  # exact GEMM of the kernel's own e4m3 activations
        q, s = packed
        xq, xs = L.quantize_rows(x.reshape(-1, x.shape[-1]).contiguous(), fp8=True)
        y = (xq.double() @ q.double().T) * xs.double()[:, None] * s.double()[None, :]
        return y + bias.double()

    fmts = [
        Format("sparse24", R.sparse24_pack, S.sparse24_forward, S.sparse24_linear, S.sparse24_backward_input,
               lambda p: R.sparse24_unpack(p[0], p[1], p[0].shape[1] * 2).double(), rc.Sparse24, 40.0, sparse=True),
        Format("int8_weight", R.int8_weight_pack, L.int8_weight_forward, L.int8_weight_linear,
               L.per_channel_backward_input, lambda p: R.int8_weight_unpack(*p, torch.float64), rc.Int8WeightOnly,
               35.0, grad_kernel="per_channel_int8"),
        Format("int4_g128", lambda w: (*R.int4_pack(w, GROUP), GROUP), L.int4_forward, L.int4_linear,
               L.int4_backward_input, lambda p: R.int4_unpack(*p, torch.float64),
               lambda: rc.Int4WeightOnly(group_size=GROUP), 17.0),
        Format("sparse24_int4_g128", lambda w: (*R.sparse24_int4_pack(w, GROUP), GROUP), SL.sparse24_int4_forward,
               SL.sparse24_int4_linear, SL.sparse24_int4_backward_input,
               lambda p: R.sparse24_int4_unpack(*p, torch.float64), lambda: rc.Sparse24Int4(group_size=GROUP),
               17.0, sparse=True),
        Format("int8_dynamic", R.int8_dynamic_pack, L.int8_dynamic_forward, L.int8_dynamic_linear,
               L.per_channel_backward_input, lambda p: R.int8_dynamic_unpack(*p, torch.float64), rc.Int8Dynamic,
               30.0, grad_kernel="per_channel_int8", compute_dtype="int8",
               expected=lambda x, p, b, deq: R.int8_dynamic_linear(x, *p, b).double()),
        Format("fp8_dynamic", R.fp8_dynamic_pack, L.fp8_dynamic_forward, L.fp8_dynamic_linear,
               L.per_channel_backward_input, lambda p: R.fp8_dynamic_unpack(*p, torch.float64), rc.FP8Dynamic,
               15.0, compute_dtype="float8", expected=fp8_expected),
    ]
    if device.type == "cpu":
        L._FP8_INTERPRETER_OK = True  # the kernels' own interpreter hook (the public path refuses CPU)
    elif not L.fp8_supported(device):
        fmts = [f for f in fmts if f.name != "fp8_dynamic"]
    return fmts


def dispatched_layer(fmt: Format, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.nn.Module:
    """The layer a user gets: ``rc.compress`` of a Linear holding ``w`` with the format's recipe and
    the default backend (``"auto"``), as the only module of a Sequential (so it is no classifier head)."""
    import robcomp as rc
    n, k = w.shape
    lin = torch.nn.Linear(k, n, bias=bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias)
    model = rc.compress(torch.nn.Sequential(lin), fmt.recipe(), filter_fn=lambda module, name: True)
    return model.eval()


def check(fmt: Format, k: int, n: int, m: int, dtype: torch.dtype, device, *, tune=None, path_taken=None) -> list[dict]:
    """Forward and input gradient of the functional form (the custom op) vs the reference, and the
    dispatched layer's forward (``tune(model, (x,))`` first) vs the exact product, on fresh random
    inputs. A crash is a failed check, not a crashed suite."""
    from robcomp.kernels import reference as R
    dt = str(dtype).replace("torch.", "")
    base = {"format": fmt.name, "dtype": dt, "M": m, "K": k, "N": n}
    tol = H.TOL[dtype]
    w = torch.randn(n, k, device=device).to(dtype)  # the weight as the model holds it
    x = H.randn(m, k, dtype=dtype, device=device).requires_grad_()
    b = H.randn(n, dtype=dtype, device=device)
    gy = H.randn(m, n, dtype=dtype, device=device)
    w_true = w * R.sparse24_mask(w) if fmt.sparse else w
    exact = x.detach().double() @ w_true.double().T + b.double()
    rows = []
    try:
        packed = fmt.pack(w)
        with H.poisoned_empty():
            y = fmt.linear(x, *packed, b)
            y.backward(gy)
        xd = x.detach()
        deq = fmt.dequant(packed)
        expected = fmt.expected(xd, packed, b, deq) if fmt.expected else xd.double() @ deq.T + b.double()
        fwd_err, sqnr = H.rel_err(y, expected), H.sqnr_db(y, exact)
        grad_err = H.rel_err(x.grad, gy.double() @ deq)
        rows += [dict(base, direction="forward", rel_err=fwd_err, tol=tol, sqnr_db=round(sqnr, 2),
                      sqnr_min=fmt.sqnr_min, passed=bool(torch.isfinite(y).all()) and fwd_err < tol and sqnr > fmt.sqnr_min),
                 dict(base, direction="input_grad", rel_err=grad_err, tol=4 * tol,
                      passed=bool(torch.isfinite(x.grad).all()) and grad_err < 4 * tol)]
    except Exception as e:
        rows += [dict(base, direction=d, passed=False, error=f"{type(e).__name__}: {e}"[:300])
                 for d in ("forward", "input_grad")]
    try:  # the dispatched layer: whatever path it takes must compute the format's function
        model = dispatched_layer(fmt, w, b)
        status = tune(model, (x.detach(),)) if tune else "not tuned"
        with torch.no_grad(), H.poisoned_empty():
            yl = model(x.detach())
        sq = H.sqnr_db(yl, exact)
        rows.append(dict(base, direction="layer_forward", sqnr_db=round(sq, 2), sqnr_min=fmt.sqnr_min, tune=status,
                         path=path_taken(model[0]) if path_taken else None,
                         passed=bool(torch.isfinite(yl).all()) and sq > fmt.sqnr_min))
    except Exception as e:
        rows.append(dict(base, direction="layer_forward", passed=False, error=f"{type(e).__name__}: {e}"[:300]))
    return rows
