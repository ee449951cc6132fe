"""ChannelPrune on Hugging Face transformers models: FFN width and whole attention heads.

torch-pruning traces the model and groups the channels that must go together; this module tells
it which layers of a transformer block may lose channels, which are attention heads, and fixes
the modules' head attributes and the model's config afterwards. Recognised by the layers an
attention or MLP module holds (so RoBERTa, DeiT, Mistral, ... are covered like their parents):

- **BERT-style** (``query``/``key``/``value`` with ``num_attention_heads``, ``attention_head_size``)
  and **ViT** (``q_proj``/``k_proj``/``v_proj``/``o_proj`` with ``num_attention_heads``, ``head_dim``,
  as many KV heads as query heads): whole heads are removed, the same ones from q, k and v and the
  matching inputs of the output projection; the head size (and so the attention scaling) is kept.
  ``floor(ratio * heads)`` heads go (at least one stays), lowered until the remaining width is a
  multiple of ``round_to``. The FFN hidden width is pruned by ``ratio``.
- **GPT-2** (``Conv1D``): the FFN hidden width (``mlp.c_fc`` -> ``mlp.c_proj``), traced as the
  ``nn.Linear`` each Conv1D stands for and put back as a Conv1D. Heads are kept: ``c_attn`` is one
  fused ``[3, heads, head_dim]`` output that torch-pruning's head grouping (``[heads, 3 * head_dim]``)
  does not address.
- **Llama** (gated MLP, grouped KV heads, rotary embeddings): the FFN hidden width (``gate_proj`` and
  ``up_proj`` together, ``down_proj``'s inputs). Heads are kept: torch-pruning 1.6's dependency graph
  does not finish on this attention (over 100 s on a one-layer model), so its layers are never traced
  as prunable.

The residual (hidden) width, embeddings, norms and heads not listed above are left alone. After
pruning, the head attributes and ``config.num_attention_heads`` / ``head_dim`` /
``intermediate_size`` (``n_inner``) are updated where every layer agrees, the model is run once, its
output shape, head counts and parameter count are checked against what was removed.
"""
from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from robcomp.conv import hf_conv1d_as_linear, is_hf_conv1d
from robcomp.nn import tensor_bytes
from robcomp.outputs import logits_of

__all__ = ["is_transformers_model", "prune_transformers"]

#: the first layer(s) of a feed-forward block, whose outputs are the FFN hidden width
FFN_UP = ("intermediate.dense", "mlp.fc1", "mlp.c_fc", "mlp.gate_proj", "mlp.up_proj")
GPT2_HEADS_KEPT = ("heads kept: GPT-2's fused c_attn is laid out [3, heads, head_dim], which torch-pruning's "
                   "head grouping does not address")
LLAMA_HEADS_KEPT = ("heads kept: torch-pruning's dependency graph does not finish on rotary / grouped-KV "
                    "attention (>100 s on a one-layer Llama)")


def is_transformers_model(model: nn.Module) -> bool:
    return any(type(m).__module__.split(".")[0] == "transformers" for m in model.modules())


@dataclass
class _Attention:
    module: nn.Module
    qkv: list[nn.Module]
    out: nn.Module | None  # the projection taking the heads' outputs (its inputs shrink with them)
    heads: int
    head_dim: int
    kept_reason: str = ""  # non-empty: heads are not pruned, and why
    remove: int = 0  # heads to remove

    @property
    def layers(self) -> list[nn.Module]:
        return self.qkv + ([self.out] if self.out is not None else [])


@dataclass
class _Plan:
    attentions: list[_Attention] = field(default_factory=list)
    ffn_up: list[str] = field(default_factory=list)


def _linear(m) -> bool:
    return isinstance(m, nn.Linear)


def _attentions(model: nn.Module) -> list[_Attention]:
    parents = {id(child): parent for parent in model.modules() for child in parent.children()}
    found = []
    for m in model.modules():
        heads = getattr(m, "num_attention_heads", None)
        if all(_linear(getattr(m, n, None)) for n in ("query", "key", "value")) and isinstance(heads, int):
            # BERT-style: the output projection sits in the parent (BertAttention.output.dense)
            out = getattr(getattr(parents.get(id(m)), "output", None), "dense", None)
            found.append(_Attention(m, [m.query, m.key, m.value], out if _linear(out) else None, heads,
                                    int(m.attention_head_size)))
        elif all(_linear(getattr(m, n, None)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            head_dim = int(getattr(m, "head_dim", 0))
            if isinstance(heads, int) and m.k_proj.out_features == m.q_proj.out_features and head_dim:
                found.append(_Attention(m, [m.q_proj, m.k_proj, m.v_proj], m.o_proj, heads, head_dim))
            else:  # Llama-style (no head count attribute; grouped KV heads, rotary)
                found.append(_Attention(m, [m.q_proj, m.k_proj, m.v_proj], m.o_proj,
                                        m.q_proj.out_features // max(head_dim, 1), head_dim, LLAMA_HEADS_KEPT))
        elif is_hf_conv1d(getattr(m, "c_attn", None)) and is_hf_conv1d(getattr(m, "c_proj", None)):
            found.append(_Attention(m, [m.c_attn], m.c_proj, int(m.num_heads), int(m.head_dim), GPT2_HEADS_KEPT))
    return found


def _heads_to_remove(ratio: float, heads: int, head_dim: int, round_to: int | None) -> int:
    """``floor(ratio * heads)``, at most ``heads - 1``, lowered until the kept width fits ``round_to``."""
    k = min(math.floor(ratio * heads + 1e-9), heads - 1)
    while k > 0 and round_to and ((heads - k) * head_dim) % round_to:
        k -= 1
    return k


def _plan(model: nn.Module, recipe, ignored: set[int]) -> _Plan:
    plan = _Plan(attentions=_attentions(model))
    for a in plan.attentions:
        if not a.kept_reason and any(id(m) in ignored for m in a.layers):
            a.kept_reason = "heads kept: a projection of this attention is ignored"
        if not a.kept_reason:
            a.remove = _heads_to_remove(recipe.ratio, a.heads, a.head_dim, recipe.round_to)
            if not a.remove:
                a.kept_reason = (f"heads kept: ratio={recipe.ratio:g} of {a.heads} heads removes none"
                                 + (f" that leaves a multiple of round_to={recipe.round_to}" if recipe.round_to else ""))
    plan.ffn_up = [n for n, m in model.named_modules()
                   if (_linear(m) or is_hf_conv1d(m)) and n.endswith(FFN_UP) and id(m) not in ignored]
    return plan


def _swap_conv1d(model: nn.Module, to_linear: bool) -> list[str]:
    """Replace every transformers Conv1D by the nn.Linear it stands for (torch-pruning knows Linear),
    or the Linears recorded as such back by Conv1Ds; return the names swapped."""
    swapped = []
    for name, m in list(model.named_modules()):
        if to_linear and is_hf_conv1d(m):
            new = hf_conv1d_as_linear(m)
            new.weight.requires_grad_(m.weight.requires_grad)
            new.bias.requires_grad_(m.bias.requires_grad)
            new._robcomp_conv1d = type(m)
        elif not to_linear and _linear(m) and hasattr(m, "_robcomp_conv1d"):
            new = m._robcomp_conv1d(m.out_features, m.in_features)
            with torch.no_grad():
                new.weight = nn.Parameter(m.weight.detach().t().contiguous(), requires_grad=m.weight.requires_grad)
                new.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=m.bias.requires_grad)
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        swapped.append(name)
    return swapped


def _call(model: nn.Module, inputs, trace: bool = False):
    """``model(inputs)`` (``**inputs`` for a dict); when tracing, without a KV cache (its concatenations
    are not channels torch-pruning can map)."""
    kwargs = {"use_cache": False} if trace and "use_cache" in inspect.signature(model.forward).parameters else {}
    return model(**inputs, **kwargs) if isinstance(inputs, dict) else model(inputs, **kwargs)


def layer_shapes(model: nn.Module) -> dict[str, tuple[tuple, int, str]]:
    """name -> (shape as [out, in, ...], bytes, class name) of every Linear, Conv2d and Conv1D."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            out[name] = (tuple(m.weight.shape), tensor_bytes(m), type(m).__name__)
        elif is_hf_conv1d(m):
            out[name] = (tuple(m.weight.shape[::-1]), tensor_bytes(m), type(m).__name__)
    return out


def prune_transformers(model: nn.Module, recipe, example_inputs, ignored: list[nn.Module], importance,
                       traceable) -> tuple[dict, dict[str, str]]:
    """Prune a transformers ``model`` in place (see the module docstring).

    ``ignored``: layers that must keep their output channels; ``importance``: a torch-pruning
    importance; ``traceable``: the context manager that makes the model traceable. Returns the
    layer shapes before pruning and the reason each layer was left alone (by name).
    """
    import torch_pruning as tp

    ignored_ids = {id(m) for m in ignored}
    plan = _plan(model, recipe, ignored_ids)
    pruned_heads = [a for a in plan.attentions if not a.kept_reason]
    if not plan.ffn_up and not pruned_heads:
        raise ValueError("ChannelPrune cannot prune this transformers model: it has no FFN layer it knows "
                         f"({', '.join(FFN_UP)}) and no attention whose heads it can remove"
                         + "".join(f"; {a.kept_reason}" for a in plan.attentions[:1]))
    names = {id(m): n for n, m in model.named_modules()}
    kept = {}
    for a in plan.attentions:
        if a.kept_reason:
            kept.update({names[id(m)]: a.kept_reason for m in a.layers})
    before = layer_shapes(model)
    params_before = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        reference = logits_of(_call(model, example_inputs))
    head_layers = {id(m) for a in pruned_heads for m in a.qkv}
    _swap_conv1d(model, to_linear=True)
    try:
        layers = {n: m for n, m in model.named_modules() if _linear(m) or isinstance(m, nn.Conv2d)}
        prunable = set(plan.ffn_up) | {names[i] for i in head_layers}
        skip = [m for n, m in layers.items() if n not in prunable or id(m) in ignored_ids]
        qkv_now = {n: layers[n] for n in (names[i] for i in head_layers)}
        num_heads, head_ratio = {}, {}
        for a in pruned_heads:
            for m in a.qkv:  # torch-pruning removes ceil(ratio * heads)
                num_heads[qkv_now[names[id(m)]]] = a.heads
                head_ratio[qkv_now[names[id(m)]]] = (a.remove - 0.5) / a.heads
        with traceable(model), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")  # norms: residual width kept
            pruner = tp.pruner.MetaPruner(
                model, example_inputs, importance=importance, global_pruning=recipe.global_pruning,
                pruning_ratio=recipe.ratio, iterative_steps=1, round_to=recipe.round_to,
                ignored_layers=skip, num_heads=num_heads, prune_num_heads=bool(num_heads), prune_head_dims=False,
                head_pruning_ratio=0.0, head_pruning_ratio_dict=head_ratio,
                output_transform=logits_of, forward_fn=lambda m, x: _call(m, x, trace=True),
            )
            if recipe.importance == "taylor":  # Taylor scores need gradients of a loss
                model.zero_grad()
                logits = logits_of(_call(model, example_inputs))
                flat = logits.reshape(-1, logits.shape[-1])
                nn.functional.cross_entropy(flat, flat.argmax(-1)).backward()
            pruner.step()
            model.zero_grad(set_to_none=True)
    finally:
        _swap_conv1d(model, to_linear=False)
    _update_heads(pruned_heads)
    _update_config(model, plan, pruned_heads)
    _check(model, example_inputs, reference, before, params_before, pruned_heads)
    return before, kept


def _update_heads(attentions: list[_Attention]) -> None:
    """Head counts follow the pruned q/k/v widths (whole heads went; the head size is unchanged)."""
    for a in attentions:
        widths = {m.out_features for m in a.qkv} | ({a.out.in_features} if a.out is not None else set())
        if len(widths) != 1 or next(iter(widths)) % a.head_dim:
            raise RuntimeError(f"pruning left q/k/v/output widths {sorted(widths)}, not one multiple of the "
                               f"head size {a.head_dim}: heads would be inconsistent")
        heads = next(iter(widths)) // a.head_dim
        if heads != a.heads - a.remove:
            raise RuntimeError(f"pruning left {heads} heads of {a.heads}, expected {a.heads - a.remove}")
        a.module.num_attention_heads = heads
        if hasattr(a.module, "all_head_size"):
            a.module.all_head_size = heads * a.head_dim


def _configs(model: nn.Module) -> list:
    seen = {}
    for m in model.modules():
        config = vars(m).get("config")
        if config is not None and hasattr(config, "to_dict"):
            seen.setdefault(id(config), config)
    return list(seen.values())


def _update_config(model: nn.Module, plan: _Plan, attentions: list[_Attention]) -> None:
    """Write the pruned head count / head size / FFN width into the config where every layer agrees
    (with global pruning they may not: the module shapes, which rc.save records, are then the truth)."""
    named = dict(model.named_modules())
    ffn = {named[n].out_features if _linear(named[n]) else named[n].weight.shape[1] for n in plan.ffn_up}
    heads = {a.module.num_attention_heads for a in attentions}
    for config in _configs(model):
        if len(heads) == 1 and attentions:
            config.num_attention_heads = next(iter(heads))
            config.head_dim = attentions[0].head_dim  # no longer hidden_size // num_attention_heads
        if len(ffn) == 1 and plan.ffn_up:
            width = next(iter(ffn))
            for attr in ("intermediate_size", "n_inner"):
                if attr in vars(config) or attr in type(config).__dict__:
                    setattr(config, attr, width)
                    break


def _check(model, example_inputs, reference, before, params_before, attentions) -> None:
    """Run the pruned model once; its output shape, head counts and parameter count must agree with
    what was removed, or pruning fails here rather than later."""
    try:
        with torch.no_grad():
            out = logits_of(_call(model, example_inputs))
    except Exception as e:
        raise RuntimeError(f"the pruned model no longer runs ({type(e).__name__}: {e})") from e
    if out.shape != reference.shape or not torch.isfinite(out).all():
        raise RuntimeError(f"the pruned model returns {tuple(out.shape)} (finite: {bool(torch.isfinite(out).all())}), "
                           f"the original {tuple(reference.shape)}")
    after = layer_shapes(model)
    removed = sum(_numel(model, n, shape_before) - _numel(model, n, after[n][0]) for n, (shape_before, _, _)
                  in before.items())
    params = sum(p.numel() for p in model.parameters())
    if params != params_before - removed:
        raise RuntimeError(f"the pruned model has {params} parameters, but {params_before} - {removed} removed "
                           "from its layers were expected: something outside the reported layers changed")


def _numel(model: nn.Module, name: str, shape: tuple) -> int:
    """Weight plus bias elements of layer ``name`` at ``shape`` ([out, in, ...])."""
    m = model.get_submodule(name)
    return math.prod(shape) + (shape[0] if getattr(m, "bias", None) is not None else 0)
