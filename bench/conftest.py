"""Benchmark configuration. Without a GPU the Triton kernels run in the interpreter, which must be
switched on before triton is imported; a session-scoped ``recorder`` (bench/harness.py) collects
the measurements and writes them under bench/results/ (on CUDA, or with ROBCOMP_BENCH_SAVE=1)."""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("ROBCOMP_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "robcomp"))
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import pytest  # noqa: E402

from bench.harness import Recorder  # noqa: E402


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def recorder(device, request):
    rec = Recorder(device)
    yield rec
    save = device.type == "cuda" or os.environ.get("ROBCOMP_BENCH_SAVE", "0") not in ("", "0")
    if save and not request.config.getoption("benchmark_disable", False):
        for suite in sorted({m.suite for m in rec.rows}):
            path = rec.save(suite)
            if path is not None:
                print(f"\nbenchmark results written to {path}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
