"""bench/gpu_suite.py: the --tiny run on CPU through the Triton interpreter (its timings mean nothing;
the structure is what is tested), and the suite's bookkeeping with injected fakes: the time budget,
"an errored case makes its target unmet", the static-model and tune interfaces."""
import json
import os
import subprocess
import sys
import time
import types
from argparse import Namespace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "bench") not in sys.path:
    sys.path.append(str(ROOT / "bench"))  # appended: tests/ keeps precedence for same-named test modules

import gpu_budget  # noqa: E402
import gpu_interfaces as I  # noqa: E402
import gpu_targets  # noqa: E402
import harness as H  # noqa: E402

FORMATS = {"sparse24", "int8_weight", "int4_g128", "sparse24_int4_g128", "int8_dynamic", "fp8_dynamic"}
# the device image has neither; the suite must run without them
BLOCKED = "import runpy, sys; sys.modules['torch_pruning'] = None; sys.modules['bitsandbytes'] = None; " \
          "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"


@pytest.mark.slow
def test_tiny_suite_json(tmp_path):  # about 20 s on an idle core
    out = tmp_path / "suite.json"
    env = dict(os.environ, TRITON_INTERPRET="1", ROBCOMP_CACHE_DIR=str(tmp_path / "cache"))
    cmd = [sys.executable, "-c", BLOCKED, str(ROOT / "bench" / "gpu_suite.py"), "--tiny", "--out", str(out),
           "--wheels", str(tmp_path / "no-wheels"), "--phases", "ceilings,correctness,kernels,launch,e2e"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["mode"] == "tiny" and res["timings_meaningful"] is False
    assert all(res[k] for k in ("device", "torch", "triton", "date")) and "driver" in res
    assert res["baselines"]["bitsandbytes"] == "not installed"
    # correctness: every format, fp16 and bf16, custom-op forward and input gradient and the dispatched layer
    seen = {(c["format"], c["dtype"], c["direction"]) for c in res["correctness"]}
    assert seen == {(f, d, g) for f in FORMATS for d in ("float16", "bfloat16")
                    for g in ("forward", "input_grad", "layer_forward")}
    assert res["correctness_passed"] and all(c["passed"] for c in res["correctness"])
    # kernels: raw launcher and dispatched layer of every format, each with a same-run ratio vs dense
    cases = res["cases"]
    for fmt in FORMATS:
        for kind in ("raw", "layer"):
            rows = [c for c in cases if c["format"] == fmt and c["kind"] == kind and c["op"] == "forward"]
            assert rows and all(c["status"] == "ok" and c["speedup"] is not None for c in rows), (fmt, kind)
    assert any(c["op"] == "input_grad" and c["status"] == "ok" for c in cases)
    layer_rows = [r for r in res["results"] if r.get("kind") == "layer"]
    assert layer_rows and all("tune" in r for r in layer_rows)
    # peers: tinygemm int4 and _int_mm at M=1 (padded rows) ran and passed their own check
    status = res["baselines"]["status"]["main float16 K=128 N=48"]
    assert status["tinygemm_int4"]["status"] == "ok" and status["int_mm"]["status"] == "ok"
    base = {(r["impl"], r["shape"]["M"]) for r in res["results"] if r.get("kind") == "baseline"}
    assert {("tinygemm_int4", 1), ("int_mm", 1), ("int_mm", 17)} <= base
    # every figure carries dtype and shape, and the roofline fields where the device is known
    assert all(r["dtype"] and r["shape"] for r in res["results"])
    # launch overhead: dense, each raw launcher and each layer, eager; graphs need CUDA
    launch = {r["impl"]: r for r in res["launch_overhead"]}
    assert {"dense"} | FORMATS | {f + "_layer" for f in FORMATS} <= set(launch)
    assert all(r["eager_us"] > 0 and r["graph_us"] is None and r["graph_error"] for r in launch.values())
    assert res["static_model"]["status"] == "not run"  # the static phase compiles SASS: tested with fakes below
    assert {t["format"] for t in res["targets"]} == FORMATS
    assert any(s["what"] == "measured ceilings" for s in res["skipped"])
    phases = [p["phase"] for p in res["budget"]["phases"]]
    assert phases == ["setup", "ceilings", "correctness", "kernels", "launch", "e2e"]
    assert all(p["granted_s"] > 0 for p in res["budget"]["phases"])  # setup time does not eat a phase's share
    e2e = [r for r in res["results"] if r["suite"] == "e2e"]
    assert {r["shape"]["model"] for r in e2e} == {"tiny_vit", "mlp128"}
    assert "target (fp16" in proc.stdout and "mean nothing" in proc.stdout


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_budget_phase_cannot_starve_later_phases():
    clock = FakeClock()
    budget = gpu_budget.Budget(100, [("a", 20), ("b", 50), ("c", 30)], clock=clock)
    a = budget.phase("a")
    assert a.info["granted_s"] == 20  # 100 left, 80 promised to b and c
    ran = []
    # each case takes 15 s: a's second case starts after its deadline and is skipped, not run
    a.run([1, 2, 3], lambda c: (ran.append(c), setattr(clock, "t", clock.t + 15)))
    assert ran == [1, 2] and [s["what"] for s in budget.skipped] == ["3"]
    clock.t = 100 + 30
    b = budget.phase("b")  # 70 left, 30 promised to c: b gets its 50 minus a's overrun
    assert b.info["granted_s"] == 40
    clock.t = 100 + 40
    c = budget.phase("c")  # b stopped early: c gets its share plus b's leftover
    assert c.info["granted_s"] == 60
    with pytest.raises(ValueError, match="not in the plan"):
        budget.phase("d")
    with pytest.raises(ValueError, match="total_s"):
        gpu_budget.Budget(-1)


def test_budget_skips_what_a_phase_did_not_reach_and_contains_errors():
    clock = FakeClock()
    budget = gpu_budget.Budget(10, [("only", 10)], clock=clock)
    phase = budget.phase("only")
    marked, errors = [], []

    def one(c):
        if c == "bad":
            raise RuntimeError("broken case")
        clock.t += 11
    phase.run(["bad", "ok", "late", "later"], one, on_skip=marked.append, on_error=lambda c, e: errors.append((c, str(e))))
    assert errors == [("bad", "broken case")]
    assert marked == ["late", "later"] and phase.info["cases_skipped"] == 2
    with pytest.raises(RuntimeError):  # without on_error an exception is not swallowed
        gpu_budget.Budget(10, [("only", 10)], clock=clock).phase("only").run(["bad"], one)


def test_hard_deadline_interrupts_a_running_case():
    budget = gpu_budget.Budget(0.3, [("correctness", 0.3)])
    phase = budget.phase("correctness")
    seen = []

    def slow(c):
        try:
            t0 = time.monotonic()
            while time.monotonic() - t0 < 5:
                pass
        except Exception:  # a case's own broad except must not swallow the interruption
            seen.append("swallowed")
    t0 = time.monotonic()
    phase.run(["stuck", "next"], slow, hard=True)
    assert time.monotonic() - t0 < 2 and not seen
    assert [(s["what"], s["reason"].split()[0]) for s in budget.skipped] == [("stuck", "interrupted"), ("next", "time")]


def _cases(speedups, fmt="int4_g128", kind="raw", m=1):
    return [{"format": fmt, "kind": kind, "op": "forward", "dtype": "float16", "M": m, "K": 4096, "N": 4096,
             "status": "ok" if s is not None else "error", "speedup": s} for s in speedups]


def _target(rows, fmt, regime):
    return next(t for t in rows if t["format"] == fmt and t["regime"] == regime)


def test_errored_case_makes_its_target_unmet():
    shapes, fmts = [(4096, 4096)], ["int4_g128"]
    good = _cases([3.5, 3.2])
    met = _target(gpu_targets.evaluate(good, [], shapes, fmts), "int4_g128", "M<=16")
    assert met["met"] is True and met["worst"] == 3.2 and met["status"] == "met"
    # the same ratios plus one case that errored: the error does not vanish, the target is unmet
    rows = gpu_targets.evaluate(good + _cases([None]), [], shapes, fmts)
    unmet = _target(rows, "int4_g128", "M<=16")
    assert unmet["met"] is False and "errored" in unmet["status"] and unmet["worst"] == 3.2
    # a skipped case leaves it incomplete; a failed correctness check makes it unmet
    skipped = good + [dict(_cases([1.0])[0], status="skipped", speedup=None)]
    assert _target(gpu_targets.evaluate(skipped, [], shapes, fmts), "int4_g128", "M<=16")["met"] is None
    bad = [{"format": "int4_g128", "dtype": "float16", "passed": False}]
    assert _target(gpu_targets.evaluate(good, bad, shapes, fmts), "int4_g128", "M<=16")["met"] is False
    # large M is judged on the dispatched layer, with the raw kernel's ratio beside it
    big = _cases([0.5], m=4096) + [dict(c, path="dense") for c in _cases([1.01], kind="layer", m=4096)]
    row = _target(gpu_targets.evaluate(big, [], shapes, fmts), "int4_g128", "M>=2048")
    assert row["met"] is True and row["raw_worst"] == 0.5 and row["layer_worst"] == 1.01
    assert row["layer_paths"] == {"dense": 1}
    assert _target(gpu_targets.evaluate(_cases([1.0]), [], shapes, fmts), "int4_g128", "M<=16")["met"] is False


def _suite(**kw):
    import gpu_suite
    args = Namespace(tiny=True, warmup_ms=1, rep_ms=1, max_seconds=10)
    budget = gpu_budget.Budget(10, [(name, 1) for name, _ in gpu_suite.PLAN])
    return gpu_suite, gpu_suite.Suite(args, torch.device("cpu"), budget, fmts=kw.get("fmts", []))


def test_suite_records_a_failed_timing_as_an_errored_case():
    _, suite = _suite()
    ok = suite.plan_case("int8_weight", "raw", "forward", "float16", 1, 64, 64)
    bad = suite.plan_case("int8_weight", "raw", "forward", "float16", 2, 64, 64)
    x = torch.randn(4, 64)
    for m in (1, 2):
        suite.time("kernels", f"forward M={m} K=64 N=64", "dense", "float16", {"M": m}, lambda: x @ x.T)
    suite.time("kernels", "forward M=1 K=64 N=64", "int8_weight", "float16", {"M": 1}, lambda: x @ x.T, target=ok)

    def broken():
        raise RuntimeError("kernel launch failed")
    assert suite.time("kernels", "forward M=2 K=64 N=64", "int8_weight", "float16", {"M": 2}, broken, target=bad) is None
    cases = suite.filled_cases()
    assert [c["status"] for c in cases] == ["ok", "error"] and cases[0]["speedup"] is not None
    assert "kernel launch failed" in cases[1]["error"] and suite.errors
    row = _target(gpu_targets.evaluate(cases, [], [(64, 64)], ["int8_weight"]), "int8_weight", "M<=16")
    assert row["met"] is False and "1 case(s) errored" in row["status"]


def test_static_model_predictions_beside_measurements(monkeypatch):
    import gpu_formats
    import gpu_static

    def fake_forward(x, *p):
        return x

    def fake_backward(dy, *p):
        return dy
    fmt = gpu_formats.Format("fakefmt", None, fake_forward, None, fake_backward, None, None, 10.0)
    kernels = types.SimpleNamespace(perf_cases=lambda m, n, k, dtype, sm: [
        {"op": "fakefmt.forward", "launches": 1, "bytes": 2 * n * k, "flops": 2 * m * n * k, "candidates": []},
        {"op": "fakefmt_backward_input", "launches": 1, "bytes": 2 * n * k, "flops": 2 * m * n * k, "candidates": []}])
    seen = []

    def predict(case, device):
        seen.append((case["op"], case["module"], case["m"], case["n"], case["k"], device))
        return {"time_us": 12.5, "bound": "memory", "ratio_vs_dense": 1.7, "candidates": [{"big": 1}]}
    model = types.SimpleNamespace(predict=predict)
    rows = gpu_static.predictions(model, {"fake": kernels, "bare": types.SimpleNamespace()}, [(64, 32)], [1],
                                  torch.float16, 132, "h200")
    assert seen == [("fakefmt.forward", "fake", 1, 32, 64, "h200"), ("fakefmt_backward_input", "fake", 1, 32, 64, "h200")]
    assert [r.get("error") for r in rows] == [None, None, "no perf_cases in this module"]
    assert rows[0]["predicted_ms"] == 0.0125 and "candidates" not in rows[0]["prediction"]
    _, suite = _suite(fmts=[fmt])
    suite.static.update(status="ok", predictions=rows)
    x = torch.randn(1, 64)
    shape = {"M": 1, "K": 64, "N": 32}
    for case in ("forward", "input_grad"):
        suite.time("kernels", f"{case} M=1 K=64 N=32", "dense", "float16", shape, lambda: x + 1)
        suite.time("kernels", f"{case} M=1 K=64 N=32", "fakefmt", "float16", shape, lambda: x + 1, kind="raw")
    records = suite.rec.records()
    suite.attach_predictions(records)
    raw = [r for r in records if r["impl"] == "fakefmt"]
    assert [r["predicted_op"] for r in raw] == ["fakefmt.forward", "fakefmt_backward_input"]
    assert raw[0]["predicted_ms"] == 0.0125 and raw[0]["predicted_ratio_vs_dense"] == 1.7
    assert raw[0]["measured_over_predicted"] > 0
    # absent module: a recorded state, not a failure
    monkeypatch.setitem(sys.modules, "static_model", None)
    assert I.static_model()[0] is None and I.static_model()[1].startswith("static model unavailable")


def test_static_background_job_is_collected_or_stopped(tmp_path):
    import gpu_static
    out = tmp_path / "p.json"
    code = f"import json; json.dump({{'predictions': [1]}}, open({str(out)!r}, 'w'))"
    done = gpu_static.Background([sys.executable, "-c", code], out).wait(60)
    assert done["status"] == "ok" and done["predictions"] == [1]
    slow = gpu_static.Background([sys.executable, "-c", "import time; time.sleep(30)"], tmp_path / "q.json")
    t0 = time.monotonic()
    got = slow.wait(0.5)
    assert "did not finish" in got["status"] and time.monotonic() - t0 < 10 and slow.proc.poll() is not None
    failed = gpu_static.Background([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "r.json").wait(60)
    assert failed["status"].startswith("static model failed (exit 3)")


def test_tune_and_path_interfaces(monkeypatch):
    import robcomp
    seen = []
    monkeypatch.setattr(robcomp, "tune", lambda model, example_inputs: seen.append(example_inputs), raising=False)
    layer = types.SimpleNamespace(last_path="triton_gemv")
    assert I.tune(layer, (1,)) == "tuned" and seen == [(1,)]
    assert I.path_taken(layer) == "triton_gemv" and I.path_taken(object()) is None

    def broken(model, example_inputs):
        raise RuntimeError("no candidates")
    monkeypatch.setattr(robcomp, "tune", broken)
    assert I.tune(layer, (1,)).startswith("tune failed: RuntimeError: no candidates")
    assert I.predicted_ms({"time_s": 2e-6}) == pytest.approx(2e-3) and I.predicted_ms({"bound": "x"}) is None
    assert I.static_device("NVIDIA H200") == "h200" and I.static_device("NVIDIA H100 80GB HBM3") == "h100"


def test_harness_peaks_per_dtype_and_launch_overhead_on_cpu():
    peaks = H.peaks_by_dtype("NVIDIA H200")
    assert peaks["hbm_gbps"] == 4800 and peaks["bfloat16"] == 989 and peaks["int8"] == peaks["float8"] == 1978
    assert H.peaks_by_dtype("NVIDIA A100-SXM4-80GB")["float8"] is None and H.peaks_by_dtype("unknown") is None
    m = H.Measurement("k", "c", "int8_dynamic", "float16", {}, ms=1.0, bytes=4_800_000_000, flops=int(989e9),
                      compute_dtype="int8")
    d = m.as_dict({"peaks": peaks})
    assert d["roofline_bw_pct"] == 100.0 and d["roofline_compute_pct"] == 50.0
    out = H.launch_overhead_us(lambda: torch.ones(2).sum(), "cpu", calls=5, warmup=1)
    assert out["eager_us"] > 0 and out["graph_us"] is None and "CUDA" in out["graph_error"]
