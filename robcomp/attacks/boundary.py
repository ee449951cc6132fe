"""Minimal-norm step onto a hyperplane inside the [0, 1] box: the projection FAB needs.

For points ``t`` (rows of ``[B, D]``) and hyperplanes ``{z : w . z = b}`` find, per row, the step
``d`` of smallest Lp norm (p = inf, 2 or 1) with ``w . (t + d) = b`` and ``0 <= t + d <= 1``.
If the box does not reach the hyperplane the step goes as far towards it as the box allows.

Only moves along ``sign(w)`` (times the side the hyperplane lies on) help, so with ``r = |b - w.t|``
and ``u_i`` the room in that direction, every norm reduces to a monotone "water filling":

* L-inf: ``m_i = min(s, u_i)``, find the smallest ``s`` with ``sum |w_i| m_i = r``;
* L2 (KKT): ``m_i = |w_i| min(s, u_i / |w_i|)``, same equation;
* L1: fill coordinates in decreasing ``|w_i|`` (the cheapest progress per unit of norm).

Each is solved exactly by sorting the breakpoints (``O(D log D)`` per row, no iteration).
"""
from __future__ import annotations

import torch

__all__ = ["project_onto_hyperplane"]


def _orient(t, w, b):
    r = b - (w * t).sum(1)
    side = torch.where(r >= 0, 1.0, -1.0).to(t.dtype)
    ws = w * side[:, None]  # moving along sign(ws) approaches the plane
    room = torch.where(ws > 0, 1.0 - t, torch.where(ws < 0, t, torch.zeros_like(t))).clamp_min(0.0)
    return r.abs(), ws, room


def _waterfill(c: torch.Tensor, beta: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Smallest ``s >= 0`` with ``sum_i c_i min(s, beta_i) >= r`` (``c, beta >= 0``); ``max beta``
    when even ``s = max beta`` falls short."""
    bs, order = beta.sort(dim=1)
    cs = c.gather(1, order)
    done = torch.cumsum(cs * bs, 1)  # sum over j <= k of c_j beta_j (saturated)
    slope = cs.flip(1).cumsum(1).flip(1)  # sum over j >= k of c_j
    # g at breakpoint k: saturated part below k plus beta_k times the rest
    g = done - cs * bs + bs * slope
    k = torch.searchsorted(g.contiguous(), r[:, None].contiguous()).squeeze(1)  # first k with g_k >= r
    feasible = k < beta.shape[1]
    k = k.clamp(max=beta.shape[1] - 1)
    below = torch.where(k > 0, done.gather(1, (k - 1).clamp_min(0)[:, None]).squeeze(1), torch.zeros_like(r))
    sl = slope.gather(1, k[:, None]).squeeze(1)
    s = (r - below) / sl.clamp_min(1e-30)
    return torch.where(feasible, s, bs[:, -1])


def project_onto_hyperplane(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor, norm: str) -> torch.Tensor:
    """The minimal-``norm`` step from each row of ``t`` onto ``{w . z = b}`` within [0, 1]^D."""
    if norm not in ("Linf", "L2", "L1"):
        raise ValueError(f"norm must be 'Linf', 'L2' or 'L1', got {norm!r}")
    dtype = t.dtype
    t, w, b = t.double(), w.double(), b.double()
    r, ws, room = _orient(t, w, b)
    a = ws.abs()
    sign = ws.sign()
    if norm == "Linf":
        s = _waterfill(a, room * (a > 0), r)
        m = torch.minimum(s[:, None], room)
    elif norm == "L2":
        beta = torch.where(a > 0, room / a.clamp_min(1e-300), torch.zeros_like(a))
        s = _waterfill(a * a, beta, r)
        m = a * torch.minimum(s[:, None], beta)
    else:
        order = a.argsort(dim=1, descending=True)
        ao, uo = a.gather(1, order), room.gather(1, order)
        cap = torch.cumsum(ao * uo, 1)
        k = torch.searchsorted(cap.contiguous(), r[:, None].contiguous()).squeeze(1)
        feasible = k < a.shape[1]
        k = k.clamp(max=a.shape[1] - 1)
        before = torch.where(k > 0, cap.gather(1, (k - 1).clamp_min(0)[:, None]).squeeze(1), torch.zeros_like(r))
        pos = torch.arange(a.shape[1], device=t.device)[None, :]
        part = ((r - before) / ao.gather(1, k[:, None]).squeeze(1).clamp_min(1e-300)).clamp_min(0.0)
        mo = torch.where(pos < k[:, None], uo, torch.zeros_like(uo))
        mo = torch.where((pos == k[:, None]) & feasible[:, None],
                         torch.minimum(part[:, None], uo), mo)
        mo = torch.where(~feasible[:, None], uo, mo)
        m = torch.empty_like(mo).scatter_(1, order, mo)
    m = torch.where(a > 0, m, torch.zeros_like(m))
    return (sign * m).to(dtype)
