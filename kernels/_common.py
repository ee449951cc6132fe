"""Helpers shared by the kernel launchers: interpreter detection, autotune configs, input checks."""
from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def tuning_configs(configs: list, interpreter_config=None) -> list:
    """Autotune over ``configs`` on a GPU; a single config under the interpreter (tuning is slow
    there and its timings mean nothing)."""
    if interpreting():
        return [interpreter_config if interpreter_config is not None else configs[0]]
    return configs


def check_activation(x: torch.Tensor, in_features: int, weight_device: torch.device,
                     dtypes: tuple = FLOAT_DTYPES, name: str = "x") -> None:
    """Validate an activation tensor against a packed weight with a message naming ``name``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {x.dtype}; supported: {', '.join(str(d) for d in dtypes)}")
    if x.shape[-1] != in_features:
        raise ValueError(f"{name} has last dimension {x.shape[-1]}, expected in_features={in_features}")
    if x.device != weight_device:
        raise ValueError(f"{name} is on {x.device} but the packed weight is on {weight_device}")
    if x.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"{name} is on {x.device}: Triton kernels need a CUDA device "
                           "(or TRITON_INTERPRET=1 for the CPU interpreter)")
