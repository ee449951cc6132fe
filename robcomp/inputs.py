"""Input validation shared by the public entry points (compressed layers, attacks, evaluate):
each check raises ``TypeError``/``ValueError`` naming the argument and what is accepted."""
from __future__ import annotations

import torch

__all__ = ["check_float_input", "check_images", "check_labels", "check_labels_in_range", "check_device", "check_positive_int",
           "restores_training_mode"]


def check_float_input(x: torch.Tensor, where: str) -> None:
    """A layer's input must be floating point: an integer tensor would be silently cast (or
    mis-indexed) by the kernels."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: input must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{where}: input must be a floating-point tensor (float32, float16 or bfloat16), "
                        f"got {x.dtype}; convert images with x.float() / 255 or similar")


def check_images(x: torch.Tensor, name: str = "x") -> None:
    """Images in [0, 1], floating point, finite (NaN compares false against both bounds)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        hint = " (did you pass (y, x) instead of (x, y)?)" if x.dim() == 1 else ""
        raise TypeError(f"{name} must be a floating-point tensor of images in [0, 1], got {x.dtype}{hint}")
    if x.dim() < 2:
        raise ValueError(f"{name} must be a batch [N, ...] of images, got shape {tuple(x.shape)}")
    if x.numel() and not torch.isfinite(x).all():
        raise ValueError(f"{name} holds {int((~torch.isfinite(x)).sum())} NaN or infinite values; "
                         "inputs must be finite and lie in [0, 1]")


def check_labels(y: torch.Tensor, n: int | None = None, name: str = "y") -> None:
    """Class indices: a 1-D integer tensor of non-negative values (``n`` of them, when given)."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of class indices, got {type(y).__name__}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        hint = " (did you pass (y, x) instead of (x, y)?)" if y.dim() > 1 else ""
        raise TypeError(f"{name} must hold integer class indices (int64), got {y.dtype}{hint}; "
                        "use y.long() for integral labels")
    if y.dim() != 1:
        raise ValueError(f"{name} must be 1-D (one class index per example), got shape {tuple(y.shape)}")
    if n is not None and len(y) != n:
        raise ValueError(f"x has {n} examples but {name} has {len(y)}")
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"{name} holds a negative class index ({int(y.min())}); labels are 0 .. classes-1")


def check_labels_in_range(y: torch.Tensor, n_classes: int, name: str = "y") -> None:
    """Labels below the model's number of outputs (checked once the logits are known)."""
    if y.numel() and int(y.max()) >= n_classes:
        raise ValueError(f"{name} holds class index {int(y.max())}, but the model has {n_classes} outputs "
                         f"(labels must be 0 .. {n_classes - 1})")


def check_device(device) -> torch.device:
    """``device`` as a torch.device, refused when this machine cannot run on it."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a device name like 'cpu' or 'cuda:0' ({e})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} but CUDA is not available on this machine "
                             "(torch was built without CUDA or no GPU is visible): use device='cpu' or None")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={str(device)!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device={str(device)!r} but MPS is not available on this machine")
    return device


def restores_training_mode(fn):
    """Decorator for functions that switch ``model`` (first argument) and ``twin`` (keyword) to
    eval mode: the caller's modes are restored on return, as they were."""
    import functools

    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        modules = [m for m in (model, kwargs.get("twin")) if isinstance(m, torch.nn.Module)]
        modes = [{name: m.training for name, m in module.named_modules()} for module in modules]
        try:
            return fn(model, *args, **kwargs)
        finally:
            for module, mode in zip(modules, modes):
                for name, m in module.named_modules():
                    if name in mode:
                        m.training = mode[name]
    return wrapper


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value
