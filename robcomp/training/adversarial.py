"""Robust compression: adversarial fine-tuning, compression-aware training, HYDRA-style pruning.

Every routine here drives :func:`robcomp.training.train.train` (same optimiser, schedule, seeding and PGD
adversarial examples), plugging in a loss (``loss_fn``) or a post-step hook where needed.

* :func:`adversarial_finetune` — PGD adversarial training (Madry et al., 2018) or TRADES (Zhang et
  al., 2019: ``CE(f(x), y) + beta * KL(f(x) || f(x'))`` with ``x'`` maximising the KL term) on any
  model, compressed or not (after a recipe only the trainable parts move: biases, norms,
  uncompressed layers, masked dense weights).
* :func:`compression_aware_finetune` — train *towards* a recipe, then pack into the real layers:
  2:4 recipes train with a fixed 2:4 mask (masked fine-tuning); int8/int4 recipes train through a
  straight-through fake quantiser that computes exactly the dequantised weight the packed layer
  will use, so packing at the end changes nothing.
* :func:`hydra_prune` — HYDRA (Sehwag et al., 2020): with the weights frozen, learn an importance
  score per weight under the adversarial loss (the forward uses the top-k scores as a hard mask,
  the gradient reaches the scores straight through), keep the top-k as a mask, then fine-tune the
  remaining weights adversarially. Scores start proportional to the weight magnitudes, so the
  search starts from magnitude pruning and moves away from it only where the robust loss says so.
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from robcomp.attacks.base import project_linf
from robcomp.compression.masks import apply_masks, nm_mask, prunable_layers
from robcomp.kernels import reference as ref
from robcomp.recipes import (Int4WeightOnly, Int8Dynamic, Int8WeightOnly, Recipe, Sparse24, Sparse24Int4)
from robcomp.training.train import TrainConfig, train

__all__ = ["trades_loss", "adversarial_finetune", "FakeQuant", "compression_aware_finetune", "supports_compression_aware",
           "ScoreMask", "hydra_prune"]

FilterFn = Callable[[nn.Module, str], bool]


# ------------------------------------------------------------------------------------ TRADES
def trades_loss(eps: float, steps: int = 5, beta: float = 6.0, step_size: float | None = None,
                seed: int = 0) -> Callable:
    """TRADES loss as a ``loss_fn(model, x, y)`` for :func:`robcomp.training.train.train`.

    The inner maximisation runs ``steps`` signed-gradient steps on the KL divergence from a small
    random start, in eval mode (fixed normalisation statistics), inside the L-inf ball of radius
    ``eps`` intersected with [0, 1].
    """
    alpha = step_size if step_size is not None else 2.5 * eps / steps
    counter = [0]

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        counter[0] += 1
        gen = torch.Generator(device=x.device).manual_seed(seed * 1000003 + counter[0])
        model.eval()
        with torch.no_grad():
            p_clean = F.softmax(model(x), dim=1)
        x_adv = (x + 0.001 * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)).clamp(0, 1)
        for _ in range(steps):
            x_adv = x_adv.detach().requires_grad_(True)
            with torch.enable_grad():
                kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), p_clean, reduction="sum")
                (grad,) = torch.autograd.grad(kl, x_adv)
            x_adv = project_linf(x_adv.detach() + alpha * grad.sign(), x, eps)
        model.train()
        logits = model(x)
        robust = F.kl_div(F.log_softmax(model(x_adv.detach()), dim=1), F.softmax(logits, dim=1), reduction="batchmean")
        return F.cross_entropy(logits, y) + beta * robust

    return loss_fn


def adversarial_finetune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig | None = None, *,
                         method: str = "pgd", beta: float = 6.0, progress: bool = False) -> nn.Module:
    """Fine-tune ``model`` in place for robustness after any recipe: ``method="pgd"`` (PGD-AT with
    ``config.eps``/``config.pgd_steps``) or ``"trades"`` (TRADES with ``beta``)."""
    config = config or TrainConfig(epochs=5, lr=1e-3, adversarial=True)
    if method == "pgd":
        return train(model, x, y, config.scaled(adversarial=True), desc="PGD-AT fine-tune", progress=progress)
    if method == "trades":
        loss = trades_loss(config.eps, config.pgd_steps, beta, seed=config.seed)
        return train(model, x, y, config.scaled(adversarial=False), desc="TRADES fine-tune", progress=progress,
                     loss_fn=loss)
    raise ValueError(f"method must be 'pgd' or 'trades', got {method!r}")


def _loss_for(method: str, config: TrainConfig, beta: float):
    if method == "trades":
        return config.scaled(adversarial=False), trades_loss(config.eps, config.pgd_steps, beta, seed=config.seed)
    if method == "pgd":
        return config.scaled(adversarial=True), None
    if method == "clean":
        return config.scaled(adversarial=False), None
    raise ValueError(f"method must be 'pgd', 'trades' or 'clean', got {method!r}")


# ------------------------------------------------------------------- compression-aware training
class FakeQuant(nn.Module):
    """Straight-through fake quantiser of a weight: the forward returns exactly the dequantised
    weight the packed layer computes with (same pack/unpack as ``robcomp.kernels.reference``), the
    backward is the identity."""

    def __init__(self, kind: str, group_size: int = 128) -> None:
        super().__init__()
        if kind not in ("int8", "int4"):
            raise ValueError(f"kind must be 'int8' or 'int4', got {kind!r}")
        self.kind = kind
        self.group_size = int(group_size)

    def quantize(self, weight: torch.Tensor) -> torch.Tensor:
        w2 = weight.detach().reshape(weight.shape[0], -1)
        if self.kind == "int8":
            q = ref.int8_weight_unpack(*ref.int8_weight_pack(w2))
        else:
            q = ref.int4_unpack(*ref.int4_pack(w2, self.group_size), self.group_size)
        return q.to(weight.dtype).reshape(weight.shape)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.quantize(weight) - weight).detach()

    def extra_repr(self) -> str:
        return f"kind={self.kind}" + (f", group_size={self.group_size}" if self.kind == "int4" else "")


#: layer recipes with a training path: 2:4 masks, or straight-through fake quantisation of the weights
_AWARE_RECIPES = (Sparse24, Sparse24Int4, Int8WeightOnly, Int8Dynamic, Int4WeightOnly)


def supports_compression_aware(recipe: Recipe) -> bool:
    """True when :func:`compression_aware_finetune` can train towards ``recipe``."""
    return isinstance(recipe, _AWARE_RECIPES)


def _selected_layers(model: nn.Module, recipe: Recipe, filter_fn: FilterFn | None) -> list[str]:
    """Names of the layers ``compress(model, recipe, filter_fn=...)`` would pack (dry run on a copy)."""
    from robcomp.compression.compress import compress

    probe = compress(copy.deepcopy(model), recipe, filter_fn=filter_fn, backend="torch")
    return [r.name for r in probe.compression_summary.layers if r.action == "compressed"]


def compression_aware_finetune(model: nn.Module, recipe: Recipe, x: torch.Tensor, y: torch.Tensor,
                               config: TrainConfig | None = None, *, method: str = "pgd", beta: float = 6.0,
                               filter_fn: FilterFn | None = None, backend: str = "auto",
                               progress: bool = False) -> nn.Module:
    """Train ``model`` towards ``recipe`` and pack it into the real compressed layers; returns the
    compressed model (with ``compression_summary``).

    * ``Sparse24`` / ``Sparse24Int4``: fixed 2:4 magnitude masks, masked training, then packing
      (for ``Sparse24Int4`` the int4 step of the packing is post-training).
    * ``Int8WeightOnly`` / ``Int8Dynamic`` / ``Int4WeightOnly``: straight-through fake quantisation
      of the weights (``Int8Dynamic``'s activation quantisation is not simulated).
    ``method``: ``"pgd"`` (adversarial), ``"trades"`` or ``"clean"``.
    """
    from robcomp.compression.compress import compress

    if not supports_compression_aware(recipe):
        raise ValueError(f"compression_aware_finetune takes a layer recipe (Sparse24, Int8WeightOnly, "
                         f"Int4WeightOnly, Int8Dynamic, Sparse24Int4), got {recipe!r}")
    config = config or TrainConfig(epochs=5, lr=1e-3)
    names = _selected_layers(model, recipe, filter_fn)
    layers = {n: model.get_submodule(n) for n in names}
    if isinstance(recipe, (Sparse24, Sparse24Int4)):
        apply_masks(model, {n: nm_mask(m.weight, 2, 4) for n, m in layers.items()}, pattern="2:4")
        bake = True
    else:
        kind = "int4" if isinstance(recipe, Int4WeightOnly) else "int8"
        for m in layers.values():
            parametrize.register_parametrization(m, "weight", FakeQuant(kind, getattr(recipe, "group_size", 128)))
        bake = False  # keep the latent weights: packing them reproduces the fake-quantised weight exactly
    cfg, loss = _loss_for(method, config, beta)
    train(model, x, y, cfg, desc=f"{recipe.label()}-aware training", progress=progress, loss_fn=loss)
    for m in layers.values():
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=bake)
    return compress(model, recipe, filter_fn=lambda mod, name: name in layers, backend=backend)


# ------------------------------------------------------------------------------------- HYDRA
class _TopKMask(torch.autograd.Function):
    """Hard top-k mask of ``scores`` in the forward, identity gradient to the scores."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, k: int) -> torch.Tensor:
        mask = torch.zeros_like(scores)
        mask.view(-1)[scores.flatten().topk(k).indices] = 1.0
        return mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class ScoreMask(nn.Module):
    """Parametrization ``weight -> weight * topk(|scores|)`` with trainable ``scores``."""

    def __init__(self, weight: torch.Tensor, keep: int) -> None:
        super().__init__()
        fan_in = weight[0].numel()
        w = weight.detach()
        self.scores = nn.Parameter(math.sqrt(6.0 / fan_in) * w / w.abs().max().clamp_min(1e-12))
        self.keep = int(keep)

    def mask(self) -> torch.Tensor:
        flat = self.scores.detach().abs().flatten()
        out = torch.zeros_like(flat, dtype=torch.bool)
        out[flat.topk(self.keep).indices] = True
        return out.view_as(self.scores)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * _TopKMask.apply(self.scores.abs(), self.keep)


def hydra_prune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sparsity: float = 0.9, *,
                score_config: TrainConfig | None = None, finetune_config: TrainConfig | None = None,
                method: str = "pgd", beta: float = 6.0, filter_fn: FilterFn | None = None,
                progress: bool = False) -> nn.Module:
    """HYDRA-style robust pruning of ``model`` in place to ``sparsity`` (per layer); returns it
    with fixed ``WeightMask`` masks (dense storage, like ``MagnitudePrune``).

    1. scores (one per weight, initialised ~ |w|) are trained under the adversarial loss
       (``score_config``, ``method``) with every other parameter frozen;
    2. the top ``1 - sparsity`` scores per layer become the mask;
    3. the remaining weights are fine-tuned adversarially (``finetune_config``; skipped if None
       is passed explicitly as ``finetune_config=False``).
    Default layers: every Linear/Conv2d but the classifier head (``filter_fn`` overrides).
    """
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity!r}")
    layers = prunable_layers(model, filter_fn)
    if not layers:
        raise ValueError("hydra_prune found no Linear/Conv2d layer to prune")
    score_config = score_config or TrainConfig(epochs=3, lr=1e-3, weight_decay=0.0, adversarial=True)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for m in layers.values():
        keep = max(1, int(round((1.0 - sparsity) * m.weight.numel())))
        parametrize.register_parametrization(m, "weight", ScoreMask(m.weight, keep))
    cfg, loss = _loss_for(method, score_config, beta)
    train(model, x, y, cfg, desc="HYDRA score search", progress=progress, loss_fn=loss)
    masks = {}
    for n, m in layers.items():
        masks[n] = m.parametrizations.weight[0].mask()
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, True))
    apply_masks(model, masks, pattern="unstructured")
    if finetune_config is not False:
        ft = finetune_config or TrainConfig(epochs=5, lr=1e-3, adversarial=True)
        cfg, loss = _loss_for(method, ft, beta)
        train(model, x, y, cfg, desc="HYDRA fine-tune", progress=progress, loss_fn=loss)
    return model


