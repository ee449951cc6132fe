#!/usr/bin/env python
"""One-command GPU suite (issue 8): correctness, kernel timings, baselines and end to end, one JSON.

On a GPU (H100/H200), in this order, within ``--max-seconds`` (default 540 s: the device allows
10 minutes a command):

1. optional: ``pip install --no-index --no-deps`` the wheels in ``--wheels DIR`` (default ``.whl``)
   into a temporary target (bitsandbytes baselines; absent wheels are reported "not installed");
2. correctness of every format's Triton path against the plain-PyTorch reference on fresh random
   inputs (outputs poisoned with NaN before each run), fp16 and bf16, forward and input gradient
   (through the autograd functional forms, i.e. the custom ops): relative error and SQNR bounds as
   in tests/test_lowbit.py and tests/test_sparse24_lowbit.py;
3. kernel timings with bench/harness.py (``triton.testing.do_bench`` median after warm-up; it
   flushes the L2 before every repetition, and activations rotate among fresh random sets) for
   K x N in the issue's shapes plus the built-in models' Linear shapes, M in 1..4096: dense
   ``F.linear``/``dY @ W`` (cuBLAS), every format's forward and input-gradient launcher, the 2:4
   layer with its dispatch, torch semi-structured sparse, ``torch._int_mm`` (W8A8),
   ``torch._scaled_mm`` (FP8, where it runs), bitsandbytes 8-bit and nf4 where installed;
4. end to end: the built-in TinyViT at ViT-B/16 shapes (width 768, depth 12, 12 heads, MLP 3072,
   224x224x3, patch 16) and an MLP of 4096-wide layers, batch 1/16/256, dense vs each recipe.

Work is ordered by priority (fp16 issue shapes, end to end, bf16, model shapes); once the time
budget is spent no new shape is started, what was measured is written and the rest is listed under
``skipped``. The JSON (``--out``, default ``bench/results/gpu_suite-<device>-<date>.json``) holds
the environment (device, driver, torch/triton versions, date), every figure with GB/s, TFLOP/s,
roofline %, the speedup vs dense measured in the same run, and the issue's targets met/missed.
A short table is printed last.

``--tiny``: the same suite on CPU with Triton's interpreter (TRITON_INTERPRET=1, set here),
``backend="triton"`` on CPU tensors and tiny shapes; timings are perf_counter over interpreted
kernels and MEAN NOTHING for performance (``timings_meaningful: false``). tests/test_gpu_suite.py
runs it.

Run: ``python bench/gpu_suite.py --max-seconds 540 --out $OUT/gpu_suite.json`` (see bench/RESULTS.md).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if "--tiny" in sys.argv[1:]:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

MAIN_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]  # (K, N)
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]
CHECK_SHAPES, CHECK_MS = [(4096, 4096), (1024, 1000)], [1, 3, 16, 40, 256]  # odd sizes test the masks
TINY_SHAPES, TINY_MS = [(128, 48)], [1, 3, 17]
E2E_BATCHES, TINY_E2E_BATCHES = [1, 16, 256], [1, 3]
GROUP = 128
ROTATE = 4  # activation sets cycled through by a timed call

# issue 8's targets: speedup vs dense fp16 cuBLAS in the same run, on MAIN_SHAPES
TARGETS = {
    "sparse24": {"M<=16": 1.5, "M=64": 1.2, "M>=2048": 0.98},
    "int8_weight": {"M<=16": 1.8, "M=64": 1.4, "M>=2048": 0.98},
    "int4_g128": {"M<=16": 3.0, "M=64": 1.5, "M>=2048": 0.98},
    "sparse24_int4_g128": {"M<=16": 4.0, "M=64": 2.0, "M>=2048": 0.98},
    "int8_dynamic": {"M>=2048": 1.5},
    "fp8_dynamic": {"M>=2048": 1.5},
}
REGIMES = {"M<=16": lambda m: m <= 16, "M=64": lambda m: m == 64, "M>=2048": lambda m: m >= 2048}
GRAD_TARGET = 0.8  # input-gradient speedup >= 0.8x the forward's, M <= 16
TOL = {"float16": 2e-3, "bfloat16": 1.6e-2}  # max-abs relative error, as in tests/test_lowbit.py


# ------------------------------------------------------------------------------ setup
def install_wheels(directory: str | None) -> dict:
    """``pip install --no-index --no-deps`` every wheel in ``directory`` into a temporary target
    that is put first on sys.path; an absent or empty directory is fine."""
    d = Path(directory) if directory else None
    wheels = sorted(d.glob("*.whl")) if d is not None and d.is_dir() else []
    info = {"dir": str(d) if d else None, "wheels": [w.name for w in wheels]}
    if not wheels:
        return info
    target = Path(tempfile.gettempdir()) / "robcomp-gpu-suite-site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--no-cache-dir", "--upgrade", "--target", str(target), *map(str, wheels)],
                          capture_output=True, text=True)
    info["installed"] = proc.returncode == 0
    if proc.returncode == 0:
        sys.path.insert(0, str(target))
    else:
        info["error"] = (proc.stderr or proc.stdout)[-500:]
    return info


def import_robcomp():
    """robcomp and robcomp.kernels (= kernels/) from this checkout, installed or not. The repository
    root is not put on sys.path: its top-level ``kernels/`` would shadow the PyPI ``kernels`` package
    that bitsandbytes may import."""
    if "robcomp" not in sys.modules:
        for name in ("robcomp.kernels", "robcomp"):
            path = ROOT / name.split(".")[-1]
            spec = importlib.util.spec_from_file_location(name, path / "__init__.py",
                                                          submodule_search_locations=[str(path)])
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        sys.modules["robcomp"].kernels = sys.modules["robcomp.kernels"]
    return sys.modules["robcomp"]


import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import harness as H  # noqa: E402  (bench/harness.py: this script's directory is sys.path[0])


class Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds = time.monotonic(), seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def spent(self) -> bool:
        return self.elapsed() >= self.seconds


def rotating(items: list) -> Callable[[], object]:
    """A zero-argument callable returning ``items`` in turn."""
    state = [0]

    def nxt():
        state[0] = (state[0] + 1) % len(items)
        return items[state[0]]
    return nxt


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.double(), ref.double()
    return ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def sqnr_db(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.double(), ref.double()
    return 10 * math.log10(ref.pow(2).sum().item() / max((y - ref).pow(2).sum().item(), 1e-300))


@contextlib.contextmanager
def poisoned_empty():
    """``torch.empty`` returns NaN (floats) / 77 (integers): an output element the kernel does not
    write shows up in the error."""
    real = torch.empty

    def empty(*shape, **kw):
        t = real(*shape, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(77)
    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real


def atomic_write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".gpu_suite-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ formats
@dataclass
class Format:
    """One compressed format: how to pack, run (launchers and autograd form) and check it."""
    name: str
    pack: Callable            # w [N, K] (dtype) -> tuple of packed tensors (+ group size)
    forward: Callable         # (x, *packed) -> y            forward launcher
    linear: Callable          # (x, *packed, bias) -> y      autograd functional form
    backward: Callable        # (dy, *packed) -> dx          input-gradient launcher
    dequant: Callable         # packed -> dense float64 [N, K]
    sqnr_min: float           # dB against the original (2:4-masked) weight, as in the tests
    sparse: bool = False
    grad_kernel: str = ""     # input-gradient kernel, when shared with another format
    expected: Callable | None = None  # (x, packed, bias, deq) -> float64 y; default x @ deq.T + b

    def incompatible(self, k: int) -> str | None:
        if ("int4" in self.name) and k % GROUP:
            return f"group_size {GROUP} does not divide K={k}"
        return None


def formats(device: torch.device) -> list[Format]:
    from robcomp.kernels import lowbit as L
    from robcomp.kernels import reference as R
    from robcomp.kernels import sparse24 as S
    from robcomp.kernels import sparse24_lowbit as SL

    def fp8_expected(x, packed, bias, deq):  # exact GEMM of the kernel's own e4m3 activations (as the tests)
        q, s = packed
        xq, xs = L.quantize_rows(x.reshape(-1, x.shape[-1]).contiguous(), fp8=True)
        y = (xq.double() @ q.double().T) * xs.double()[:, None] * s.double()[None, :]
        return y + bias.double()

    fmts = [
        Format("sparse24", R.sparse24_pack, S.sparse24_forward, S.sparse24_linear, S.sparse24_backward_input,
               lambda p: R.sparse24_unpack(p[0], p[1], p[0].shape[1] * 2).double(), 40.0, sparse=True),
        Format("int8_weight", R.int8_weight_pack, L.int8_weight_forward, L.int8_weight_linear,
               L.per_channel_backward_input, lambda p: R.int8_weight_unpack(*p, torch.float64), 35.0,
               grad_kernel="per_channel_int8"),
        Format("int4_g128", lambda w: (*R.int4_pack(w, GROUP), GROUP), L.int4_forward, L.int4_linear,
               L.int4_backward_input, lambda p: R.int4_unpack(*p, torch.float64), 17.0),
        Format("sparse24_int4_g128", lambda w: (*R.sparse24_int4_pack(w, GROUP), GROUP), SL.sparse24_int4_forward,
               SL.sparse24_int4_linear, SL.sparse24_int4_backward_input,
               lambda p: R.sparse24_int4_unpack(*p, torch.float64), 17.0, sparse=True),
        Format("int8_dynamic", R.int8_dynamic_pack, L.int8_dynamic_forward, L.int8_dynamic_linear,
               L.per_channel_backward_input, lambda p: R.int8_dynamic_unpack(*p, torch.float64), 30.0,
               grad_kernel="per_channel_int8",
               expected=lambda x, p, b, deq: R.int8_dynamic_linear(x, *p, b).double()),
        Format("fp8_dynamic", R.fp8_dynamic_pack, L.fp8_dynamic_forward, L.fp8_dynamic_linear,
               L.per_channel_backward_input, lambda p: R.fp8_dynamic_unpack(*p, torch.float64), 15.0,
               expected=fp8_expected),
    ]
    if device.type == "cpu":
        L._FP8_INTERPRETER_OK = True  # the kernels' own interpreter hook (the public path refuses CPU)
    elif not L.fp8_supported(device):
        fmts = [f for f in fmts if f.name != "fp8_dynamic"]
    return fmts


# ------------------------------------------------------------------------------ correctness
def check(fmt: Format, k: int, n: int, m: int, dtype: torch.dtype, device) -> list[dict]:
    """Forward and input gradient of ``fmt.linear`` vs the reference on fresh random inputs."""
    from robcomp.kernels import reference as R
    dt = str(dtype).replace("torch.", "")
    base = {"format": fmt.name, "dtype": dt, "M": m, "K": k, "N": n}
    w = torch.randn(n, k, device=device).to(dtype)  # the weight as the model holds it
    packed = fmt.pack(w)
    x = H.randn(m, k, dtype=dtype, device=device).requires_grad_()
    b = H.randn(n, dtype=dtype, device=device)
    gy = H.randn(m, n, dtype=dtype, device=device)
    try:
        with poisoned_empty():
            y = fmt.linear(x, *packed, b)
            y.backward(gy)
    except Exception as e:  # a crash is a failed check, not a crashed suite
        return [dict(base, direction=d, passed=False, error=f"{type(e).__name__}: {e}"[:300])
                for d in ("forward", "input_grad")]
    xd = x.detach()
    deq = fmt.dequant(packed)
    expected = fmt.expected(xd, packed, b, deq) if fmt.expected else xd.double() @ deq.T + b.double()
    w_true = w * R.sparse24_mask(w) if fmt.sparse else w
    tol = TOL[dt]
    fwd_err, sqnr = rel_err(y, expected), sqnr_db(y, xd.double() @ w_true.double().T + b.double())
    grad_err = rel_err(x.grad, gy.double() @ deq)
    finite = bool(torch.isfinite(y).all() and torch.isfinite(x.grad).all())
    return [dict(base, direction="forward", rel_err=fwd_err, tol=tol, sqnr_db=round(sqnr, 2), sqnr_min=fmt.sqnr_min,
                 passed=finite and fwd_err < tol and sqnr > fmt.sqnr_min),
            dict(base, direction="input_grad", rel_err=grad_err, tol=4 * tol,
                 passed=finite and grad_err < 4 * tol)]


# ------------------------------------------------------------------------------ kernel timings
class Suite:
    def __init__(self, args, device: torch.device):
        self.args, self.device = args, device
        self.rec = H.Recorder(device)
        self.budget = Budget(args.max_seconds)
        self.correctness: list[dict] = []
        self.skipped: list[dict] = []
        self.errors: list[dict] = []
        self.baselines: dict = {}
        self.formats = formats(device)
        self.timing_kw = ({"warmup": args.warmup_ms, "rep": args.rep_ms} if device.type == "cuda"
                          else {"cpu_repeats": 1})

    def time(self, suite, case, impl, dtype, shape, fn, nbytes=0, flops=0):
        """Time ``fn`` with the harness and record it; a failure is recorded, not raised."""
        try:
            ms = H.time_ms(fn, self.device, **self.timing_kw)
        except Exception as e:
            self.errors.append({"suite": suite, "case": case, "impl": impl, "dtype": dtype,
                                "error": f"{type(e).__name__}: {e}"[:300]})
            return None
        return self.rec.add(H.Measurement(suite, case, impl, dtype, shape, ms, int(nbytes), int(flops)))

    def run_checks(self, dtypes):
        shapes, ms = (TINY_SHAPES, TINY_MS) if self.args.tiny else (CHECK_SHAPES, CHECK_MS)
        for dtype in dtypes:
            for fmt in self.formats:
                for k, n in shapes:
                    if fmt.incompatible(k):
                        continue
                    for m in ms:
                        torch.manual_seed(len(self.correctness))
                        self.correctness.extend(check(fmt, k, n, m, dtype, self.device))

    def _baselines(self, w, packs, k, n, dtype):
        """Peer implementations for one weight: name -> (make(x) -> callable, weight bytes)."""
        from robcomp.kernels import lowbit as L
        from robcomp.kernels import reference as R
        out = {}
        if "sparse24" in packs:
            try:
                from torch.sparse import to_sparse_semi_structured
                ws = to_sparse_semi_structured(R.sparse24_unpack(*packs["sparse24"], k))
                out["semi_structured"] = ((lambda x: lambda: F.linear(x(), ws)), H.nbytes(*packs["sparse24"]))
            except Exception as e:
                self.baselines.setdefault("semi_structured", f"unavailable: {type(e).__name__}: {e}"[:200])
        if "int8_dynamic" in packs:
            q, s = packs["int8_dynamic"]
            qt = q.t()

            def int_mm(x):  # robcomp's per-token quantiser + torch._int_mm (M > 16, K, N % 8 == 0)
                def f():
                    xq, xs = L.quantize_rows(x())
                    return (torch._int_mm(xq, qt).float() * xs[:, None] * s[None, :]).to(dtype)
                return f
            out["int_mm"] = (int_mm, H.nbytes(q, s))
        if "fp8_dynamic" in packs and self.device.type == "cuda":
            q, s = packs["fp8_dynamic"]
            qt, sw = q.t(), s[None, :].contiguous()

            def scaled_mm(x):  # row-wise scaled fp8 GEMM (cuBLASLt/CUTLASS)
                def f():
                    xq, xs = L.quantize_rows(x(), fp8=True)
                    return torch._scaled_mm(xq, qt, scale_a=xs[:, None], scale_b=sw, out_dtype=dtype)
                return f
            out["scaled_mm_fp8"] = (scaled_mm, H.nbytes(q, s))
        if self.baselines.get("bitsandbytes", "").startswith("bitsandbytes"):
            import bitsandbytes as bnb
            for name, nbytes in (("bnb_int8", k * n + 4 * n), ("bnb_nf4", k * n // 2 + 4 * (k * n // 64))):
                try:
                    if name == "bnb_int8":
                        mod = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=0.0)
                        mod.weight = bnb.nn.Int8Params(w.half().cpu(), requires_grad=False, has_fp16_weights=False)
                    else:
                        mod = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, quant_type="nf4")
                        mod.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type="nf4")
                    mod = mod.to(self.device)
                    out[name] = ((lambda x, mod=mod: lambda: mod(x())), nbytes)
                except Exception as e:
                    self.errors.append({"impl": name, "K": k, "N": n, "error": f"{type(e).__name__}: {e}"[:300]})
        return out

    def run_kernels(self, shapes, dtype, ms, label):
        from robcomp.nn import Sparse24Linear
        dt = str(dtype).replace("torch.", "")
        for k, n in shapes:
            if self.budget.spent():
                self.skipped.append({"what": f"kernels {label} K={k} N={n} {dt}", "reason": "time budget"})
                continue
            torch.manual_seed(k * 7 + n)
            w = H.randn(n, k, dtype=dtype, device=self.device, scale=0.02)
            fmts = [f for f in self.formats if not f.incompatible(k)]
            packs = {f.name: f.pack(w) for f in fmts}
            for f in self.formats:
                if f.incompatible(k):
                    self.skipped.append({"what": f"{f.name} K={k} N={n}", "reason": f.incompatible(k)})
            base = self._baselines(w, packs, k, n, dtype)
            lin = torch.nn.Linear(k, n, bias=False, device=self.device, dtype=dtype)
            with torch.no_grad():
                lin.weight.copy_(w)
            layer = Sparse24Linear.from_linear(lin, backend="triton")
            del lin
            for m in ms:
                if self.budget.spent():
                    self.skipped.append({"what": f"kernels {label} K={k} N={n} {dt} M={m}..", "reason": "time budget"})
                    break
                x = rotating([H.randn(m, k, dtype=dtype, device=self.device) for _ in range(ROTATE)])
                dy = rotating([H.randn(m, n, dtype=dtype, device=self.device) for _ in range(ROTATE)])
                shape = {"M": m, "K": k, "N": n, "shapes": label}
                esz = w.element_size()
                act_f, act_b, flops = esz * m * (k + n), esz * m * (k + n), H.matmul_flops(m, n, k)
                case_f, case_b = f"forward M={m} K={k} N={n}", f"input_grad M={m} K={k} N={n}"
                with torch.no_grad():
                    self.time("kernels", case_f, "dense", dt, shape, lambda: F.linear(x(), w), H.nbytes(w) + act_f, flops)
                    for f in fmts:
                        p = packs[f.name]
                        self.time("kernels", case_f, f.name, dt, shape, lambda f=f, p=p: f.forward(x(), *p),
                                  H.nbytes(*[t for t in p if isinstance(t, torch.Tensor)]) + act_f, flops)
                    self.time("kernels", case_f, "sparse24_layer", dt, shape, lambda: layer(x()),
                              H.nbytes(layer.values, layer.meta) + act_f, flops)
                    for name, (make, wbytes) in base.items():
                        if name == "int_mm" and (m <= 16 or k % 8 or n % 8):
                            continue
                        self.time("kernels", case_f, name, dt, shape, make(x), wbytes + act_f, flops)
                    self.time("kernels", case_b, "dense", dt, shape, lambda: dy() @ w, H.nbytes(w) + act_b, flops)
                    done = set()
                    for f in fmts:
                        if f.grad_kernel and f.grad_kernel in done:
                            continue  # the same kernel on the same codes: timed once
                        done.add(f.grad_kernel)
                        p = packs[f.name]
                        self.time("kernels", case_b, f.grad_kernel or f.name, dt, shape,
                                  lambda f=f, p=p: f.backward(dy(), *p),
                                  H.nbytes(*[t for t in p if isinstance(t, torch.Tensor)]) + act_b, flops)
            del packs, base, layer, w
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    # -------------------------------------------------------------------------- end to end
    def run_e2e(self, dtype):
        import robcomp as rc
        from robcomp.compress import model_bytes
        from robcomp.models import MLP, TinyViT
        dt = str(dtype).replace("torch.", "")
        if self.args.tiny:
            models = {"tiny_vit": (lambda: TinyViT(width=64, depth=1, heads=4, patch=2, image_size=8), (1, 8, 8)),
                      "mlp128": (lambda: MLP(width=128, depth=2, in_features=64), (1, 8, 8))}
            batches = TINY_E2E_BATCHES
        else:
            models = {"vit_b16": (lambda: TinyViT(width=768, depth=12, heads=12, patch=16, mlp_ratio=4, in_channels=3,
                                                  num_classes=1000, image_size=224), (3, 224, 224)),
                      "mlp4096": (lambda: MLP(width=4096, depth=4, in_features=4096), (1, 64, 64))}
            batches = E2E_BATCHES
        recipes = [rc.Sparse24(), rc.Int8WeightOnly(), rc.Int4WeightOnly(group_size=GROUP),
                   rc.Sparse24Int4(group_size=GROUP), rc.Int8Dynamic()]
        if any(f.name == "fp8_dynamic" for f in self.formats) and self.device.type == "cuda":
            recipes.append(rc.FP8Dynamic())
        else:
            self.skipped.append({"what": "e2e fp8_dynamic", "reason": "needs a CUDA GPU with compute capability >= 8.9"})
        for name, (build, in_shape) in models.items():
            torch.manual_seed(0)
            dense = build().to(self.device, dtype).eval()
            variants = [("dense", lambda: dense)] + [
                (r.name, lambda r=r: rc.compress(copy.deepcopy(dense), r, backend="triton").eval()) for r in recipes]
            for impl, make in variants:
                if self.budget.spent():
                    self.skipped.append({"what": f"e2e {name} {impl}", "reason": "time budget"})
                    continue
                try:
                    model = make()
                except Exception as e:
                    self.errors.append({"suite": "e2e", "case": name, "impl": impl, "error": f"{type(e).__name__}: {e}"[:300]})
                    continue
                mbytes = model_bytes(model)
                for b in batches:
                    xb = rotating([torch.rand(b, *in_shape, device=self.device).to(dtype) for _ in range(2)])
                    with torch.no_grad():
                        self.time("e2e", f"{name} batch={b}", impl, dt, {"model": name, "batch": b, "input": list(in_shape)},
                                  lambda: model(xb()), mbytes, 0)
                del model
            del dense, variants
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    # -------------------------------------------------------------------------- report
    def targets(self, main_shapes) -> list[dict]:
        rows = [r for r in self.rec.records() if r["suite"] == "kernels" and r["dtype"] == "float16"
                and (r["shape"]["K"], r["shape"]["N"]) in main_shapes]
        speed = {(r["case"], r["impl"]): r.get("speedup_vs_dense") for r in rows}
        out = []

        def summarise(fmt, regime, target, impl, pairs):
            vals = [v for _, v in pairs if v is not None]
            worst = min(pairs, key=lambda p: p[1]) if vals else None
            out.append({"format": fmt, "regime": regime, "target": target, "impl": impl, "dtype": "float16",
                        "cases": len(vals), "worst": round(worst[1], 3) if worst else None,
                        "worst_case": worst[0] if worst else None,
                        "median": round(statistics.median(vals), 3) if vals else None,
                        "met": (min(vals) >= target) if vals else None})

        for fmt, regimes in TARGETS.items():
            for regime, target in regimes.items():
                impl = "sparse24_layer" if fmt == "sparse24" and regime == "M>=2048" else fmt
                pairs = [(r["case"], speed[(r["case"], impl)]) for r in rows
                         if r["impl"] == impl and r["case"].startswith("forward") and REGIMES[regime](r["shape"]["M"])
                         and speed[(r["case"], impl)] is not None]
                summarise(fmt, regime, target, impl, pairs)
        grad_impl = {f.name: f.grad_kernel or f.name for f in self.formats}
        for fmt in ("sparse24", "int8_weight", "int4_g128", "sparse24_int4_g128"):
            pairs = []
            for r in rows:
                if r["impl"] == grad_impl.get(fmt) and r["case"].startswith("input_grad") and r["shape"]["M"] <= 16:
                    fwd = speed.get((r["case"].replace("input_grad", "forward"), fmt))
                    if fwd and speed[(r["case"], r["impl"])] is not None:
                        pairs.append((r["case"], speed[(r["case"], r["impl"])] / fwd))
            summarise(fmt, "input_grad/forward M<=16", GRAD_TARGET, grad_impl.get(fmt), pairs)
        return out

    def result(self, main_shapes) -> dict:
        records = self.rec.records()
        for r in records:
            if r["suite"] == "e2e" and r["ms"] > 0:
                r["throughput_samples_per_s"] = round(r["shape"]["batch"] / r["ms"] * 1e3, 2)
        env = self.rec.env
        return {
            "suite": "gpu_suite", "issue": 8, "mode": "tiny" if self.args.tiny else "gpu",
            "timings_meaningful": not self.args.tiny and self.device.type == "cuda",
            "timing": ("perf_counter around Triton-interpreter kernels on CPU: NOT performance figures"
                       if self.device.type != "cuda" else
                       f"triton.testing.do_bench median, warmup {self.args.warmup_ms} ms, rep {self.args.rep_ms} ms, "
                       f"L2 flushed before each repetition, activations rotating among {ROTATE} sets"),
            "device": env.get("device"), "driver": env.get("driver"), "torch": env.get("torch"),
            "triton": env.get("triton"), "date": env.get("date"), "environment": env,
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "config": {k: v for k, v in vars(self.args).items()},
            "baselines": self.baselines,
            "elapsed_s": round(self.budget.elapsed(), 1), "budget_s": self.args.max_seconds,
            "budget_exhausted": self.budget.spent(),
            "correctness_passed": all(c["passed"] for c in self.correctness),  # True when none ran
            "correctness": self.correctness,
            "results": records,
            "targets": self.targets(main_shapes),
            "skipped": self.skipped, "errors": self.errors,
        }


def model_linear_shapes(tiny: bool) -> list[tuple[int, int]]:
    """(K, N) of the built-in models' Linear layers that compression touches (no head, no tiny layer),
    plus the ViT-B/16 and 4096-MLP shapes of the end-to-end models (not in tiny mode)."""
    from robcomp.compress import MIN_WEIGHTS
    from robcomp.models import MLP, TinyViT, build_model
    models = [build_model(name) for name in ("cnn", "mlp", "vit")]
    if not tiny:
        models += [TinyViT(width=768, depth=1, heads=12, patch=16, mlp_ratio=4, in_channels=3, image_size=224),
                   MLP(width=4096, depth=2, in_features=4096)]
    shapes = []
    for model in models:
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "head" and mod.weight.numel() >= MIN_WEIGHTS:
                s = (mod.in_features, mod.out_features)
                if s not in shapes and s not in MAIN_SHAPES:
                    shapes.append(s)
    if tiny:  # one shape that every format takes, to keep the interpreter run short
        shapes = sorted((s for s in shapes if s[0] % GROUP == 0), key=lambda s: s[0] * s[1])[:1]
    return shapes


def print_table(res: dict) -> None:
    print()
    ok = sum(c["passed"] for c in res["correctness"])
    print(f"correctness: {ok}/{len(res['correctness'])} checks passed"
          + ("" if res["correctness_passed"] else "  FAILED: " + ", ".join(
              sorted({f"{c['format']} {c['dtype']} {c['direction']}" for c in res["correctness"] if not c["passed"]}))))
    e2e = [r for r in res["results"] if r["suite"] == "e2e"]
    if e2e:
        print(f"\n{'end to end':<22}{'recipe':<20}{'ms':>10}{'samples/s':>12}{'vs dense':>10}")
        for r in e2e:
            print(f"{r['case']:<22}{r['impl']:<20}{r['ms']:>10.3f}{r.get('throughput_samples_per_s', 0):>12.1f}"
                  f"{r.get('speedup_vs_dense', 1.0):>10.2f}")
    print(f"\n{'target (fp16, issue shapes)':<44}{'need':>6}{'worst':>8}{'median':>8}{'n':>4}  met")
    for t in res["targets"]:
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        met = {True: "yes", False: "MISSED", None: "no data"}[t["met"]]
        print(f"{t['format'] + ' ' + t['regime']:<44}{t['target']:>6.2f}{fmt(t['worst']):>8}{fmt(t['median']):>8}"
              f"{t['cases']:>4}  {met}")
    if not res["timings_meaningful"]:
        print("\nNOTE: interpreter/CPU timings: they mean nothing for performance.")
    print(f"\n{len(res['results'])} figures, {len(res['skipped'])} skipped, {len(res['errors'])} errors, "
          f"{res['elapsed_s']} s")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU + Triton interpreter, tiny shapes (tests)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/gpu_suite-<device>-<date>.json)")
    p.add_argument("--max-seconds", type=float, default=540.0, help="stop starting new work after this")
    p.add_argument("--wheels", default=str(ROOT / ".whl"), help="directory of wheels to install first (optional)")
    p.add_argument("--dtypes", default="float16,bfloat16")
    p.add_argument("--phases", default="correctness,kernels,e2e")
    p.add_argument("--shapes", default="main,models", help="kernel shape sets: main (issue 8), models (built-in)")
    p.add_argument("--ms", default=None, help="comma-separated M values (default: the issue's)")
    p.add_argument("--warmup-ms", type=float, default=10.0)
    p.add_argument("--rep-ms", type=float, default=50.0)
    p.add_argument("--tune-rep-ms", type=float, default=20.0,
                   help="do_bench rep (ms) of robcomp's Triton autotuners (0: Triton's default 100)")
    return p.parse_args(argv)


def fast_autotune(rep_ms: float) -> None:
    """Shorter benchmarking inside robcomp's autotuners (Triton's default is warm-up 25 ms, rep 100 ms
    per config and key), so that tuning every shape fits in the time budget."""
    import triton
    import triton.testing
    from triton.runtime.autotuner import Autotuner
    from robcomp.kernels import lowbit, sparse24, sparse24_lowbit

    def bench(kernel_call, quantiles=None):
        return triton.testing.do_bench(kernel_call, warmup=5, rep=rep_ms, quantiles=quantiles)
    for mod in (lowbit, sparse24, sparse24_lowbit):
        for obj in vars(mod).values():
            if isinstance(obj, Autotuner):
                obj._do_bench = bench
                obj.__dict__.pop("do_bench", None)  # a cached_property (triton 3.6) re-reads _do_bench


def main(argv=None) -> int:
    args = parse_args(argv)
    wheels = install_wheels(args.wheels)
    import_robcomp()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        print("no CUDA device: run with --tiny (Triton interpreter) on CPU", file=sys.stderr)
        return 2
    if device.type == "cuda" and args.tune_rep_ms > 0:
        fast_autotune(args.tune_rep_ms)
    suite = Suite(args, device)
    suite.baselines["wheels"] = wheels
    try:
        import bitsandbytes
        suite.baselines["bitsandbytes"] = f"bitsandbytes {bitsandbytes.__version__}"
    except Exception as e:
        suite.baselines["bitsandbytes"] = "not installed" if isinstance(e, ImportError) else f"import failed: {e}"[:200]
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",") if d]
    phases = set(args.phases.split(","))
    ms = [int(v) for v in args.ms.split(",")] if args.ms else (TINY_MS if args.tiny else MS)
    main_shapes = TINY_SHAPES if args.tiny else MAIN_SHAPES
    main_shapes_timed = main_shapes if "main" in args.shapes else []
    model_shapes = model_linear_shapes(args.tiny) if "models" in args.shapes else []
    out = Path(args.out) if args.out else None

    def save():
        nonlocal out
        res = suite.result(main_shapes)
        if out is None:
            slug = re.sub(r"[^A-Za-z0-9]+", "-", res["device"] or "device").strip("-").lower()
            out = H.RESULTS_DIR / f"gpu_suite-{slug}-{res['date'].replace(':', '').replace('-', '')[:15]}.json"
        atomic_write_json(out, res)
        return res

    def on_term(signum, frame):  # a killed run still writes what it has
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_term)

    # priority order: what the targets need first
    work = []
    if "correctness" in phases:
        work.append(("correctness", lambda: suite.run_checks(dtypes)))
    for i, dtype in enumerate(dtypes):
        if "kernels" in phases and main_shapes_timed:
            work.append((f"kernels main {dtype}", lambda d=dtype: suite.run_kernels(main_shapes_timed, d, ms, "main")))
        if i == 0 and "e2e" in phases:
            work.append(("e2e", lambda d=dtype: suite.run_e2e(d)))
    for dtype in dtypes:
        if "kernels" in phases and model_shapes:
            work.append((f"kernels models {dtype}", lambda d=dtype: suite.run_kernels(model_shapes, d, ms, "models")))
    try:
        for name, run in work:
            t0 = time.monotonic()
            print(f"[{suite.budget.elapsed():6.1f} s] {name} ...", flush=True)
            run()
            print(f"[{suite.budget.elapsed():6.1f} s] {name} done in {time.monotonic() - t0:.1f} s", flush=True)
            save()
    finally:
        res = save()
        print_table(res)
        print(f"results written to {out}")
    return 0 if res["correctness_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
