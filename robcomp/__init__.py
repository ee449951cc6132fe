"""robcomp: compressed neural networks that are really faster, with their accuracy and adversarial
robustness measured in the same run."""
__version__ = "0.1.0"

from robcomp import attacks  # noqa: E402
from robcomp.compress import compress  # noqa: E402
from robcomp.evaluate import evaluate  # noqa: E402
from robcomp.recipes import (ChannelPrune, FP8Dynamic, Int4WeightOnly, Int8Dynamic, Int8WeightOnly,  # noqa: E402
                             MagnitudePrune, Recipe, Sparse24, Sparse24Int4)
from robcomp.serialize import load, save  # noqa: E402
from robcomp.tuning import tune  # noqa: E402

__all__ = ["compress", "save", "load", "evaluate", "tune", "attacks", "Recipe", "Sparse24", "Int8WeightOnly", "Int4WeightOnly",
           "Int8Dynamic", "FP8Dynamic", "Sparse24Int4", "ChannelPrune", "MagnitudePrune"]
