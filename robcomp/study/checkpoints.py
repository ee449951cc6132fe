"""On-disk cache of trained checkpoints, keyed by a hash of everything that determines them.

Location: ``robcomp._io.cache_dir()/checkpoints`` ($ROBCOMP_CACHE_DIR, else $XDG_CACHE_HOME/robcomp, else
~/.cache/robcomp). Entries are
safetensors files written atomically (temporary file + rename), so an interrupted run never
leaves a truncated checkpoint behind.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

import torch.nn as nn
from safetensors.torch import load_file, save_file

from robcomp._io import atomic_path, cache_dir

__all__ = ["config_key", "cached_state"]


def config_key(config: dict[str, Any]) -> str:
    """Stable hash of a JSON-serialisable configuration."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def cached_state(model: nn.Module, config: dict[str, Any], fit: Callable[[nn.Module], nn.Module],
                 *, enabled: bool = True) -> tuple[nn.Module, bool]:
    """Load ``model``'s weights from the cache entry for ``config``, or ``fit`` it and store them.

    Returns ``(model, hit)``. ``model`` must be freshly built (same architecture as cached).
    """
    path = cache_dir() / "checkpoints" / f"{config_key(config)}.safetensors"
    if enabled and path.exists():
        model.load_state_dict(load_file(str(path)))
        return model.eval(), True
    model = fit(model)
    if enabled:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(state, tmp, metadata={"config": json.dumps(config, sort_keys=True, default=str)})
    return model.eval(), False
