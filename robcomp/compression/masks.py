"""Weight masks for research baselines: unstructured magnitude pruning and N:M (2:4, 4:8) masks.

A mask is attached as a ``torch.nn.utils.parametrize`` parametrization of ``weight``: the module
keeps its dense weight (``parametrizations.weight.original``) and a boolean buffer
(``parametrizations.weight.0.mask``), and ``module.weight`` is ``original * mask``. Gradients of
the masked-out entries are zero, so training with the mask in place (masked fine-tuning) keeps the
sparsity pattern. Storage and compute stay dense: unstructured masks give **no speedup** (the
compression summary says so). N:M masks with N:M = 2:4 are the exception: after masked
fine-tuning, ``compress(model, Sparse24())`` packs the masked weights into real 2:4 layers
(``robcomp.compression.compress.pack_nm`` does the same for exactly the masked layers).

Masks, like every parametrization, survive ``robcomp.save``/``robcomp.load``.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from robcomp.compression.registry import HandlerContext, register_handler
from robcomp.compression.selection import classifier_head
from robcomp.layers.linear import tensor_bytes
from robcomp.recipes import MagnitudePrune
from robcomp.summary import LayerReport

__all__ = ["WeightMask", "magnitude_masks", "nm_mask", "apply_masks", "apply_nm_masks", "remove_masks",
           "masked_modules", "mask_sparsity", "prunable_layers", "magnitude_prune"]

FilterFn = Callable[[nn.Module, str], bool]


class WeightMask(nn.Module):
    """Parametrization ``weight -> weight * mask`` with a fixed boolean mask buffer."""

    def __init__(self, mask: torch.Tensor, pattern: str = "unstructured") -> None:
        super().__init__()
        self.register_buffer("mask", mask.detach().to(torch.bool).clone())
        self.pattern = pattern

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask.to(weight.dtype)

    def extra_repr(self) -> str:
        return f"pattern={self.pattern}, sparsity={1 - self.mask.float().mean().item():.3f}"


def _is_masked(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module, "weight") and any(
        isinstance(p, WeightMask) for p in module.parametrizations.weight)


def masked_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` of every module whose weight carries a ``WeightMask``."""
    return {n: m for n, m in model.named_modules() if _is_masked(m)}


def prunable_layers(model: nn.Module, filter_fn: FilterFn | None = None, *,
                    skip_head: bool = True) -> dict[str, nn.Module]:
    """Linear and Conv2d layers to mask: all of them but the classifier head (the last Linear)
    unless ``filter_fn`` decides."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    if filter_fn is not None:
        return {n: m for n, m in layers.items() if filter_fn(m, n)}
    if skip_head:
        head = classifier_head(model)
        if isinstance(layers.get(head), nn.Linear):
            layers.pop(head)
    return layers


def _base_weight(module: nn.Module) -> torch.Tensor:
    """Dense weight with any existing mask applied (what a new mask is computed from)."""
    return module.weight.detach()


def magnitude_masks(layers: dict[str, nn.Module], sparsity: float, scope: str = "layer") -> dict[str, torch.Tensor]:
    """Boolean masks zeroing the ``sparsity`` fraction of smallest-magnitude weights, per layer
    (``scope="layer"``) or over all given layers together (``scope="global"``)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    weights = {n: _base_weight(m).abs() for n, m in layers.items()}
    if scope == "global":
        flat = torch.cat([w.flatten() for w in weights.values()])
        k = int(round(sparsity * flat.numel()))
        if k == 0:
            return {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
        # rank-based threshold so exactly k weights are removed even with ties
        order = flat.argsort(stable=True)
        keep = torch.ones_like(flat, dtype=torch.bool)
        keep[order[:k]] = False
        out, start = {}, 0
        for n, w in weights.items():
            out[n] = keep[start:start + w.numel()].view_as(w)
            start += w.numel()
        return out
    out = {}
    for n, w in weights.items():
        k = int(round(sparsity * w.numel()))
        keep = torch.ones(w.numel(), dtype=torch.bool)
        if k:
            keep[w.flatten().argsort(stable=True)[:k]] = False
        out[n] = keep.view_as(w)
    return out


def nm_mask(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep the ``n`` largest magnitudes of every ``m`` consecutive weights along the input
    dimension (dim 1; for a conv, the flattened ``in_channels*kh*kw``)."""
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise ValueError(f"need integers 0 < n < m for an N:M mask, got n={n!r}, m={m!r}")
    w = weight.detach().abs().reshape(weight.shape[0], -1)
    k = w.shape[1]
    if k % m:
        raise ValueError(f"{n}:{m} sparsity needs the input dimension divisible by {m}, got {k}")
    groups = w.reshape(w.shape[0], k // m, m)
    idx = groups.topk(n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(weight.shape)


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor], pattern: str = "unstructured") -> nn.Module:
    """Attach ``masks`` (name -> bool tensor shaped like the weight) as parametrizations; a layer
    that already has a mask gets the new one combined (AND) with it."""
    for name, mask in masks.items():
        module = model.get_submodule(name)
        if mask.shape != module.weight.shape:
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, weight is {tuple(module.weight.shape)}")
        mask = mask.to(device=module.weight.device, dtype=torch.bool)
        if _is_masked(module):
            existing = next(p for p in module.parametrizations.weight if isinstance(p, WeightMask))
            existing.mask.copy_(existing.mask & mask)
            existing.pattern = pattern
        else:
            parametrize.register_parametrization(module, "weight", WeightMask(mask, pattern))
    return model


def apply_nm_masks(model: nn.Module, n: int = 2, m: int = 4, filter_fn: FilterFn | None = None) -> dict[str, nn.Module]:
    """Mask every selected layer whose input dimension divides by ``m`` with an N:M mask; returns
    the masked layers. Default selection: Linear layers but the head (the layers ``Sparse24``
    would pack)."""
    layers = {k: v for k, v in prunable_layers(model, filter_fn).items()
              if isinstance(v, nn.Linear) or filter_fn is not None}
    chosen = {k: v for k, v in layers.items() if v.weight[0].numel() % m == 0}
    if not chosen:
        raise ValueError(f"no layer of this model can take a {n}:{m} mask (input dimension divisible by {m})")
    apply_masks(model, {k: nm_mask(v.weight, n, m) for k, v in chosen.items()}, pattern=f"{n}:{m}")
    return chosen


def remove_masks(model: nn.Module) -> nn.Module:
    """Bake masks into plain weights (masked entries become exact zeros) and drop the parametrizations."""
    for _, module in masked_modules(model).items():
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


def mask_sparsity(model: nn.Module) -> float:
    """Fraction of masked-out weights over all masked layers (0.0 when none)."""
    total = zeros = 0
    for m in masked_modules(model).values():
        for p in m.parametrizations.weight:
            if isinstance(p, WeightMask):
                total += p.mask.numel()
                zeros += (~p.mask).sum().item()
    return zeros / total if total else 0.0


def magnitude_prune(model: nn.Module, recipe: MagnitudePrune, filter_fn: FilterFn | None = None) -> list[LayerReport]:
    """Carry out a ``MagnitudePrune`` recipe; return per-layer reports for the summary."""
    layers = prunable_layers(model, filter_fn)
    if not layers:
        raise ValueError(f"{recipe.label()} applies to no layer of this model (no Linear/Conv2d besides the head)")
    before = {n: tensor_bytes(m) for n, m in layers.items()}
    masks = magnitude_masks(layers, recipe.sparsity, recipe.scope)
    apply_masks(model, masks)
    reports = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        shape = tuple(module.weight.shape)
        if name in layers:
            sp = 1 - masks[name].float().mean().item()
            reports.append(LayerReport(name, recipe.label(), "masked", shape, shape, before[name], tensor_bytes(module),
                                       backend="dense",
                                       reason=f"no speedup: {sp:.1%} of weights masked, "
                                              "storage and compute stay dense"))
        else:
            size = tensor_bytes(module)
            reports.append(LayerReport(name, recipe.label(), "skipped", shape, shape, size, size,
                                       reason="classifier head (kept dense by default)" if filter_fn is None
                                       else "excluded by filter_fn"))
    return reports


@register_handler(MagnitudePrune, rewrites_model=True)
def _magnitude_prune_handler(model: nn.Module, recipe: MagnitudePrune, ctx: HandlerContext) -> list[LayerReport]:
    return magnitude_prune(model, recipe, ctx.filter_fn)
