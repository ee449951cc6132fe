"""robcomp's Triton kernels and their plain-PyTorch reference (installed as ``robcomp.kernels``)."""
