"""Compression: ``compress(model, recipes)`` and the handlers that carry out each recipe (layer swap,
channel pruning, masks, permutation search), the layer selection rules. Above ``robcomp.layers``.
"""
