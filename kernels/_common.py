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


def check_tensor(t, name: str, dtypes: tuple, shape=None, device=None) -> None:
    """Type, dtype, shape, device and contiguity of a packed-weight tensor, errors naming ``name``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; expected {' or '.join(str(d) for d in dtypes)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (the packed weight's device)")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def check_bias(bias, n: int, device) -> None:
    if bias is not None:
        check_tensor(bias, "bias", FLOAT_DTYPES, (n,), device)


def check_nonempty(x: torch.Tensor, name: str = "x") -> None:
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}): expected at least one token")


def check_group(group_size, k: int) -> None:
    """int4 groups: a power of two >= 32 (a tile's BLOCK_K must divide it) dividing ``k``."""
    if not isinstance(group_size, int) or group_size < 32 or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two >= 32 (32, 64 or 128), got {group_size!r}")
    if k % group_size:
        raise ValueError(f"group_size={group_size} does not divide in_features={k}")


def rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x [..., k]`` as 2-D rows with unit stride along ``k`` (copying only when needed)."""
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < k):
        x2 = x2.contiguous()
    return x2
