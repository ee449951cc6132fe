"""robcomp: compressed neural networks that are really faster, with their accuracy and adversarial
robustness measured in the same run.

The public names are imported on first use (PEP 562), so ``import robcomp`` and the command
line's ``--help`` / ``--version`` do not pay for importing torch.
"""
import importlib

from robcomp._version import __version__  # noqa: F401  (public)

_LAZY = {
    "compress": ("robcomp.compression.compress", "compress"),
    "evaluate": ("robcomp.evaluation.evaluate", "evaluate"),
    "save": ("robcomp.serialize", "save"),
    "load": ("robcomp.serialize", "load"),
    "tune": ("robcomp.layers.tuning", "tune"),
    "attacks": ("robcomp.attacks", None),
    **{name: ("robcomp.recipes", name) for name in (
        "Recipe", "Sparse24", "Int8WeightOnly", "Int4WeightOnly", "Int8Dynamic", "FP8Dynamic", "Sparse24Int4",
        "ChannelPrune", "MagnitudePrune")},
}


__all__ = ["compress", "save", "load", "evaluate", "tune", "attacks", "Recipe", "Sparse24", "Int8WeightOnly", "Int4WeightOnly",
           "Int8Dynamic", "FP8Dynamic", "Sparse24Int4", "ChannelPrune", "MagnitudePrune"]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'robcomp' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
