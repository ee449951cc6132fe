"""Compressed layers: the modules that store packed weights and run the kernels (``linear``), the conv
wrappers (``conv``), the choice of backend and per-shape path (``backend``, ``dispatch``, ``tuning``).
Below compression; above ``robcomp.kernels`` and ``robcomp.recipes``.
"""
