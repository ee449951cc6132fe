"""Pruning: structured channel pruning through torch-pruning.

Channel pruning physically removes output channels (and the matching inputs of the layers that
consume them), so the pruned model has fewer parameters and MACs and runs faster on any device.
torch-pruning builds its dependency graph by tracing the model with autograd, so tracing runs
with gradients enabled and with every parameter temporarily marked trainable. A pruned model no
longer fits its original class's ``state_dict``: save it with ``robcomp.save``, which records the
pruned shapes.

Attention: modules exposing ``qkv`` (an nn.Linear) and ``num_heads`` are pruned head-consistently
(every head loses the same number of dimensions, q, k and v alike, with ``proj`` inputs matching);
``head_dim`` is updated afterwards. Hugging Face transformers models go through
:mod:`robcomp.compression.prune_hf` (FFN width everywhere, whole heads on BERT and ViT, checked after pruning).
Any other attention (separate q/k/v projections, grouped KV heads) is refused with a ValueError
naming the modules, rather than pruned into a model with inconsistent heads. ``importance="bn_scale"`` needs BatchNorm layers.
``MagnitudePrune`` (unstructured masks) is dispatched to ``robcomp.compression.masks``.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn as nn

from robcomp.compression.registry import HandlerContext, register_handler
from robcomp.compression.selection import classifier_head
from robcomp.layers.conv import is_hf_conv1d
from robcomp.layers.linear import tensor_bytes
from robcomp.outputs import logits_of
from robcomp.recipes import ChannelPrune
from robcomp.summary import LayerReport

__all__ = ["channel_prune"]


@contextlib.contextmanager
def _traceable(model: nn.Module):
    """Gradients on and every parameter trainable while torch-pruning traces; restored after
    (by name: pruning replaces the parameter objects)."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    try:
        with torch.enable_grad():
            for p in model.parameters():
                p.requires_grad_(True)
            model.eval()
            yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, True))
        model.train(was_training)


def _importance(name: str):
    import torch_pruning as tp

    return {
        "magnitude": lambda: tp.importance.MagnitudeImportance(p=2),
        "taylor": lambda: tp.importance.TaylorImportance(),
        "lamp": lambda: tp.importance.LAMPImportance(p=2),
        "bn_scale": lambda: tp.importance.BNScaleImportance(),
    }[name]()


def _layer_shapes(model: nn.Module) -> dict[str, tuple[tuple, int]]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            out[name] = (tuple(m.weight.shape), tensor_bytes(m))
    return out


def _attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    """qkv Linear -> number of heads, for modules that expose ``qkv`` and ``num_heads``."""
    return {m.qkv: m.num_heads for m in model.modules()
            if isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int)}


_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "num_key_value_heads", "attention_head_size", "head_dim")


def _unsupported_attention(model: nn.Module) -> list[str]:
    """Modules whose head layout channel pruning cannot keep consistent: attention that is not the
    ``qkv`` + ``num_heads`` form (separate q/k/v projections, grouped KV heads, head counts used in
    the module's own reshape). Transformers models are handled by :mod:`robcomp.prune_hf` instead."""
    found = []
    for name, m in model.named_modules():
        if isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int):
            continue  # pruned head-consistently (see channel_prune)
        if any(isinstance(getattr(m, a, None), int) for a in _HEAD_ATTRS if a in vars(m)):
            found.append(name or "<root>")
    return found


def _unwrapped_parameters(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """Parameters held directly by non-leaf modules (cls tokens, position embeddings): their last
    dimension is the channel dimension."""
    leaf_types = (nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.LayerNorm, nn.Embedding)
    return [(p, p.dim() - 1) for m in model.modules() if not isinstance(m, leaf_types)
            for p in m.parameters(recurse=False)]


def channel_prune(model: nn.Module, recipe: ChannelPrune, example_inputs: torch.Tensor,
                  filter_fn: Callable[[nn.Module, str], bool] | None = None) -> list:
    """Prune ``model`` in place; return per-layer reports (see ``robcomp.summary.LayerReport``)."""
    import torch_pruning as tp

    from robcomp.compression.prune_hf import is_transformers_model

    hf = is_transformers_model(model)
    attention = [] if hf else _unsupported_attention(model)
    if attention:
        raise ValueError(f"ChannelPrune cannot prune this model: {attention[:3]} hold attention heads (or a "
                         "transformers config) whose layout pruning would break (heads of unequal width, a "
                         "reshape by the original head count). Supported: attention as one `qkv` Linear "
                         "with `num_heads`. Compress this model with layer recipes (Sparse24, Int8WeightOnly, ...)")
    if example_inputs is None:
        raise ValueError("ChannelPrune needs example_inputs (a batch shaped like the model's input) "
                         "to trace the model: compress(model, ChannelPrune(...), example_inputs=x)")
    from torch.nn.utils import parametrize

    from robcomp.layers.linear import CompressedLinear

    names = dict(model.named_modules())
    done = [n for n, m in names.items() if isinstance(m, CompressedLinear) or parametrize.is_parametrized(m)]
    if done:
        raise ValueError(f"ChannelPrune must come before layer recipes and masks: {done[:3]} are already "
                         "compressed or masked; put ChannelPrune first in the recipe list")
    if recipe.importance == "bn_scale" and not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                                   for m in names.values()):
        raise ValueError("importance='bn_scale' ranks channels by BatchNorm scales, but this model has no "
                         "BatchNorm layer; use 'magnitude', 'taylor' or 'lamp'")
    unknown = [n for n in recipe.ignored if n not in names]
    if unknown:
        raise ValueError(f"ChannelPrune.ignored names modules the model does not have: {unknown}")
    head = classifier_head(model)
    ignored = ([names[head]] if head is not None else []) + [names[n] for n in recipe.ignored]
    if filter_fn is not None:
        ignored += [m for n, m in names.items()
                    if (isinstance(m, (nn.Linear, nn.Conv2d)) or is_hf_conv1d(m)) and not filter_fn(m, n)]
    if hf:
        return _prune_transformers(model, recipe, example_inputs, ignored, names)
    heads = _attention_heads(model)
    before = _layer_shapes(model)
    with _traceable(model):
        pruner = tp.pruner.MetaPruner(
            model, example_inputs, importance=_importance(recipe.importance),
            global_pruning=recipe.global_pruning, pruning_ratio=recipe.ratio,
            iterative_steps=recipe.iterative_steps, round_to=recipe.round_to,
            ignored_layers=ignored, num_heads=heads,
            unwrapped_parameters=_unwrapped_parameters(model), prune_head_dims=True,
            prune_num_heads=False,
            output_transform=logits_of,  # trace through a dict / tuple / ModelOutput forward
        )
        for _ in range(recipe.iterative_steps):
            if recipe.importance == "taylor":  # Taylor scores need gradients of a loss
                model.zero_grad()
                logits = logits_of(model(example_inputs))
                nn.functional.cross_entropy(logits, logits.argmax(-1)).backward()
            pruner.step()
        model.zero_grad(set_to_none=True)
    for attn in model.modules():  # head dims shrink per head (the same for every head); keep attributes true
        qkv, heads = getattr(attn, "qkv", None), getattr(attn, "num_heads", None)
        if isinstance(qkv, nn.Linear) and isinstance(heads, int) and hasattr(attn, "head_dim"):
            if qkv.out_features % (3 * heads):
                raise RuntimeError(f"pruning left {qkv.out_features} qkv outputs, not a multiple of 3 x {heads} heads")
            attn.head_dim = qkv.out_features // (3 * heads)
    after = _layer_shapes(model)
    _check_something_removed(recipe, before, after, [n for n, m in names.items() if m in ignored])
    reports = []
    for name, (shape, size) in before.items():
        new_shape, new_size = after.get(name, (shape, size))
        action = "pruned" if new_shape != shape else "skipped"
        reason = "" if action == "pruned" else ("kept: classifier head or ignored" if names[name] in ignored
                                                else "no channel removed")
        reports.append(LayerReport(name, recipe.label(), action, shape, new_shape, size, new_size, reason=reason))
    return reports


def _prune_transformers(model: nn.Module, recipe: ChannelPrune, example_inputs, ignored: list[nn.Module],
                       names: dict[str, nn.Module]) -> list:
    """Transformers models: FFN width and whole heads through :mod:`robcomp.prune_hf`; one report per layer."""
    from robcomp.compression.prune_hf import layer_shapes, prune_transformers

    ignored_ids = {id(m) for m in ignored}
    before, kept = prune_transformers(model, recipe, example_inputs, ignored, _importance(recipe.importance),
                                      lambda m: _traceable(m))
    after = layer_shapes(model)
    _check_something_removed(recipe, {n: v[:2] for n, v in before.items()}, {n: v[:2] for n, v in after.items()},
                             [n for n, m in names.items() if id(m) in ignored_ids])
    reports = []
    for name, (shape, size, kind) in before.items():
        new_shape, new_size, new_kind = after[name]
        action = "pruned" if new_shape != shape else "skipped"
        reason = "" if action == "pruned" else kept.get(name) or (
            "kept: classifier head or ignored" if id(names[name]) in ignored_ids
            else "kept: residual width (embeddings, norms and the layers writing it are not pruned)")
        reports.append(LayerReport(name, recipe.label(), action, shape, new_shape, size, new_size, reason=reason,
                                   before_type=kind, after_type=new_kind))
    return reports


def _check_something_removed(recipe: ChannelPrune, before: dict, after: dict, ignored: list[str]) -> None:
    """A ratio torch-pruning cannot honour is a silent no-op there (it rounds the kept channels
    *down* to ``round_to``; zero kept means the layer is left alone): refuse it instead."""
    if recipe.ratio <= 0 or any(after.get(n, v)[0] != v[0] for n, v in before.items()):
        return
    widths = {n: shape[0] for n, (shape, _) in before.items() if n not in ignored}
    hint = ""
    if widths and recipe.round_to:
        narrow = min(widths, key=widths.get)
        limit = 1 - recipe.round_to / widths[narrow]
        hint = (f"; with round_to={recipe.round_to}, the narrowest prunable layer {narrow!r} "
                f"({widths[narrow]} channels) keeps at least {recipe.round_to} only up to ratio={limit:g}: "
                "use a lower ratio or a smaller round_to")
    raise ValueError(f"ChannelPrune(ratio={recipe.ratio:g}) removed no channel from any layer: the ratio cannot "
                     f"be honoured on this model{hint}")


@register_handler(ChannelPrune, rewrites_model=True)
def _channel_prune_handler(model: nn.Module, recipe: ChannelPrune, ctx: HandlerContext) -> list[LayerReport]:
    return channel_prune(model, recipe, ctx.example_inputs, ctx.filter_fn)
