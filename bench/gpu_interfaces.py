"""The GPU suite's only contact points with the rest of the library, one small function each, so
that a renamed function or attribute is a one-line fix here:

* ``robcomp.tune(model, example_inputs)``: the explicit, recorded dispatch step, run on
  a layer or model before its dispatched path is timed; :func:`tune`.
* ``layer.last_path``: which implementation a compressed layer's last forward ran; :func:`path_taken`.
* ``perf_cases(m, n, k, dtype, sm_count) -> list[dict]`` of each kernel module (keys ``op``,
  ``launches``, ``bytes``, ``flops``, ``candidates``); :func:`perf_cases`.
* ``bench/static_model.py``'s ``predict(op_case, device="h100"|"h200") -> dict``; :func:`static_model`,
  :func:`predict`, :func:`predicted_ms` and :func:`predicted_ops` (which op names match a format).
* importing robcomp from this checkout without putting its root on sys.path; :func:`import_robcomp`.

Each returns a value or a reason; none raises when the other side is absent.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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


def tune(model, example_inputs: tuple) -> str:
    """Run ``robcomp.tune(model, example_inputs)``; returns ``"tuned"`` or why it did not run."""
    import robcomp
    try:
        robcomp.tune(model, example_inputs)
    except Exception as e:  # a failed tune is recorded; the layer still runs its default path
        return f"tune failed: {type(e).__name__}: {e}"[:300]
    return "tuned"


def path_taken(layer) -> str | None:
    """The implementation the layer's last forward ran (``layer.last_path``), None if not recorded."""
    path = getattr(layer, "last_path", None)
    return None if path is None else str(path)


def perf_cases(module, m: int, n: int, k: int, dtype, sm_count: int) -> list[dict] | None:
    """``module.perf_cases(...)`` where the kernel module has it, else None."""
    fn = getattr(module, "perf_cases", None)
    return None if fn is None else list(fn(m, n, k, dtype, sm_count))


def static_model():
    """(module, None) when bench/static_model.py imports, else (None, reason). The module is
    absent on branches without it, and unusable where the compiler tools it reads are missing:
    both are real states, recorded as "static model unavailable"."""
    try:
        return importlib.import_module("static_model"), None
    except ModuleNotFoundError as e:
        if e.name == "static_model":
            return None, "static model unavailable: bench/static_model.py is absent"
        return None, f"static model unavailable: {e}"
    except Exception as e:
        return None, f"static model unavailable: import failed: {type(e).__name__}: {e}"[:300]


def predict(model, op_case: dict, device: str) -> dict:
    """``model.predict(op_case, device=device)``; ``op_case`` is a ``perf_cases`` dict tagged with
    ``module`` (short name), ``m``, ``n``, ``k``."""
    return dict(model.predict(op_case, device=device))


def predicted_ops(fmt: str, direction: str, launcher: str) -> list[str]:
    """The ``perf_cases`` op names that describe a format's forward / input gradient: the
    ``<format>.forward`` and ``<format>_forward`` spellings (``backward_input`` likewise), then the
    launcher's own name."""
    verb = "forward" if direction == "forward" else "backward_input"
    return [f"{fmt}.{verb}", f"{fmt}_{verb}", launcher]


def predicted_ms(prediction: dict) -> float | None:
    """The predicted time in milliseconds, from whichever time key the prediction carries."""
    for key, scale in (("ms", 1.0), ("time_ms", 1.0), ("predicted_ms", 1.0), ("us", 1e-3), ("time_us", 1e-3),
                       ("time_s", 1e3), ("seconds", 1e3)):
        value = prediction.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value) * scale
    return None


def static_device(device_name: str | None) -> str:
    """The static model's device key for a device name ("h200" for an H200, else "h100")."""
    return "h200" if device_name and "H200" in device_name.upper() else "h100"
