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
- **GPT-2** (``Conv1D``) and **Llama** (gated MLP, grouped KV heads, rotary embeddings): the FFN
  hidden width (GPT-2 ``mlp.c_fc`` -> ``mlp.c_proj``; Llama ``gate_proj`` and ``up_proj`` together ->
  ``down_proj``) through torch-pruning, Conv1Ds traced as the ``nn.Linear`` they stand for and put back.
  Heads: torch-pruning cannot group these (GPT-2's fused ``c_attn`` is laid out ``[3, heads, head_dim]``,
  its head grouping assumes ``[heads, 3 * head_dim]``; on Llama's attention its dependency graph does
  not finish, over 100 s on a one-layer model), so those layers are never traced as prunable; heads
  are scored here (the squared L2 norm, or for ``importance="taylor"`` the ``|w * grad|``, of each
  head's q/k/v rows and output-projection columns; ``"lamp"`` ranks like the L2 norm within a layer)
  and removed with torch-pruning's Linear pruners. Grouped KV (Llama): the same number of query
  heads, ``floor(ratio * queries_per_kv_head)``, leaves every KV group (KV heads are shared, and kept);
  with as many KV heads as query heads whole heads go, k and v alike.

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

from robcomp.layers.conv import hf_conv1d_as_linear, is_hf_conv1d
from robcomp.layers.linear import tensor_bytes
from robcomp.outputs import logits_of

__all__ = ["is_transformers_model", "prune_transformers"]

#: the first layer(s) of a feed-forward block, whose outputs are the FFN hidden width
FFN_UP = ("intermediate.dense", "mlp.fc1", "mlp.c_fc", "mlp.gate_proj", "mlp.up_proj")


def is_transformers_model(model: nn.Module) -> bool:
    return any(type(m).__module__.split(".")[0] == "transformers" for m in model.modules())


@dataclass
class _Attention:
    kind: str  # "bert", "vit" (heads through torch-pruning's graph), "gpt2", "llama" (scored here)
    module: nn.Module
    qkv: list[str]  # layer names: GPT-2 swaps its Conv1Ds, so layers are looked up by name
    out: str  # the projection taking the heads' outputs (its inputs shrink with them)
    heads: int
    head_dim: int
    kv_heads: int = 0  # Llama: key/value heads (each shared by heads // kv_heads query heads)
    kept_reason: str = ""  # non-empty: heads are not pruned, and why
    remove: int = 0  # heads to remove (grouped KV: query heads per KV head)
    heads_after: int = 0  # set once pruned
    kv_after: int = 0

    @property
    def layers(self) -> list[str]:
        return self.qkv + [self.out]

    @property
    def groups(self) -> int:
        """Query heads per KV head, where they are grouped (1 otherwise)."""
        return self.heads // self.kv_heads if self.kind == "llama" else 1


@dataclass
class _Plan:
    attentions: list[_Attention] = field(default_factory=list)
    ffn_up: list[str] = field(default_factory=list)


def _linear(m) -> bool:
    return isinstance(m, nn.Linear)


def _attentions(model: nn.Module) -> list[_Attention]:
    parents = {id(child): parent for parent in model.modules() for child in parent.children()}
    names = {id(m): n for n, m in model.named_modules()}
    found = []
    for m in model.modules():
        heads = getattr(m, "num_attention_heads", None)
        at = names[id(m)] + "." if names[id(m)] else ""
        if all(_linear(getattr(m, n, None)) for n in ("query", "key", "value")) and isinstance(heads, int):
            # BERT-style: the output projection sits in the parent (BertAttention.output.dense)
            out = getattr(getattr(parents.get(id(m)), "output", None), "dense", None)
            if _linear(out):  # else: no output projection to go by, its layers stay as they are (ignored)
                found.append(_Attention("bert", m, [at + "query", at + "key", at + "value"], names[id(out)],
                                        heads, int(m.attention_head_size)))
        elif all(_linear(getattr(m, n, None)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            head_dim = int(getattr(m, "head_dim", 0) or 0)
            layers = [at + "q_proj", at + "k_proj", at + "v_proj"]
            if not head_dim or m.q_proj.out_features % head_dim or m.k_proj.out_features % head_dim:
                continue  # no head size to go by: its layers stay as they are (ignored)
            if isinstance(heads, int) and m.k_proj.out_features == m.q_proj.out_features:
                found.append(_Attention("vit", m, layers, at + "o_proj", heads, head_dim))
            elif isinstance(getattr(m, "num_key_value_groups", None), int):  # Llama-style
                found.append(_Attention("llama", m, layers, at + "o_proj", m.q_proj.out_features // head_dim,
                                        head_dim, kv_heads=m.k_proj.out_features // head_dim))
        elif is_hf_conv1d(getattr(m, "c_attn", None)) and is_hf_conv1d(getattr(m, "c_proj", None)) \
                and not getattr(m, "is_cross_attention", False):
            found.append(_Attention("gpt2", m, [at + "c_attn"], at + "c_proj", int(m.num_heads), int(m.head_dim)))
    return found


def _heads_to_remove(ratio: float, heads: int, head_dim: int, round_to: int | None, groups: int = 1) -> int:
    """``floor(ratio * heads)`` (grouped KV: ``floor(ratio * groups)`` query heads per KV head), all but
    one at most, lowered until the kept q width fits ``round_to``."""
    n = groups if groups > 1 else heads  # what the ratio applies to

    def kept_width(k: int) -> int:
        return (heads // groups * (groups - k) if groups > 1 else heads - k) * head_dim

    k = min(math.floor(ratio * n + 1e-9), n - 1)
    while k > 0 and round_to and kept_width(k) % round_to:
        k -= 1
    return k


def _plan(model: nn.Module, recipe, ignored: set[str]) -> _Plan:
    plan = _Plan(attentions=_attentions(model))
    for a in plan.attentions:
        if any(n in ignored for n in a.layers):
            a.kept_reason = "heads kept: a projection of this attention is ignored"
            continue
        a.remove = _heads_to_remove(recipe.ratio, a.heads, a.head_dim, recipe.round_to, a.groups)
        if not a.remove:
            what = f"{a.groups} query heads per KV head" if a.groups > 1 else f"{a.heads} heads"
            a.kept_reason = (f"heads kept: ratio={recipe.ratio:g} of {what} removes none"
                             + (f" (the kept width stays a multiple of round_to={recipe.round_to})"
                                if recipe.round_to else ""))
    plan.ffn_up = [n for n, m in model.named_modules()
                   if (_linear(m) or is_hf_conv1d(m)) and n.endswith(FFN_UP) and n not in ignored]
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
    names = {id(m): n for n, m in model.named_modules()}
    ignored_names = {names[id(m)] for m in ignored}
    plan = _plan(model, recipe, ignored_names)
    pruned_heads = [a for a in plan.attentions if not a.kept_reason]
    if not plan.ffn_up and not pruned_heads:
        raise ValueError("ChannelPrune cannot prune this transformers model: it has no FFN layer it knows "
                         f"({', '.join(FFN_UP)}) and no attention whose heads it can remove"
                         + "".join(f"; {a.kept_reason}" for a in plan.attentions[:1]))
    kept = {n: a.kept_reason for a in plan.attentions if a.kept_reason for n in a.layers}
    kept.update({n: "kept: KV heads are shared by grouped query heads (each group loses the same number)"
                 for a in pruned_heads if a.groups > 1 for n in a.qkv[1:]})
    before = layer_shapes(model)
    params_before = sum(p.numel() for p in model.parameters())
    try:
        with torch.no_grad():
            reference = logits_of(_call(model, example_inputs))
    except Exception as e:  # nothing changed yet: say what was called
        raise ValueError(f"ChannelPrune traces model(example_inputs), which failed ({type(e).__name__}: {e}); "
                         "pass what the model's forward takes first (token ids, pixel values) or a dict "
                         "of its keyword arguments") from e
    in_graph = [a for a in pruned_heads if a.kind in ("bert", "vit")]  # heads torch-pruning groups itself
    _swap_conv1d(model, to_linear=True)
    try:
        taylor = recipe.importance == "taylor"
        with traceable(model), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")  # norms: residual width kept
            if taylor:  # Taylor scores need gradients of a loss
                model.zero_grad()
                logits = logits_of(_call(model, example_inputs))
                flat = logits.reshape(-1, logits.shape[-1])
                nn.functional.cross_entropy(flat, flat.argmax(-1)).backward()
            heads = {n for a in in_graph for n in a.qkv}
            # heads are chosen per layer (one count for the config); with global_pruning the FFN widths
            # are ranked across layers in a second pass (torch-pruning's global head ranking fails)
            passes = ([(heads, False), (set(plan.ffn_up), True)] if recipe.global_pruning and heads
                      else [(heads | set(plan.ffn_up), recipe.global_pruning)])
            for prunable, global_pruning in passes:
                _graph_step(model, example_inputs, recipe, importance, prunable - ignored_names, in_graph,
                            global_pruning)
            for a in pruned_heads:
                if a not in in_graph:
                    _prune_heads_directly(model, a, taylor)
            model.zero_grad(set_to_none=True)
    finally:
        _swap_conv1d(model, to_linear=False)
    for a in pruned_heads:
        _update_heads(model, a)
    _update_config(model, plan, pruned_heads)
    _check(model, example_inputs, reference, before, params_before)
    return before, kept


def _graph_step(model: nn.Module, example_inputs, recipe, importance, prunable: set[str],
                attentions: list[_Attention], global_pruning: bool) -> None:
    """One torch-pruning pass over the layers named in ``prunable`` (every other layer ignored), heads
    of ``attentions`` among them removed whole."""
    import torch_pruning as tp

    layers = {n: m for n, m in model.named_modules() if _linear(m) or isinstance(m, nn.Conv2d)}
    num_heads, head_ratio = {}, {}
    for a in attentions:
        for n in a.qkv:
            if n in prunable:  # torch-pruning removes ceil(ratio * heads)
                num_heads[layers[n]] = a.heads
                head_ratio[layers[n]] = (a.remove - 0.5) / a.heads
    pruner = tp.pruner.MetaPruner(
        model, example_inputs, importance=importance, global_pruning=global_pruning,
        pruning_ratio=recipe.ratio, iterative_steps=1, round_to=recipe.round_to,
        ignored_layers=[m for n, m in layers.items() if n not in prunable],
        num_heads=num_heads, prune_num_heads=bool(num_heads), prune_head_dims=False,
        head_pruning_ratio=0.0, head_pruning_ratio_dict=head_ratio,
        output_transform=logits_of, forward_fn=lambda m, x: _call(m, x, trace=True),
    )
    pruner.step()


def _row_scores(layer: nn.Linear, taylor: bool, dim: int) -> torch.Tensor:
    """Per output row (``dim=1``) or input column (``dim=0``): squared L2 norm of the weights (bias
    included for rows), or ``|w * grad|`` summed for Taylor."""
    def score(p: torch.Tensor) -> torch.Tensor:
        if taylor:
            if p.grad is None:
                raise RuntimeError("Taylor importance found no gradient on an attention projection")
            return (p.detach() * p.grad).abs()
        return p.detach() ** 2

    s = score(layer.weight).sum(dim)
    if dim == 1 and layer.bias is not None:
        s = s + score(layer.bias)
    return s


def _prune_heads_directly(model: nn.Module, a: _Attention, taylor: bool) -> None:
    """GPT-2 / Llama heads (see the module docstring): score each head over its q/k/v rows and output
    columns, remove the lowest with torch-pruning's Linear pruners (weights, bias and grads)."""
    import torch_pruning as tp

    d, out = a.head_dim, model.get_submodule(a.out)
    out_score = _row_scores(out, taylor, 0).view(-1, d).sum(1)  # per query head
    if a.kind == "gpt2":  # c_attn rows: [q | k | v], each [heads, head_dim]
        c_attn = model.get_submodule(a.qkv[0])
        score = _row_scores(c_attn, taylor, 1).view(3, a.heads, d).sum((0, 2)) + out_score
        drop = torch.topk(score, a.remove, largest=False).indices.tolist()
        heads_rows = [h * d + i for h in sorted(drop) for i in range(d)]
        tp.prune_linear_out_channels(c_attn, [seg * a.heads * d + r for seg in range(3) for r in heads_rows])
        tp.prune_linear_in_channels(out, heads_rows)
        return
    q, k, v = (model.get_submodule(n) for n in a.qkv)
    score = _row_scores(q, taylor, 1).view(-1, d).sum(1) + out_score
    if a.groups == 1:  # one KV head per query head: whole heads, k and v alike
        score = score + sum(_row_scores(m, taylor, 1).view(-1, d).sum(1) for m in (k, v))
        drop = torch.topk(score, a.remove, largest=False).indices.tolist()
        kv_rows = [h * d + i for h in sorted(drop) for i in range(d)]
        tp.prune_linear_out_channels(k, kv_rows)
        tp.prune_linear_out_channels(v, kv_rows)
    else:  # the same number of query heads from every KV group (the KV heads are shared: kept)
        per_group = torch.topk(score.view(a.kv_heads, a.groups), a.remove, dim=1, largest=False).indices
        drop = [g * a.groups + int(j) for g in range(a.kv_heads) for j in per_group[g]]
    rows = [h * d + i for h in sorted(drop) for i in range(d)]
    tp.prune_linear_out_channels(q, rows)
    tp.prune_linear_in_channels(out, rows)


def _width(layer: nn.Module, dim: str) -> int:
    """``in`` or ``out`` features of a Linear or a Conv1D (weight [in, out])."""
    if _linear(layer):
        return layer.in_features if dim == "in" else layer.out_features
    return layer.weight.shape[0 if dim == "in" else 1]


def _update_heads(model: nn.Module, a: _Attention) -> None:
    """Head attributes follow the pruned widths (whole heads went; the head size is unchanged); the
    widths must be one consistent head layout."""
    d, expected = a.head_dim, a.heads - a.remove * (a.kv_heads if a.groups > 1 else 1)
    widths = [_width(model.get_submodule(n), "out") for n in a.qkv] + [_width(model.get_submodule(a.out), "in")]
    kv = a.kv_heads if a.groups > 1 else expected
    want = {"gpt2": [3 * expected * d, expected * d]}.get(a.kind, [expected * d, kv * d, kv * d, expected * d])
    if widths != want:
        raise RuntimeError(f"pruning left {a.kind} attention {a.qkv[0].rpartition('.')[0]!r} with q/k/v/output widths "
                           f"{widths}, not {want} ({expected} heads of {d}): heads would be inconsistent")
    if a.kind == "gpt2":
        a.module.num_heads, a.module.split_size = expected, expected * d
    elif a.kind == "llama":
        a.module.num_key_value_groups = expected // kv
    else:
        a.module.num_attention_heads = expected
        if hasattr(a.module, "all_head_size"):
            a.module.all_head_size = expected * d
    a.heads_after, a.kv_after = expected, kv


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
    ffn = {_width(model.get_submodule(n), "out") for n in plan.ffn_up}
    heads = {(a.heads_after, a.kv_after, a.kind) for a in attentions}
    for config in _configs(model):
        if len(heads) == 1 and len(attentions) == len(plan.attentions):
            count, kv, kind = next(iter(heads))
            config.num_attention_heads = count
            if kind == "llama":
                config.num_key_value_heads = kv
            config.head_dim = attentions[0].head_dim  # no longer hidden_size // num_attention_heads
        if len(ffn) == 1:
            for attr in ("intermediate_size", "n_inner"):
                if attr in vars(config):
                    setattr(config, attr, next(iter(ffn)))
                    break


def _check(model, example_inputs, reference, before, params_before) -> None:
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
