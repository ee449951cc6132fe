"""Error measures and per-dtype bounds shared by the kernel tests (compared against float64).

The measures live in bench/harness.py, where the GPU suite's correctness phase uses the same ones;
this module re-exports them for the tests and adds the tests' own odd output width."""
import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)  # appended: an installed package of the same name still wins

import numpy as np  # noqa: E402

from bench.harness import TOL, rel_err, sqnr_db  # noqa: E402

__all__ = ["TOL", "N_ODD", "rel_err", "sqnr_db", "PoisonedNumpy"]

#: an output width that is no tile multiple
N_ODD = 37


class PoisonedNumpy:
    """numpy, except that ``empty`` returns NaN (floats) or the most negative integer: a kernel
    that leaves part of its output unwritten fails the comparison (monkeypatch a module's ``np``)."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def empty(shape, dtype=float):
        dtype = np.dtype(dtype)
        fill = np.nan if dtype.kind == "f" else np.iinfo(dtype).min if dtype.kind == "i" else np.iinfo(dtype).max
        return np.full(shape, fill, dtype)
