"""Channel-permutation search for 2:4 sparsity (after NVIDIA ASP's permutation work, Pool & Yu,
NeurIPS 2021), with a numba search kernel.

2:4 pruning keeps the two largest magnitudes of every group of 4 consecutive *input* channels.
Which channels share a group is arbitrary: permuting the input channels of a layer (columns of
``W [N, K]``) before pruning can keep noticeably more weight magnitude. ``find_permutation``
searches for such a permutation with greedy channel swaps between groups: for every pair of
groups it evaluates the 16 possible single swaps (the change of the kept magnitude of the two
groups only) and applies the best improving one, sweeping until no swap improves or
``max_passes`` is reached. The score of the result is never below the identity's (the search
starts from the identity and only accepts improvements).

Applying the permutation without a gather: ``y = W[:, p] @ x[p]`` is the same function as
``W @ x``; if ``x`` is produced by a Linear (possibly through elementwise activations such as
ReLU/GELU), permuting that *producer's output rows and bias* by ``p`` makes it emit ``x[p]``
directly, so the permuted consumer needs no gather at run time and the model computes exactly the
same function (``apply_permutation``). ``permute_model_for_24`` does this for every
Linear -> elementwise* -> Linear chain inside an ``nn.Sequential`` (MLP bodies, transformer MLPs).
A layer whose input does not come from such a producer (first layer, a residual stream, a
LayerNorm output, attention heads) is left unpermuted: there the permutation would need either a
gather of the activations on every call or permuting every reader and writer of the stream.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from numba import njit

__all__ = ["kept_magnitude", "find_permutation", "apply_permutation", "permutable_pairs", "permute_model_for_24"]

ELEMENTWISE = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.ReLU6,
               nn.Hardswish, nn.ELU)


@njit(cache=True, nogil=True)
def _top2_sum(a, b, c, d):
    hi1 = max(a, b)
    lo1 = min(a, b)
    hi2 = max(c, d)
    lo2 = min(c, d)
    # the two largest of {hi1, lo1, hi2, lo2}: max pair among hi1+hi2, hi1+lo1, hi2+lo2
    s = hi1 + hi2
    if hi1 >= hi2:
        alt = hi1 + max(lo1, hi2)
    else:
        alt = hi2 + max(lo2, hi1)
    return max(s, alt)


@njit(cache=True, nogil=True)
def _group_score(w, c0, c1, c2, c3):
    total = 0.0
    for r in range(w.shape[0]):
        total += _top2_sum(w[r, c0], w[r, c1], w[r, c2], w[r, c3])
    return total


@njit(cache=True, nogil=True)
def _swap_search(w, perm, max_passes):
    k = w.shape[1]
    g = k // 4
    scores = np.empty(g)
    for i in range(g):
        scores[i] = _group_score(w, perm[4 * i], perm[4 * i + 1], perm[4 * i + 2], perm[4 * i + 3])
    cols_a = np.empty(4, np.int64)
    cols_b = np.empty(4, np.int64)
    passes = 0
    for _ in range(max_passes):
        passes += 1
        improved = False
        for ga in range(g):
            for gb in range(ga + 1, g):
                best = 1e-9 * (scores[ga] + scores[gb] + 1.0)
                bi = -1
                bj = -1
                bsa = 0.0
                bsb = 0.0
                for i in range(4):
                    for j in range(4):
                        for t in range(4):
                            cols_a[t] = perm[4 * ga + t]
                            cols_b[t] = perm[4 * gb + t]
                        tmp = cols_a[i]
                        cols_a[i] = cols_b[j]
                        cols_b[j] = tmp
                        sa = _group_score(w, cols_a[0], cols_a[1], cols_a[2], cols_a[3])
                        sb = _group_score(w, cols_b[0], cols_b[1], cols_b[2], cols_b[3])
                        delta = sa + sb - scores[ga] - scores[gb]
                        if delta > best:
                            best = delta
                            bi = i
                            bj = j
                            bsa = sa
                            bsb = sb
                if bi >= 0:
                    tmp = perm[4 * ga + bi]
                    perm[4 * ga + bi] = perm[4 * gb + bj]
                    perm[4 * gb + bj] = tmp
                    scores[ga] = bsa
                    scores[gb] = bsb
                    improved = True
        if not improved:
            break
    return passes


def _as_2d_abs(weight: torch.Tensor) -> np.ndarray:
    w = weight.detach().reshape(weight.shape[0], -1)
    if w.shape[1] % 4:
        raise ValueError(f"2:4 permutation search needs in_features divisible by 4, got {w.shape[1]}")
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf values")
    return np.ascontiguousarray(w.abs().to(torch.float64).cpu().numpy())


def kept_magnitude(weight: torch.Tensor, perm: torch.Tensor | None = None) -> float:
    """Sum of |w| that 2:4 pruning keeps, with the input channels permuted by ``perm`` first."""
    w = weight.detach().reshape(weight.shape[0], -1).abs().to(torch.float64)
    if perm is not None:
        w = w[:, perm]
    n, k = w.shape
    if k % 4:
        raise ValueError(f"2:4 needs in_features divisible by 4, got {k}")
    return w.reshape(n, k // 4, 4).topk(2, dim=-1).values.sum().item()


def find_permutation(weight: torch.Tensor, *, max_passes: int = 20) -> torch.Tensor:
    """Permutation ``p`` of the input channels of ``weight [N, K]`` such that 2:4 pruning of
    ``weight[:, p]`` keeps at least as much magnitude as without it (usually more)."""
    if not isinstance(max_passes, int) or max_passes < 1:
        raise ValueError(f"max_passes must be a positive integer, got {max_passes!r}")
    w = _as_2d_abs(weight)
    perm = np.arange(w.shape[1], dtype=np.int64)
    _swap_search(w, perm, max_passes)
    return torch.from_numpy(perm).to(weight.device)


@torch.no_grad()
def apply_permutation(producer: nn.Linear, consumer: nn.Linear, perm: torch.Tensor) -> None:
    """Permute ``consumer``'s input columns and ``producer``'s output rows (and bias) by ``perm``,
    in place: the pair computes the same function, with no gather at run time."""
    if producer.out_features != consumer.in_features or perm.numel() != consumer.in_features:
        raise ValueError(f"producer emits {producer.out_features} features, consumer takes "
                         f"{consumer.in_features}, permutation has {perm.numel()}")
    if sorted(perm.tolist()) != list(range(perm.numel())):
        raise ValueError("perm is not a permutation of range(in_features)")
    perm = perm.to(consumer.weight.device)
    consumer.weight.copy_(consumer.weight[:, perm])
    producer.weight.copy_(producer.weight[perm, :])
    if producer.bias is not None:
        producer.bias.copy_(producer.bias[perm])


def permutable_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(producer, consumer)`` names of Linear -> elementwise* -> Linear chains in ``nn.Sequential``s."""
    pairs = []
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for i, (pname, p) in enumerate(children):
            if type(p) is not nn.Linear:
                continue
            for cname, c in children[i + 1:]:
                if type(c) is nn.Linear:
                    prefix = f"{seq_name}." if seq_name else ""
                    pairs.append((prefix + pname, prefix + cname))
                    break
                if not isinstance(c, ELEMENTWISE):
                    break
    return pairs


def permute_model_for_24(model: nn.Module, *, filter_fn=None, max_passes: int = 20) -> dict[str, tuple[float, float]]:
    """Search and apply (without gathers) input permutations for every permutable Linear pair;
    returns ``{consumer: (kept magnitude before, after)}``. The model's function is unchanged.
    ``filter_fn(module, name)`` restricts which consumers are permuted."""
    out = {}
    for pname, cname in permutable_pairs(model):
        producer, consumer = model.get_submodule(pname), model.get_submodule(cname)
        if consumer.in_features % 4 or (filter_fn is not None and not filter_fn(consumer, cname)):
            continue
        before = kept_magnitude(consumer.weight)
        perm = find_permutation(consumer.weight, max_passes=max_passes)
        apply_permutation(producer, consumer, perm)
        out[cname] = (before, kept_magnitude(consumer.weight))
    return out
