"""robcomp: compressed neural networks that are really faster, with their accuracy and adversarial
robustness measured in the same run."""
from robcomp.recipes import (ChannelPrune, FP8Dynamic, Int4WeightOnly, Int8Dynamic, Int8WeightOnly,
                             MagnitudePrune, Recipe, Sparse24, Sparse24Int4)

__version__ = "0.1.0"
