"""The GPU suite's static-model phase: bench/static_model.py's predictions for every op the suite's
kernel modules launch (their ``perf_cases``), at the suite's shapes.

Predicting needs no GPU but compiles kernels to SASS (seconds of CPU each, in forked workers,
which must not be forked from a process that has initialised CUDA). So the suite starts this file
as a background process at setup (``CUDA_VISIBLE_DEVICES`` empty: it never touches the GPU), lets
it run on the idle CPU cores while the GPU phases run, and collects its JSON in the ``static``
phase; if it has not finished within that phase's share, it is stopped and the phase says so.

    python bench/gpu_static.py --out P.json --modules sparse24,lowbit --shapes 4096x4096 --ms 1,16 --device h200
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_interfaces as I  # noqa: E402


def predictions(model, modules: dict, shapes, ms, dtype, sm_count: int, device: str) -> list[dict]:
    """One row per (module, op, M, K, N): the prediction (``predicted_ms``) or why there is none.
    ``modules``: short name ("lowbit") -> kernel module."""
    rows = []
    for k, n in shapes:
        for m in ms:
            for name, mod in modules.items():
                base = {"module": name, "M": m, "K": k, "N": n, "dtype": str(dtype).replace("torch.", "")}
                try:
                    cases = I.perf_cases(mod, m, n, k, dtype, sm_count)
                except Exception as e:
                    rows.append({**base, "error": f"perf_cases: {type(e).__name__}: {e}"[:300]})
                    continue
                if cases is None:
                    rows.append({**base, "error": "no perf_cases in this module"})
                    continue
                for case in cases:
                    row = {**base, "op": case.get("op")}
                    try:
                        pred = I.predict(model, {**case, "module": name, "m": m, "n": n, "k": k}, device)
                        row.update(predicted_ms=I.predicted_ms(pred), predicted_ratio_vs_dense=pred.get("ratio_vs_dense"),
                                   bound=pred.get("bound"), prediction={key: v for key, v in pred.items()
                                                                        if key != "candidates"})
                    except Exception as e:
                        row["error"] = f"predict: {type(e).__name__}: {e}"[:300]
                    rows.append(row)
    return rows


class Background:
    """A child process that writes a JSON file; :meth:`wait` collects it or stops the child."""

    def __init__(self, cmd: list[str], out: Path, env: dict | None = None):
        self.out, self.t0 = Path(out), time.monotonic()
        self.log = self.out.with_suffix(".log")
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    def wait(self, seconds: float) -> dict:
        """``{"status": "ok", ...JSON}``, or ``{"status": <why not>}`` after at most ``seconds``."""
        try:
            rc = self.proc.wait(timeout=max(0.0, seconds))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return {"status": f"static model did not finish within its share ({time.monotonic() - self.t0:.0f} s "
                              "after it started); stopped"}
        if rc != 0 or not self.out.exists():
            tail = self.log.read_text(errors="replace")[-500:] if self.log.exists() else ""
            return {"status": f"static model failed (exit {rc}): {tail}"}
        return {"status": "ok", "seconds": round(time.monotonic() - self.t0, 1), **json.loads(self.out.read_text())}


def start(out: Path, modules: list[str], shapes, ms, device: str, sm_count: int) -> Background:
    """Start this file in the background without the GPU and without the Triton interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--modules", ",".join(modules),
           "--shapes", ",".join(f"{k}x{n}" for k, n in shapes), "--ms", ",".join(map(str, ms)),
           "--device", device, "--sm-count", str(sm_count)]
    return Background(cmd, out, env)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="static-model predictions for the GPU suite")
    p.add_argument("--out", required=True)
    p.add_argument("--modules", required=True, help="comma-separated robcomp.kernels module names")
    p.add_argument("--shapes", required=True, help="comma-separated KxN")
    p.add_argument("--ms", required=True)
    p.add_argument("--device", default="h100")
    p.add_argument("--sm-count", type=int, default=132)
    args = p.parse_args(argv)
    import torch

    import harness as H
    I.import_robcomp()
    model, reason = I.static_model()
    if model is None:
        H.atomic_write_json(args.out, {"unavailable": reason, "predictions": []})
        return 0
    modules = {name: importlib.import_module(f"robcomp.kernels.{name}") for name in args.modules.split(",")}
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows = predictions(model, modules, shapes, [int(m) for m in args.ms.split(",")], torch.float16,
                       args.sm_count, args.device)
    H.atomic_write_json(args.out, {"device": args.device, "predictions": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
