"""Which implementation runs a compressed layer: the torch reference, Triton kernels, or a peer library."""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "torch", "triton", "bitsandbytes", "cusparselt")
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
    """Turn ``"auto"`` into a concrete backend for ``device``.

    ``auto`` means: the value of $ROBCOMP_BACKEND when set, else Triton on CUDA and the torch
    reference everywhere else. Explicit backends are returned unchanged.
    """
    if backend != "auto":
        return backend
    env = os.environ.get(ENV_VAR, "").strip()
    if env and env != "auto":
        return validate_backend(env, argument=f"${ENV_VAR}")
    if device.type == "cuda" and triton_available():
        return "triton"
    return "torch"
