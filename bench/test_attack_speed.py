"""PGD-20 on the digits test set: robcomp's PGD against a plain hand-written PGD loop, same model.

Run: ``python -m pytest bench/test_attack_speed.py --benchmark-only -s``. Both loops are timed in
the same process, interleaved (median of repeats, ``time.perf_counter``, after warm-up); the
ratio ``robcomp / plain`` is printed and stored in the benchmark's ``extra_info``. robcomp's PGD
does more per step (keyed random start, per-example strongest iterate, one extra forward pass to
score the last iterate), so a ratio near 1 means that bookkeeping is cheap next to the model.
"""
import statistics

import pytest
import torch
import torch.nn.functional as F

from bench.harness import time_ms
from robcomp.attacks import PGD
from robcomp.zoo.data import load_digits_split
from robcomp.zoo.models import build_model

torch.set_num_threads(1)
EPS, STEPS = 0.1, 20


def plain_pgd(model, x, y, eps=EPS, steps=STEPS, alpha=2.5 * EPS / STEPS):
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_pgd20_vs_plain_loop(benchmark, arch):
    _, _, x, y = load_digits_split(seed=0)
    torch.manual_seed(0)
    model = build_model(arch).eval()
    pgd = PGD(EPS, steps=STEPS, seed=0)
    ours = lambda: pgd(model, x, y)  # noqa: E731
    plain = lambda: plain_pgd(model, x, y)  # noqa: E731
    if benchmark.disabled:  # --benchmark-disable (CI): a smoke run, no timing and no timed assertion
        assert ours().shape == x.shape and plain().shape == x.shape
        return
    for _ in range(2):
        ours(), plain()
    t_ours, t_plain = [], []
    for _ in range(5):  # interleave so that machine load hits both alike
        t_plain.append(time_ms(plain, "cpu", cpu_repeats=3, cpu_warmup=0) / 1e3)
        t_ours.append(time_ms(ours, "cpu", cpu_repeats=3, cpu_warmup=0) / 1e3)
    ratio = statistics.median(t_ours) / statistics.median(t_plain)
    benchmark.extra_info.update({"examples": len(y), "steps": STEPS, "plain_median_s": statistics.median(t_plain),
                                 "robcomp_median_s": statistics.median(t_ours), "ratio_robcomp_over_plain": ratio,
                                 "torch_threads": torch.get_num_threads()})
    benchmark.pedantic(ours, rounds=5, iterations=1, warmup_rounds=1)
    print(f"\n{arch}: PGD-20 on {len(y)} digits: robcomp {statistics.median(t_ours) * 1e3:.1f} ms, "
          f"plain loop {statistics.median(t_plain) * 1e3:.1f} ms, ratio {ratio:.3f}")
    assert ratio < 1.25, f"robcomp PGD is {ratio:.2f}x the plain loop"
