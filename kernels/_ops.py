"""One factory for the ``torch.library`` custom ops of the compressed linears.

``define_linear`` registers ``robcomp::<name>`` (forward, fake) and its input-gradient op, and
the autograd formula joining them: ``dX`` from the packed weight, ``dbias = sum(dY)``, no gradient
for the packed weight (the same frozen-weight rule and error for every format), so
``torch.compile(fullgraph=True)`` traces every layer.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

FROZEN_HINT = ("packed weights are frozen: the kernels give gradients w.r.t. the input and the bias only. "
               "Fine-tune the dense weight before packing (for 2:4, fine-tune the masked dense weight), "
               "or call .requires_grad_(False) on the packed tensors")


class FrozenWeightError(ValueError):
    """A packed (compressed) weight tensor was asked for a gradient."""


def check_frozen(op: str, **tensors) -> None:
    """Raise ``FrozenWeightError`` naming the packed tensors that require grad."""
    bad = [name for name, t in tensors.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    if bad and torch.is_grad_enabled():
        raise FrozenWeightError(f"{op}: {', '.join(bad)} require grad; {FROZEN_HINT}")


def define_linear(name: str, weight_schema: Sequence[tuple[str, str]], forward: Callable,
                  backward_input: Callable, backward_name: str, out_features: Callable,
                  in_features: Callable):
    """Register ``robcomp::name(x, *weights, bias)`` and ``robcomp::backward_name(grad_out, *weights)``.

    ``weight_schema``: ``[(arg, torch schema type)]`` of the packed weight arguments, e.g.
    ``[("qweight", "Tensor"), ("group_size", "int")]``. ``forward(x, *weights, bias)`` and
    ``backward_input(grad_out, *weights)`` are the Triton launchers; ``out_features(*weights)`` and
    ``in_features(*weights)`` give the fake outputs' last dimension. Returns the forward op.
    """
    wsig = ", ".join(f"{t} {a}" for a, t in weight_schema)
    n_w = len(weight_schema)
    tensor_idx = [i for i, (_, t) in enumerate(weight_schema) if t == "Tensor"]

    fwd = torch.library.custom_op(f"robcomp::{name}", lambda x, *rest: forward(x, *rest), mutates_args=(),
                                  schema=f"(Tensor x, {wsig}, Tensor? bias) -> Tensor")
    fwd.register_fake(lambda x, *rest: x.new_empty((*x.shape[:-1], out_features(*rest[:n_w]))))
    bwd = torch.library.custom_op(f"robcomp::{backward_name}", lambda g, *w: backward_input(g, *w),
                                  mutates_args=(), schema=f"(Tensor grad_out, {wsig}) -> Tensor")
    bwd.register_fake(lambda g, *w: g.new_empty((*g.shape[:-1], in_features(*w))))

    def setup(ctx, inputs, output):
        weights = inputs[1:1 + n_w]
        check_frozen(f"robcomp::{name}", **{weight_schema[i][0]: weights[i] for i in tensor_idx})
        ctx.save_for_backward(*[weights[i] for i in tensor_idx])
        ctx.weights = [None if i in tensor_idx else w for i, w in enumerate(weights)]
        bias = inputs[1 + n_w]
        ctx.bias_dtype = None if bias is None else bias.dtype

    def backward(ctx, gy):
        weights = list(ctx.weights)
        for i, t in zip(tensor_idx, ctx.saved_tensors):
            weights[i] = t
        gx = bwd(gy.contiguous(), *weights) if ctx.needs_input_grad[0] else None
        gb = None
        if ctx.bias_dtype is not None and ctx.needs_input_grad[1 + n_w]:
            gb = gy.reshape(-1, gy.shape[-1]).sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return (gx, *([None] * n_w), gb)

    fwd.register_autograd(backward, setup_context=setup)
    return fwd
