"""Error measures and per-dtype bounds shared by the kernel tests (compared against float64)."""
import math

import torch

#: largest relative error (max |err| / max |ref|) accepted per activation dtype
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-5}
#: an output width that is no tile multiple
N_ODD = 37


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def sqnr_db(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio of ``y`` against ``ref``, in dB."""
    y, ref = y.double(), ref.double()
    return 10 * math.log10(ref.pow(2).sum().item() / max((y - ref).pow(2).sum().item(), 1e-300))
