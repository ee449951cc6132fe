"""Which implementation runs a compressed layer: the dispatched fast path, the torch reference,
Triton kernels, robcomp's CPU kernels, or a peer library."""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "torch", "triton", "cpu", "bitsandbytes", "cusparselt")
ENV_VAR = "ROBCOMP_BACKEND"


def validate_backend(backend: str, argument: str = "backend") -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{argument} must be one of {BACKENDS}, got {backend!r}")
    return backend


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when the triton package imports (the GPU or the interpreter can run kernels)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend a layer runs with: ``$ROBCOMP_BACKEND`` replaces ``"auto"`` when it is set;
    ``"auto"`` itself means the dispatched path (``robcomp.layers.dispatch``: the choice recorded by
    ``robcomp.tune`` for this device, dtype and shape, else the device's static default).
    Explicit backends are returned unchanged."""
    if backend != "auto":
        return backend
    env = os.environ.get(ENV_VAR, "").strip()
    if env and env != "auto":
        return validate_backend(env, argument=f"${ENV_VAR}")
    return "auto"
