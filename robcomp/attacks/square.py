"""Square attack (Andriushchenko et al., ECCV 2020), L-inf: score-based, query-limited black-box.

Uses only the model's outputs (no gradient), so gradient masking cannot stop it. Start: vertical
stripes of +-eps (one sign per channel and column). Then, per query, a random square window of
side ``s`` gets a new constant +-eps per channel (flipped when it would not change the image); the
candidate is kept if it lowers the margin loss ``z_y - max_{i!=y} z_i``. The window area follows
the fraction schedule ``p`` (``p_init`` halved at 1%, 5%, 20%, 50%, 100%, 200%, 400%, 600%, 800%
of 1000 queries, rescaled to ``n_queries`` -- the schedule of the reference implementation).
Only examples still classified correctly are queried; ``n_queries`` is the per-example budget
(the initialisation counts as one). Windows and signs are keyed by (seed, example id, query), so
an example gets the same query sequence in any batch.
"""
from __future__ import annotations

import math

import torch

from robcomp.attacks.base import Attack, check_eps, check_positive_int, margin


def p_selection(p_init: float, it: int, n_queries: int) -> float:
    i = int(it / n_queries * 10000)
    for bound, div in ((8000, 512), (6000, 256), (4000, 128), (2000, 64), (1000, 32), (500, 16), (200, 8),
                       (50, 4), (10, 2)):
        if i > bound:
            return p_init / div
    return p_init


class Square(Attack):
    kind = "black-box"

    def __init__(self, eps: float, n_queries: int = 1000, p_init: float = 0.8, *, norm: str = "Linf",
                 seed: int = 0) -> None:
        if norm != "Linf":
            raise ValueError(f"Square supports norm='Linf' only, got {norm!r}")
        self.norm = norm
        self.eps = check_eps(eps)
        self.n_queries = check_positive_int("n_queries", n_queries)
        if not 0.0 < p_init <= 1.0:
            raise ValueError(f"p_init must be in (0, 1], got {p_init!r}")
        self.p_init = float(p_init)
        self.seed = int(seed)

    @property
    def name(self) -> str:
        return f"Square-{self.n_queries} {self.norm} eps={self.eps:g}"

    @torch.no_grad()
    def perturb(self, model, x, y):
        if x.dim() != 4:
            raise ValueError(f"Square needs image batches [N, C, H, W], got shape {tuple(x.shape)}")
        n, c, h, w = x.shape
        ids = getattr(self, "ids", torch.arange(n, device=x.device))
        eps = self.eps
        stripes = self.uniform(x, 0, shape=(c, 1, w)) < 0.5
        x_best = (x + torch.where(stripes, eps, -eps)).clamp(0.0, 1.0)
        logits = model(x_best)
        m = margin(logits, y)
        self.queries = torch.ones(n, dtype=torch.int64, device=x.device)
        rows = torch.arange(h, device=x.device).view(1, 1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, 1, w)
        for it in range(1, self.n_queries):
            todo = (m > 0).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            xs, xb = x[todo], x_best[todo]
            p = p_selection(self.p_init, it, self.n_queries)
            s = min(max(int(round(math.sqrt(p * h * w))), 1), min(h, w) - 1 if min(h, w) > 1 else 1)
            r = self.uniform(xs, it, shape=(2 + c,), ids=ids[todo])
            vh = (r[:, 0] * (h - s + 1)).long().clamp_(max=h - s).view(-1, 1, 1, 1)
            vw = (r[:, 1] * (w - s + 1)).long().clamp_(max=w - s).view(-1, 1, 1, 1)
            window = (rows >= vh) & (rows < vh + s) & (cols >= vw) & (cols < vw + s)
            sign = torch.where(r[:, 2:] < 0.5, eps, -eps).view(-1, c, 1, 1)
            cand = torch.where(window, (xs + sign).clamp(0.0, 1.0), xb)
            unchanged = ((cand - xb).abs().flatten(1).amax(1) < 1e-7).view(-1, 1, 1, 1)
            cand = torch.where(window & unchanged, (xs - sign).clamp(0.0, 1.0), cand)
            m_new = margin(model(cand), y[todo])
            self.queries[todo] += 1
            better = m_new < m[todo]
            sel = todo[better]
            x_best[sel] = cand[better]
            m[sel] = m_new[better]
        return x_best
