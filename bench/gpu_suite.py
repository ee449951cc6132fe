#!/usr/bin/env python
"""One-command GPU suite (issues 11 and 16): what a user of each compressed format pays, in one JSON.

Phases, in priority order, inside one wall-clock budget (``--max-seconds``, default 420 s, so that
one 10-minute device call holds it with room to spare; bench/gpu_budget.py): each phase gets a
share and may use what earlier phases left, never the shares of later ones, and every planned case
it did not reach is listed under ``skipped``.

1. ``ceilings``: measured device-to-device copy GB/s, bf16 and int8 matmul rates (next to the
   datasheet peaks per dtype of bench/harness.peaks_by_dtype);
2. ``correctness`` (hard cap: a case still running at the cap is interrupted): every format's custom
   op, forward and input gradient, fp16 and bf16, against kernels/reference.py in float64 on fresh
   random inputs with poisoned outputs, and the dispatched layer's forward (after ``robcomp.tune``);
3. ``kernels`` (fp16, the target shapes): per M, dense cuBLAS ``F.linear`` and ``dY @ W``, each
   format's raw Triton launcher (forward and input gradient), the dispatched layer (``rc.compress``
   with the default backend, ``robcomp.tune`` at that input first; the path it took from
   ``layer.last_path``), and the peers of bench/gpu_baselines.py (semi-structured sparse,
   ``_weight_int8pack_mm``, tinygemm int4, ``_int_mm`` at every M, ``_scaled_mm`` fp8, bitsandbytes
   where installed); ``do_bench`` medians (L2 flushed, inputs rotating), GB/s, TFLOP/s, roofline %;
4. ``launch``: host cost per call at a tiny shape, eager (wall clock over many calls) and replayed
   from a ``torch.cuda.CUDAGraph``, for dense, each raw launcher and each dispatched layer;
5. ``static``: bench/static_model.py's predictions for each kernel module's ``perf_cases`` (fp16,
   M in 1/16/64/4096), computed by bench/gpu_static.py in a background process started at setup
   (no CUDA there, so its SASS compiles fork safely onto the idle cores), collected here and put
   beside the measured raw kernels ("static model unavailable" when the module is absent);
6. ``e2e``: TinyViT at ViT-B/16 shapes and a 4096-wide MLP, batch 1/16/256, dense vs each recipe
   (tuned, with the paths the layers took);
7. ``extra``: whatever time is left: bf16 on the target shapes, then the built-in models' shapes.

Targets (bench/gpu_targets.py) are judged on the fp16 issue shapes: a target is unmet when any of
its cases errored or its format failed a correctness check, incomplete when cases were skipped.
The JSON (``--out``, or ``--out-dir``/``<date>-<device>.json``, default bench/results/) carries the
device, driver, torch/triton versions, date, and every figure's dtype and shape; it is rewritten
atomically after every phase and shape, and on SIGTERM. A short table is printed last.

``--tiny``: the same phases on CPU with Triton's interpreter (TRITON_INTERPRET=1, set here) and tiny
shapes; its timings MEAN NOTHING for performance (``timings_meaningful: false``). tests/benchmarks/test_gpu_suite.py
runs it. The device command is in bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import copy
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(Path(__file__).resolve().parent) not in sys.path:  # run through runpy or imported: its siblings still import
    sys.path.insert(0, str(Path(__file__).resolve().parent))
if "--tiny" in sys.argv[1:]:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import gpu_baselines  # noqa: E402  (bench/, this script's directory)
import gpu_formats  # noqa: E402
import gpu_interfaces as I  # noqa: E402
import gpu_static  # noqa: E402
import gpu_targets  # noqa: E402
import harness as H  # noqa: E402
from gpu_budget import Budget  # noqa: E402

MAIN_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]  # (K, N), the target shapes
MS = [1, 4, 16, 64, 256, 1024, 4096]
CHECK_SHAPES, CHECK_MS = [(4096, 4096), (1024, 1000)], [1, 3, 16, 40, 256]  # odd sizes test the masks
STATIC_MS = [1, 16, 64, 4096]
LAUNCH_SHAPE = (1, 256, 256)  # (M, K, N): device work far shorter than a launch
E2E_BATCHES = [1, 16, 256]
TINY = {"shapes": [(128, 48)], "ms": [1, 17], "check_shapes": [(128, 48)], "check_ms": [3],
        "launch": (1, 128, 48), "e2e_batches": [2], "static_ms": [1]}
ROTATE = 4  # activation sets cycled through by a timed call
#: (phase, fraction of the budget promised to it); a phase also gets what earlier phases left unused
#: ("setup": wheels, imports, formats, environment; always runs)
PLAN = [("setup", 0.04), ("ceilings", 0.025), ("correctness", 0.14), ("kernels", 0.40), ("launch", 0.05),
        ("static", 0.05), ("e2e", 0.12), ("extra", 0.175)]
PHASES = [name for name, _ in PLAN if name != "setup"]


# ------------------------------------------------------------------------------ setup
def install_wheels(directory: str | None) -> dict:
    """``pip install --no-index --no-deps`` every wheel in ``directory`` into a temporary target put
    first on sys.path (optional baselines such as bitsandbytes); an absent or empty directory is fine."""
    import subprocess
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


def kernel_modules() -> list:
    """The robcomp kernel modules loaded so far (``robcomp.kernels.*``; the suite's formats import
    every module whose kernels it runs, and what those import)."""
    return [mod for name, mod in sorted(sys.modules.items())
            if name.startswith("robcomp.kernels.") and mod is not None]


def fast_autotune(rep_ms: float) -> None:
    """Shorter benchmarking inside robcomp's Triton autotuners (Triton's default is warm-up 25 ms,
    rep 100 ms per config and key), so that tuning every shape fits in the budget."""
    import triton.testing
    from triton.runtime.autotuner import Autotuner

    def bench(kernel_call, quantiles=None):
        return triton.testing.do_bench(kernel_call, warmup=2, rep=rep_ms, quantiles=quantiles)
    for mod in kernel_modules():
        for obj in vars(mod).values():
            if isinstance(obj, Autotuner):
                obj._do_bench = bench
                obj.__dict__.pop("do_bench", None)  # a cached_property (triton 3.6) re-reads _do_bench


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ------------------------------------------------------------------------------ the suite
class Suite:
    def __init__(self, args, device: torch.device, budget: Budget, fmts=None):
        self.args, self.device, self.budget = args, device, budget
        self.tiny = bool(getattr(args, "tiny", False))
        self.rec = H.Recorder(device)
        self.formats = fmts if fmts is not None else gpu_formats.formats(device)
        self.cases: list[dict] = []        # every planned timing that a target may judge
        self.case_rows: dict[int, H.Measurement] = {}
        self.correctness: list[dict] = []
        self.errors: list[dict] = []
        self.launch: list[dict] = []
        self.static: dict = {"status": "not run", "predictions": []}
        self.static_job: gpu_static.Background | None = None
        self.baselines: dict = {}
        self.timing_kw = ({"warmup": args.warmup_ms, "rep": args.rep_ms} if device.type == "cuda"
                          else {"cpu_repeats": 1, "cpu_warmup": 1})
        self.sm_count = self.rec.env.get("sm_count", 132)  # the H100/H200's count where there is no GPU
        self.checkpoint = lambda: None  # main() sets it to rewrite the JSON (after each shape, each phase)

    # -------------------------------------------------------------------------- one timing
    def time(self, suite, case, impl, dt, shape, fn, nbytes=0, flops=0, compute_dtype="", target=None, **extra):
        """Time ``fn`` and record it; a failure is recorded (and marks its target case), not raised.
        ``target``: the planned case this timing fills (its ``status`` is set here)."""
        try:
            ms = H.time_ms(fn, self.device, **self.timing_kw)
        except Exception as e:
            err = f"{type(e).__name__}: {e}"[:300]
            self.errors.append({"suite": suite, "case": case, "impl": impl, "dtype": dt, "error": err})
            if target is not None:
                target.update(status="error", error=err)
            return None
        m = self.rec.add(H.Measurement(suite, case, impl, dt, shape, ms, int(nbytes), int(flops), compute_dtype,
                                       {k: v for k, v in extra.items() if v is not None}))
        if target is not None:
            target["status"] = "ok"
            self.case_rows[id(target)] = m
        return m

    def error(self, suite: str, what, e: Exception, cases=()) -> None:
        """Record an exception of ``what``; the planned ``cases`` it left unfilled become errors."""
        err = f"{type(e).__name__}: {e}"[:300]
        self.errors.append({"suite": suite, "case": str(what), "error": err})
        for c in cases:
            if c["status"] == "planned":
                c.update(status="error", error=err)

    def plan_case(self, fmt_name, kind, op, dt, m, k, n, **extra) -> dict:
        case = {"format": fmt_name, "kind": kind, "op": op, "dtype": dt, "M": m, "K": k, "N": n,
                "status": "planned", **extra}
        self.cases.append(case)
        return case

    # -------------------------------------------------------------------------- phases
    def run_ceilings(self, phase):
        if self.device.type != "cuda":
            phase.skip("measured ceilings", "needs a CUDA device")
            return
        try:
            self.rec.env["measured_peaks"] = H.measure_ceilings(self.device)
        except Exception as e:
            self.errors.append({"suite": "ceilings", "error": f"{type(e).__name__}: {e}"[:300]})

    def run_checks(self, phase, dtypes):
        shapes = TINY["check_shapes"] if self.tiny else CHECK_SHAPES
        ms = TINY["check_ms"] if self.tiny else CHECK_MS
        cases = [(fmt, dt, k, n, m) for m in ms for dt in dtypes for k, n in shapes
                 for fmt in self.formats if not fmt.incompatible(k)]
        # breadth first: every format and dtype at the first M before any at the next
        cases.sort(key=lambda c: (ms.index(c[4]), dtypes.index(c[1])))

        def one(c):
            fmt, dt, k, n, m = c
            torch.manual_seed(len(self.correctness))
            self.correctness.extend(gpu_formats.check(fmt, k, n, m, dt, self.device,
                                                      tune=I.tune, path_taken=I.path_taken))
        describe = lambda c: f"correctness {c[0].name} {dtype_name(c[1])} M={c[4]} K={c[2]} N={c[3]}"  # noqa: E731

        def on_error(c, e):  # a check that could not even start is a failed check
            self.correctness.append({"format": c[0].name, "dtype": dtype_name(c[1]), "M": c[4], "K": c[2], "N": c[3],
                                     "direction": "setup", "passed": False, "error": f"{type(e).__name__}: {e}"[:300]})
        phase.run(cases, one, hard=True, describe=describe, on_error=on_error)

    def run_kernels(self, phase, shapes, dtype, ms, label):
        """Per shape a setup item (weights, packs, layers, baselines), then one item per M."""
        dt = dtype_name(dtype)
        items = []
        for k, n in shapes:
            state: dict = {}
            items.append(("setup", k, n, None, state))
            items += [("m", k, n, m, state) for m in ms]

        def one(item):
            what, k, n, m, state = item
            if what == "setup":
                try:
                    self._setup_shape(state, k, n, dtype, label)
                except Exception as e:
                    state["error"] = e
                return
            cases = self._plan_m(k, n, m, dt)
            try:
                if "error" in state:
                    raise state["error"]
                self._time_m(state, cases, k, n, m, dtype, label)
            except Exception as e:
                self.error("kernels", f"{label} {dt} M={m} K={k} N={n}", e, cases)
            finally:
                if m == ms[-1]:
                    state.clear()  # free this shape's weights before the next
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    self.checkpoint()

        def on_skip(item):
            what, k, n, m, state = item
            if what == "m":
                for c in self._plan_m(k, n, m, dt):
                    c["status"] = "skipped"
        phase.run(items, one, on_skip=on_skip, on_error=lambda it, e: self.error("kernels", it[:4], e),
                  describe=lambda it: f"kernels {label} {dt} K={it[1]} N={it[2]}" + ("" if it[3] is None else f" M={it[3]}")
                  + (" setup" if it[0] == "setup" else ""))

    def _compatible(self, k):
        return [f for f in self.formats if not f.incompatible(k)]

    def _grad_groups(self, k):
        """Input-gradient kernels, one entry per kernel (formats sharing one are timed once)."""
        groups: dict[str, list] = {}
        for f in self._compatible(k):
            groups.setdefault(f.grad_kernel or f.name, []).append(f)
        return groups

    def _plan_m(self, k, n, m, dt) -> list[dict]:
        cases = []
        for f in self._compatible(k):
            cases.append(self.plan_case(f.name, "raw", "forward", dt, m, k, n))
            cases.append(self.plan_case(f.name, "layer", "forward", dt, m, k, n))
        for kernel, fs in self._grad_groups(k).items():
            cases.append(self.plan_case(fs[0].name, "raw", "input_grad", dt, m, k, n, kernel=kernel,
                                        formats=[f.name for f in fs]))
        return cases

    def _setup_shape(self, state, k, n, dtype, label):
        torch.manual_seed(k * 7 + n)
        w = H.randn(n, k, dtype=dtype, device=self.device, scale=0.02)
        state.update(w=w, packs={}, layers={})
        for f in self.formats:
            if f.incompatible(k):
                self.budget.skipped.append({"phase": "kernels", "what": f"{f.name} K={k} N={n}",
                                            "reason": f.incompatible(k)})
        for f in self._compatible(k):
            try:
                state["packs"][f.name] = f.pack(w)
            except Exception as e:
                state["packs"][f.name] = e
            try:
                state["layers"][f.name] = gpu_formats.dispatched_layer(f, w)
            except Exception as e:
                state["layers"][f.name] = e
        bnb = self.baselines.get("bitsandbytes", "").startswith("bitsandbytes")
        state["baselines"], status = gpu_baselines.build(w, dtype, with_bitsandbytes=bnb)
        self.baselines.setdefault("status", {})[f"{label} {dtype_name(dtype)} K={k} N={n}"] = status

    def _time_m(self, state, cases, k, n, m, dtype, label):
        dt = dtype_name(dtype)
        planned = {(c["format"], c["kind"], c["op"]): c for c in cases}
        w = state["w"]
        x = H.rotating([H.randn(m, k, dtype=dtype, device=self.device) for _ in range(ROTATE)])
        dy = H.rotating([H.randn(m, n, dtype=dtype, device=self.device) for _ in range(ROTATE)])
        shape = {"M": m, "K": k, "N": n, "shapes": label}
        act, flops = w.element_size() * m * (k + n), H.matmul_flops(m, n, k)
        cf, cb = f"forward M={m} K={k} N={n}", f"input_grad M={m} K={k} N={n}"

        def failed(case, e):
            err = f"{type(e).__name__}: {e}"[:300]
            case.update(status="error", error=err)
            self.errors.append({"suite": "kernels", "case": cf, "impl": case["format"], "kind": case["kind"],
                                "dtype": dt, "error": err})

        with torch.no_grad():
            dense_f = self.time("kernels", cf, "dense", dt, shape, lambda: F.linear(x(), w), H.nbytes(w) + act, flops)
            for f in self._compatible(k):
                p, wb = state["packs"][f.name], None
                raw, lay = planned[(f.name, "raw", "forward")], planned[(f.name, "layer", "forward")]
                if isinstance(p, Exception):
                    failed(raw, p)
                else:
                    wb = f.weight_bytes(p)
                    self.time("kernels", cf, f.name, dt, shape, lambda f=f, p=p: f.forward(x(), *p), wb + act, flops,
                              f.compute_dtype, target=raw, kind="raw", format=f.name)
                model = state["layers"][f.name]
                if isinstance(model, Exception):
                    failed(lay, model)
                    continue
                t0 = time.perf_counter()
                tuned = I.tune(model, (x(),))
                tune_s = round(time.perf_counter() - t0, 3)
                layer = model[0]
                mm = self.time("kernels", cf, f.name + "_layer", dt, shape, lambda layer=layer: layer(x()),
                               (wb or 0) + act, flops, f.compute_dtype, target=lay, kind="layer", format=f.name,
                               tune=tuned, tune_s=tune_s)
                lay["path"], lay["tune"] = I.path_taken(layer), tuned
                if mm is not None:
                    mm.extra["path"] = lay["path"]
            for b in state["baselines"]:
                self.time("kernels", cf, b.name, dt, shape, lambda b=b: b.run(x()), b.weight_bytes + act, flops,
                          b.compute_dtype, kind="baseline", peer_of=b.peer_of, note=b.note or None)
            dense_b = self.time("kernels", cb, "dense", dt, shape, lambda: dy() @ w, H.nbytes(w) + act, flops)
            for kernel, fs in self._grad_groups(k).items():
                f, case = fs[0], planned[(fs[0].name, "raw", "input_grad")]
                p = state["packs"][f.name]
                if isinstance(p, Exception):
                    failed(case, p)
                    continue
                self.time("kernels", cb, kernel, dt, shape, lambda f=f, p=p: f.backward(dy(), *p),
                          f.weight_bytes(p) + act, flops, f.compute_dtype, target=case, kind="raw",
                          formats=[g.name for g in fs])
        for dense, op in ((dense_f, "forward"), (dense_b, "input_grad")):
            if dense is None:  # no same-run baseline, no ratio: the cases count as errored, not as missing
                for c in cases:
                    if c["op"] == op and c["status"] == "ok":
                        c.update(status="error", error="the dense baseline of this case failed")

    def run_launch(self, phase, dtype):
        """Host cost per call at a tiny shape: dense, each raw launcher, each dispatched layer."""
        m, k, n = TINY["launch"] if self.tiny else LAUNCH_SHAPE
        dt = dtype_name(dtype)
        w = H.randn(n, k, dtype=dtype, device=self.device, scale=0.02)
        x = H.randn(m, k, dtype=dtype, device=self.device)
        calls = ({"calls": 1, "graph_calls": 1, "replays": 1, "warmup": 1} if self.tiny else
                 {"calls": 200, "graph_calls": 10, "replays": 50, "warmup": 3})
        impls = [("dense", "dense", lambda: (lambda: F.linear(x, w), None))]
        for f in self._compatible(k):
            def raw(f=f):
                p = f.pack(w)
                return (lambda: f.forward(x, *p)), None

            def layer(f=f):
                model = gpu_formats.dispatched_layer(f, w)
                status = I.tune(model, (x,))
                return (lambda: model[0](x)), (model[0], status)
            impls += [(f.name, "raw", raw), (f.name + "_layer", "layer", layer)]

        def one(item):
            name, kind, make = item
            row = {"impl": name, "kind": kind, "dtype": dt, "M": m, "K": k, "N": n}
            try:
                fn, layer = make()
                with torch.no_grad():
                    row.update(H.launch_overhead_us(fn, self.device, **calls))
                if layer is not None:
                    row.update(path=I.path_taken(layer[0]), tune=layer[1])
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            self.launch.append(row)
        phase.run(impls, one, describe=lambda it: f"launch {it[0]} {dt}",
                  on_error=lambda it, e: self.error("launch", it[0], e))

    def start_static(self, shapes, ms, out: Path) -> None:
        """Start the static model's predictions in the background (bench/gpu_static.py), on the CPU
        cores the GPU phases leave idle; :meth:`run_static` collects them."""
        model, reason = I.static_model()
        if model is None:
            self.static["status"] = reason
            return
        modules = sorted({f.forward.__module__.rsplit(".", 1)[-1] for f in self.formats}
                         | {f.backward.__module__.rsplit(".", 1)[-1] for f in self.formats})
        self.static.update(status="running", device=I.static_device(self.rec.env.get("device")), modules=modules)
        self.static_job = gpu_static.start(out, modules, shapes, ms, self.static["device"], self.sm_count)

    def run_static(self, phase):
        if self.static_job is None:
            return
        got = self.static_job.wait(phase.remaining())
        if got["status"] != "ok":
            phase.skip("static model predictions", got["status"])
            self.static["status"] = got["status"]
        elif got.get("unavailable"):
            self.static["status"] = got["unavailable"]
        else:
            self.static.update(status="ok", seconds=got.get("seconds"), predictions=got.get("predictions", []))

    def run_e2e(self, phase, dtype):
        import robcomp as rc
        from robcomp.layers.sizes import model_bytes
        from robcomp.zoo.models import MLP, TinyViT
        dt = dtype_name(dtype)
        if self.tiny:
            models = {"tiny_vit": (lambda: TinyViT(width=64, depth=1, heads=4, patch=2, image_size=8), (1, 8, 8)),
                      "mlp128": (lambda: MLP(width=128, depth=2, in_features=64), (1, 8, 8))}
            batches = TINY["e2e_batches"]
        else:
            models = {"vit_b16": (lambda: TinyViT(width=768, depth=12, heads=12, patch=16, mlp_ratio=4, in_channels=3,
                                                  num_classes=1000, image_size=224), (3, 224, 224)),
                      "mlp4096": (lambda: MLP(width=4096, depth=4, in_features=4096), (1, 64, 64))}
            batches = E2E_BATCHES
        recipes = [f.recipe() for f in self.formats if f.name != "fp8_dynamic" or self.device.type == "cuda"]
        if not any(r.name == "fp8_dynamic" for r in recipes):
            phase.skip("e2e fp8_dynamic", "needs a CUDA GPU with compute capability >= 8.9")
        items = [(name, impl) for name in models for impl in ["dense", *recipes]]
        state = {}

        def one(item):
            name, recipe = item
            build, in_shape = models[name]
            if state.get("name") != name:
                torch.manual_seed(0)
                state.clear()
                state.update(name=name, dense=build().to(self.device, dtype).eval())
            impl = "dense" if recipe == "dense" else recipe.name
            try:
                model = state["dense"] if recipe == "dense" else rc.compress(copy.deepcopy(state["dense"]), recipe).eval()
            except Exception as e:
                self.errors.append({"suite": "e2e", "case": name, "impl": impl, "error": f"{type(e).__name__}: {e}"[:300]})
                return
            mbytes = model_bytes(model)
            for b in batches:
                xb = H.rotating([torch.rand(b, *in_shape, device=self.device).to(dtype) for _ in range(2)])
                tuned = I.tune(model, (xb(),)) if recipe != "dense" else None
                with torch.no_grad():
                    mm = self.time("e2e", f"{name} batch={b}", impl, dt, {"model": name, "batch": b, "input": list(in_shape)},
                                   lambda: model(xb()), mbytes, 0, tune=tuned)
                if mm is not None and recipe != "dense":
                    paths = Counter(str(I.path_taken(mod)) for mod in model.modules() if hasattr(mod, "recipe"))
                    mm.extra["layer_paths"] = dict(paths)
        describe = lambda it: f"e2e {it[0]} {it[1] if it[1] == 'dense' else it[1].name}"  # noqa: E731
        phase.run(items, one, describe=describe, on_error=lambda it, e: self.error("e2e", describe(it), e))

    # -------------------------------------------------------------------------- report
    def filled_cases(self) -> list[dict]:
        """The planned cases with their measured speedup vs dense (same case, same run)."""
        out, index = [], self.rec.index()
        for c in self.cases:
            m = self.case_rows.get(id(c))
            r = self.rec.ratio(m, "dense", index) if m is not None else None
            out.append({**c, "speedup": round(r, 4) if r is not None else None,
                        "ms": round(m.ms, 5) if m is not None else None})
        return out

    def attach_predictions(self, records: list[dict]) -> None:
        """Put each raw kernel's predicted time beside its measurement: a prediction matches when its
        ``op`` is the launcher's name or the format's name."""
        preds = {}
        for p in self.static.get("predictions", []):
            if p.get("predicted_ms") is not None:
                preds.setdefault((p["op"], p["M"], p["K"], p["N"], p["dtype"]), p)
        if not preds:
            return
        names = {}  # (impl, "forward" | "input_grad") -> the op names that predict it
        for f in self.formats:
            names[(f.name, "forward")] = I.predicted_ops(f.name, "forward", f.forward.__name__)
            names.setdefault((f.grad_kernel or f.name, "input_grad"), []).extend(
                I.predicted_ops(f.name, "input_grad", f.backward.__name__))
        for r in records:
            if r.get("kind") != "raw":
                continue
            for op in names.get((r["impl"], r["case"].split()[0]), ()):
                key = (op, r["shape"]["M"], r["shape"]["K"], r["shape"]["N"], r["dtype"])
                if key in preds:
                    p = preds[key]
                    r.update(predicted_op=op, predicted_ms=round(p["predicted_ms"], 5),
                             predicted_ratio_vs_dense=p.get("predicted_ratio_vs_dense"), predicted_bound=p.get("bound"),
                             measured_over_predicted=round(r["ms"] / p["predicted_ms"], 3) if p["predicted_ms"] > 0 else None)
                    break

    def result(self, main_shapes) -> dict:
        records = self.rec.records()
        for r in records:
            if r["suite"] == "e2e" and r["ms"] > 0:
                r["throughput_samples_per_s"] = round(r["shape"]["batch"] / r["ms"] * 1e3, 2)
        self.attach_predictions(records)
        cases = self.filled_cases()
        env = self.rec.env
        cuda = self.device.type == "cuda"
        return {
            "suite": "gpu_suite", "issues": [11, 16], "mode": "tiny" if self.tiny else "gpu",
            "timings_meaningful": cuda and not self.tiny,
            "timing": (f"triton.testing.do_bench median, warmup {self.args.warmup_ms} ms, rep {self.args.rep_ms} ms, "
                       f"L2 flushed before each repetition, activations rotating among {ROTATE} sets" if cuda else
                       "perf_counter around Triton-interpreter kernels on CPU: NOT performance figures"),
            "device": env.get("device"), "driver": env.get("driver"), "torch": env.get("torch"),
            "triton": env.get("triton"), "date": env.get("date"), "environment": env,
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "config": {k: v for k, v in vars(self.args).items()},
            "budget": {"total_s": self.budget.total_s, "elapsed_s": round(self.budget.elapsed(), 1),
                       "exhausted": self.budget.exhausted(), "phases": self.budget.phases},
            "baselines": self.baselines,
            "correctness_passed": all(c["passed"] for c in self.correctness),  # True when none ran
            "correctness": self.correctness,
            "results": records, "cases": cases,
            "targets": gpu_targets.evaluate(cases, self.correctness, main_shapes, [f.name for f in self.formats]),
            "launch_overhead": self.launch,
            "static_model": self.static,
            "skipped": self.budget.skipped, "errors": self.errors,
        }


# ------------------------------------------------------------------------------ output
def print_table(res: dict) -> None:
    def f2(v):
        return "-" if v is None else f"{v:.2f}"
    ok = sum(c["passed"] for c in res["correctness"])
    bad = sorted({f"{c['format']} {c['dtype']} {c['direction']}" for c in res["correctness"] if not c["passed"]})
    print(f"\ncorrectness: {ok}/{len(res['correctness'])} checks passed" + (f"  FAILED: {', '.join(bad)}" if bad else ""))
    if res["launch_overhead"]:
        print(f"\n{'launch overhead (us/call)':<30}{'eager':>9}{'graph':>9}  path")
        for r in res["launch_overhead"]:
            print(f"{r['impl']:<30}{f2(r.get('eager_us')):>9}{f2(r.get('graph_us')):>9}  "
                  f"{r.get('path') or ''}{' ERROR ' + r['error'][:60] if r.get('error') else ''}")
    e2e = [r for r in res["results"] if r["suite"] == "e2e"]
    if e2e:  # one line per model and batch: dense latency, then each recipe's speedup vs dense
        recipes = list(dict.fromkeys(r["impl"] for r in e2e if r["impl"] != "dense"))
        print(f"\n{'end to end':<20}{'dense ms':>9}" + "".join(f"{name[:12]:>13}" for name in recipes))
        for case in dict.fromkeys(r["case"] for r in e2e):
            got = {r["impl"]: r for r in e2e if r["case"] == case}
            dense = got.get("dense", {}).get("ms")
            print(f"{case:<20}{f2(dense):>9}" + "".join(f"{f2(got.get(n, {}).get('speedup_vs_dense')):>13}"
                                                       for n in recipes))
    cases = [c for c in res["cases"] if c["op"] == "forward" and c["dtype"] == res["config"]["dtypes"].split(",")[0]]
    if cases:  # raw kernel / dispatched layer ratio vs dense, per M, on the first shape
        k, n = cases[0]["K"], cases[0]["N"]
        ms = sorted({c["M"] for c in cases if (c["K"], c["N"]) == (k, n)})
        print(f"\nraw/layer vs dense, K={k} N={n} {cases[0]['dtype']}")
        print(f"{'format':<20}" + "".join(f"{'M=' + str(m):>13}" for m in ms))
        for fmt in dict.fromkeys(c["format"] for c in cases):
            def cell(m):
                got = {c["kind"]: c for c in cases if c["format"] == fmt and (c["M"], c["K"], c["N"]) == (m, k, n)}
                return "/".join("ERR" if got.get(kd, {}).get("status") == "error" else f2(got.get(kd, {}).get("speedup"))
                                for kd in ("raw", "layer"))
            print(f"{fmt:<20}" + "".join(f"{cell(m):>13}" for m in ms))
    print(f"\n{'target (fp16, issue shapes)':<44}{'need':>5}{'worst':>7}{'raw':>7}{'layer':>7}{'n':>4}  status; layer paths")
    for t in res["targets"]:
        paths = ",".join(f"{p}:{c}" for p, c in t["layer_paths"].items())
        print(f"{t['format'] + ' ' + t['regime']:<44}{t['target']:>5.2f}{f2(t['worst']):>7}{f2(t['raw_worst']):>7}"
              f"{f2(t['layer_worst']):>7}{t['cases']:>4}  {t['status']}{'; ' + paths if paths else ''}")
    st = res["static_model"]
    with_pred = [r for r in res["results"] if r.get("predicted_ms") is not None]
    print(f"\nstatic model: {st['status']}; {len(st.get('predictions', []))} predictions, "
          f"{len(with_pred)} beside a measured kernel")
    for r in with_pred[:12]:
        print(f"  {r['impl']:<22}{r['case']:<34}{r['ms']:>9.4f} ms measured {r['predicted_ms']:>9.4f} predicted")
    if not res["timings_meaningful"]:
        print("\nNOTE: interpreter/CPU timings: they mean nothing for performance.")
    phases = ", ".join(f"{p['phase']} {p['used_s']}/{p['granted_s']} s" for p in res["budget"]["phases"])
    print(f"\nphases (used/granted): {phases}")
    print(f"{len(res['results'])} figures, {len(res['skipped'])} skipped, {len(res['errors'])} errors, "
          f"{res['budget']['elapsed_s']} s of {res['budget']['total_s']} s")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU + Triton interpreter, tiny shapes (tests)")
    p.add_argument("--out", default=None, help="JSON path (default: <out-dir>/<date>-<device>.json)")
    p.add_argument("--out-dir", default=str(H.RESULTS_DIR), help="directory of the default JSON path")
    p.add_argument("--max-seconds", type=float, default=420.0, help="the whole suite's wall-clock budget")
    p.add_argument("--wheels", default=str(ROOT / ".whl"), help="directory of optional wheels to install first")
    p.add_argument("--dtypes", default="float16,bfloat16", help="the first is the targets' dtype")
    p.add_argument("--phases", default=",".join(PHASES), help="phases to run (setup always runs)")
    p.add_argument("--shapes", default="main,models", help="extra phase's shape sets: main (issue), models (built-in)")
    p.add_argument("--ms", default=None, help="comma-separated M values (default: the target set)")
    p.add_argument("--warmup-ms", type=float, default=10.0)
    p.add_argument("--rep-ms", type=float, default=25.0)
    p.add_argument("--tune-rep-ms", type=float, default=10.0,
                   help="do_bench rep (ms) inside robcomp's Triton autotuners (0: Triton's default)")
    args = p.parse_args(argv)
    if args.max_seconds < 0:
        p.error("--max-seconds must be >= 0")
    unknown = set(args.phases.split(",")) - set(PHASES)
    if unknown:
        p.error(f"--phases: unknown {sorted(unknown)}; choose from {PHASES}")
    return args


def model_linear_shapes(tiny: bool) -> list[tuple[int, int]]:
    """(K, N) of the built-in models' Linear layers that compression touches (no head, no tiny layer),
    plus the ViT-B/16 and 4096-MLP shapes of the end-to-end models (not in tiny mode)."""
    from robcomp.compression.selection import MIN_WEIGHTS
    from robcomp.zoo.models import MLP, TinyViT, build_model
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
        shapes = sorted((s for s in shapes if s[0] % gpu_formats.GROUP == 0), key=lambda s: s[0] * s[1])[:1]
    return shapes


def main(argv=None) -> int:
    args = parse_args(argv)
    phases = set(args.phases.split(","))
    budget = Budget(args.max_seconds, [(name, share * args.max_seconds) for name, share in PLAN
                                       if name == "setup" or name in phases])
    with budget.phase("setup"):
        wheels = install_wheels(args.wheels)
        I.import_robcomp()
        device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            print("no CUDA device: run with --tiny (Triton interpreter) on CPU", file=sys.stderr)
            return 2
        suite = Suite(args, device, budget)  # imports the kernel modules
        if device.type == "cuda" and args.tune_rep_ms > 0:
            fast_autotune(args.tune_rep_ms)
        suite.baselines["wheels"] = wheels
        try:
            import bitsandbytes
            suite.baselines["bitsandbytes"] = f"bitsandbytes {bitsandbytes.__version__}"
        except Exception as e:
            suite.baselines["bitsandbytes"] = "not installed" if isinstance(e, ImportError) else f"import failed: {e}"[:200]
    print(f"[{budget.elapsed():6.1f} s] setup done", flush=True)
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",") if d]
    ms = [int(v) for v in args.ms.split(",")] if args.ms else (TINY["ms"] if args.tiny else MS)
    main_shapes = TINY["shapes"] if args.tiny else MAIN_SHAPES
    out = Path(args.out) if args.out else None

    def save():
        nonlocal out
        res = suite.result(main_shapes)
        if out is None:
            out = Path(args.out_dir) / f"{res['date'][:10]}-{H.device_slug(res)}.json"
        H.atomic_write_json(out, res)
        return res

    suite.checkpoint = save
    if "static" in phases:  # fp16: the static model's dtype
        suite.start_static(main_shapes, TINY["static_ms"] if args.tiny else STATIC_MS,
                           Path(tempfile.mkdtemp(prefix="robcomp-static-")) / "predictions.json")

    def on_term(signum, frame):  # a killed run still writes what it has
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_term)

    def extra(phase):
        for dtype in dtypes[1:]:
            if "main" in args.shapes:
                suite.run_kernels(phase, main_shapes, dtype, ms, "main")
        if "models" in args.shapes:
            for dtype in dtypes:
                suite.run_kernels(phase, model_linear_shapes(args.tiny), dtype, ms, "models")
    work = {
        "ceilings": suite.run_ceilings,
        "correctness": lambda ph: suite.run_checks(ph, dtypes),
        "kernels": lambda ph: suite.run_kernels(ph, main_shapes, dtypes[0], ms, "main"),
        "launch": lambda ph: suite.run_launch(ph, dtypes[0]),
        "static": suite.run_static,
        "e2e": lambda ph: suite.run_e2e(ph, dtypes[0]),
        "extra": extra,
    }
    res = None
    try:
        for name in PHASES:
            if name not in phases:
                continue
            with budget.phase(name) as phase:
                print(f"[{budget.elapsed():6.1f} s] {name}: {phase.info['granted_s']} s granted", flush=True)
                work[name](phase)
            print(f"[{budget.elapsed():6.1f} s] {name} done in {phase.info['used_s']} s", flush=True)
            save()
    finally:
        res = save()
        print_table(res)
        print(f"results written to {out}")
    return 0 if res["correctness_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
