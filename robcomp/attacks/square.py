"""Square attack (Andriushchenko et al., ECCV 2020): score-based, query-limited black-box, L-inf and L2.

Uses only the model's outputs (no gradient), so gradient masking cannot stop it. The candidate of
each query is kept if it lowers the margin loss ``z_y - max_{i!=y} z_i`` (or misclassifies).

* L-inf. Start: vertical stripes of +-eps (one sign per channel and column). Per query a random
  square window of side ``s`` gets a new constant +-eps per channel (flipped when it would not
  change the image).
* L2. Start: a grid of ``h // 5``-sided windows, each holding the "eta" pattern (two opposite
  halves of concentric rectangles weighted ``1/(k+1)^2``) with a random sign per channel, the
  whole perturbation rescaled to norm eps. Per query two random windows of odd side ``s >= 3``:
  the perturbation mass of both is moved into the first, as the old content plus a new signed
  eta pattern, rescaled so that the image's total L2 norm becomes eps (then clipped to [0, 1]).

The window area follows the fraction schedule ``p``: ``p_init`` halved after 10, 50, 200, 500,
1000, 2000, 4000, 6000 and 8000 queries -- counted as such when ``rescale_schedule=False``
(AutoAttack's setting), or as the fraction ``it / n_queries`` of 10000 when True (the stand-alone
reference's default). Only examples still classified correctly are queried; ``n_queries`` is the
per-example budget (the initialisation counts as one). Windows, signs and orientations are keyed
by (seed, example id, query), so an example gets the same query sequence in any batch (the
reference draws one window per query for the whole batch).
"""
from __future__ import annotations

import math

import torch

from robcomp.attacks.base import Attack, _flat_norm, check_eps, margin
from robcomp.inputs import check_positive_int


def p_selection(p_init: float, it: int, n_queries: int, rescale: bool = True) -> float:
    """Window-area fraction at query ``it`` (0-based, after the initialisation)."""
    i = int(it / n_queries * 10000) if rescale else it
    for bound, div in ((8000, 512), (6000, 256), (4000, 128), (2000, 64), (1000, 32), (500, 16), (200, 8),
                       (50, 4), (10, 2)):
        if i > bound:
            return p_init / div
    return p_init


class Square(Attack):
    kind = "black-box"

    def __init__(self, eps: float, n_queries: int = 1000, p_init: float = 0.8, *, norm: str = "Linf",
                 seed: int = 0, rescale_schedule: bool = True) -> None:
        if norm not in ("Linf", "L2"):
            raise ValueError(f"Square supports norm='Linf' or 'L2', got {norm!r}")
        self.norm = norm
        self.eps = check_eps(eps, norm)
        self.rescale_schedule = bool(rescale_schedule)
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
        if self.norm == "L2":
            return self._perturb_l2(model, x, y)
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
            p = p_selection(self.p_init, it - 1, self.n_queries, self.rescale_schedule)
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

    # ------------------------------------------------------------------ L2
    def _perturb_l2(self, model, x, y):
        n, c, h, w = x.shape
        ids = getattr(self, "ids", torch.arange(n, device=x.device))
        eps = self.eps
        delta = torch.zeros_like(x)
        s0 = max(h // 5, 1)
        start = (h - 5 * s0) // 2 if h >= 5 else 0
        grid = [(start + i * s0, start + j * s0) for i in range(h // s0) for j in range(w // s0)]
        signs = torch.where(self.uniform(x, 0, shape=(len(grid), c)) < 0.5, 1.0, -1.0)
        flips = self.uniform(x, 1, shape=(len(grid),)) < 0.5
        pattern = eta_pattern(s0, x.device, x.dtype)
        for k, (vh, vw) in enumerate(grid):
            ph, pw = min(s0, h - vh), min(s0, w - vw)
            if ph <= 0 or pw <= 0:
                continue
            pat = torch.where(flips[:, k].view(-1, 1, 1), pattern.t(), pattern)[:, :ph, :pw]
            delta[:, :, vh:vh + ph, vw:vw + pw] += pat[:, None] * signs[:, k].view(-1, c, 1, 1)
        x_best = (x + eps * delta / (_flat_norm(delta) + 1e-12)).clamp(0.0, 1.0)
        m = margin(model(x_best), y)
        self.queries = torch.ones(n, dtype=torch.int64, device=x.device)
        rows = torch.arange(h, device=x.device).view(1, 1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, 1, w)
        for it in range(1, self.n_queries):
            todo = (m > 0).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            xs, xb = x[todo], x_best[todo]
            d = xb - xs
            p = p_selection(self.p_init, it - 1, self.n_queries, self.rescale_schedule)
            s = max(int(round(math.sqrt(p * h * w))), 3)
            s = min(s + 1 if s % 2 == 0 else s, min(h, w))
            r = self.uniform(xs, 2 + it, shape=(5 + c,), ids=ids[todo])
            span = max(h - s, 1), max(w - s, 1)  # as the reference: offsets 0 .. h - s - 1

            def window(rh, rw):
                vh = (rh * span[0]).long().clamp_(max=max(h - s - 1, 0)).view(-1, 1, 1, 1)
                vw = (rw * span[1]).long().clamp_(max=max(w - s - 1, 0)).view(-1, 1, 1, 1)
                inside = (rows >= vh) & (rows < vh + s) & (cols >= vw) & (cols < vw + s)
                return inside, (rows - vh).clamp(0, s - 1), (cols - vw).clamp(0, s - 1)

            win1, ri, ci = window(r[:, 0], r[:, 1])
            win2, _, _ = window(r[:, 2], r[:, 3])
            pattern = eta_pattern(s, x.device, x.dtype)
            pat = torch.where((r[:, 4] < 0.5).view(-1, 1, 1, 1), pattern.t()[ri, ci], pattern[ri, ci])
            sign = torch.where(r[:, 5:] < 0.5, 1.0, -1.0).view(-1, c, 1, 1)
            norm_img = _flat_norm(d)
            norm_w1 = (d * win1).pow(2).sum((2, 3), keepdim=True).sqrt()
            norm_both = (d * (win1 | win2)).pow(2).sum((2, 3), keepdim=True).sqrt()
            new = pat * sign + d * win1 / (norm_w1 + 1e-12)
            new = new * win1
            budget = ((eps ** 2 - norm_img ** 2).clamp_min(0.0) / c + norm_both ** 2).sqrt()
            new = new / (new.pow(2).sum((2, 3), keepdim=True).sqrt() + 1e-12) * budget
            d_new = torch.where(win1, new, torch.where(win2, torch.zeros_like(d), d))
            cand = (xs + eps * d_new / (_flat_norm(d_new) + 1e-12)).clamp(0.0, 1.0)
            m_new = margin(model(cand), y[todo])
            self.queries[todo] += 1
            better = (m_new < m[todo]) | (m_new <= 0)
            sel = todo[better]
            x_best[sel] = cand[better]
            m[sel] = m_new[better]
        return x_best


def _rectangles(rows: int, cols: int, device, dtype) -> torch.Tensor:
    """Concentric rectangles around the centre, ring ``k`` weighted ``1/(k+1)^2``, unit L2 norm."""
    out = torch.zeros(rows, cols, device=device, dtype=dtype)
    if rows == 0 or cols == 0:
        return out
    ch, cw = rows // 2, cols // 2
    for k in range(max(ch + 1, cw + 1)):
        out[max(ch - k, 0):min(ch - k + 2 * k + 1, rows), max(cw - k, 0):min(cw - k + 2 * k + 1, cols)] += 1.0 / (k + 1) ** 2
    return out / out.pow(2).sum().sqrt()


def eta_pattern(s: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Square's L2 window pattern: rectangles on the top half, their negation on the bottom, unit norm."""
    out = torch.zeros(s, s, device=device, dtype=dtype)
    out[:s // 2] = _rectangles(s // 2, s, device, dtype)
    out[s // 2:] = -_rectangles(s - s // 2, s, device, dtype)
    return out / out.pow(2).sum().sqrt()
