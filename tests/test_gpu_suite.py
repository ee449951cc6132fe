"""bench/gpu_suite.py --tiny: the GPU suite's correctness checks, timings and JSON, run on CPU through
the Triton interpreter in a subprocess (its timings mean nothing; the structure is what is tested)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORMATS = {"sparse24", "int8_weight", "int4_g128", "sparse24_int4_g128", "int8_dynamic", "fp8_dynamic"}


def _run(tmp_path, *extra):
    out = tmp_path / "suite.json"
    env = dict(os.environ, TRITON_INTERPRET="1", ROBCOMP_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--tiny", "--out", str(out),
                           "--wheels", str(tmp_path / "no-wheels"), *extra],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow
def test_tiny_suite_json(tmp_path):
    res, stdout = _run(tmp_path)
    for key in ("device", "driver", "torch", "triton", "date", "environment", "results", "targets", "correctness"):
        assert key in res
    assert res["mode"] == "tiny" and res["timings_meaningful"] is False
    assert res["torch"] and res["triton"] and res["date"] and res["device"]
    # every format checked, forward and input gradient, fp16 and bf16, and every check passed
    seen = {(c["format"], c["dtype"], c["direction"]) for c in res["correctness"]}
    assert seen == {(f, d, g) for f in FORMATS for d in ("float16", "bfloat16") for g in ("forward", "input_grad")}
    assert res["correctness_passed"] and all(c["passed"] for c in res["correctness"])
    # kernel timings: every format's forward against dense, with its ratio from the same run
    kernels = [r for r in res["results"] if r["suite"] == "kernels"]
    for fmt in FORMATS:
        rows = [r for r in kernels if r["impl"] == fmt and r["case"].startswith("forward")]
        assert rows and all(r["ms"] > 0 and r.get("speedup_vs_dense") is not None for r in rows), fmt
    assert any(r["impl"] == "dense" and r["case"].startswith("input_grad") for r in kernels)
    assert {"M", "K", "N"} <= set(kernels[0]["shape"])
    # end to end: dense and each recipe on both models
    e2e = [r for r in res["results"] if r["suite"] == "e2e"]
    assert {r["shape"]["model"] for r in e2e} == {"tiny_vit", "mlp128"}
    assert all(r.get("throughput_samples_per_s", 0) > 0 for r in e2e)
    assert all("speedup_vs_dense" in r for r in e2e if r["impl"] != "dense")
    assert {t["format"] for t in res["targets"]} == set(FORMATS)
    assert "target (fp16" in stdout and "mean nothing" in stdout


@pytest.mark.slow
def test_time_budget_still_writes(tmp_path):
    res, _ = _run(tmp_path, "--max-seconds", "0", "--phases", "kernels")
    assert res["budget_exhausted"] and res["results"] == [] and res["skipped"]
