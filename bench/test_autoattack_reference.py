"""robcomp's ``standard`` preset against the same four attacks in torchattacks, at AutoAttack's
standard settings, on the digits CNN: robust accuracy after each member and wall time.

Run: ``python -m pytest bench/test_autoattack_reference.py --benchmark-only -s`` (needs
``torchattacks``, installed with ``pip install --no-deps torchattacks``: its metadata requires
torchvision, but the attacks used here import without it). Results go to
``bench/results/autoattack-vs-torchattacks-<device>.json`` (atomic write) and are quoted in
docs/evaluation.md.

Equal settings: torchattacks' ``AutoAttack`` class does *not* use AutoAttack's budgets (its
members default to 10 iterations and a rescaled Square schedule), so the torchattacks side is
built member by member at the reference values -- APGD-CE and APGD-T 100 iterations, 1 restart,
rho 0.75, 9 targets; FAB multi-targeted 100 iterations, 9 targets, alpha_max 0.1, eta 1.05,
beta 0.9; Square 5000 queries, p_init 0.8, ``resc_schedule=False`` -- and run as AutoAttack does:
each member only on the points every earlier member left robust, scored by one forward pass.
Both sides attack the same model on the same images in the same process, one thread.
"""
import json
import time
from pathlib import Path

import pytest
import torch

from bench.harness import environment
from robcomp._io import write_text_atomic
from robcomp.attacks import preset
from robcomp.training.train import TrainConfig, train
from robcomp.zoo.data import load_digits_split
from robcomp.zoo.models import build_model

torchattacks = pytest.importorskip("torchattacks")

torch.set_num_threads(1)
# (label, training, threat models): a standard and a PGD-trained CNN
MODELS = [("standard", TrainConfig(epochs=8, seed=0), [("Linf", 0.1), ("Linf", 0.2), ("L2", 0.5)]),
          ("PGD-AT eps 0.2", TrainConfig(epochs=8, seed=0, adversarial=True, eps=0.2), [("Linf", 0.2)])]
EXAMPLES = 150  # the first 150 test images: full budgets on 2 shared CPU cores stay within minutes
RESULTS = Path(__file__).resolve().parent / "results"


def torchattacks_standard(model, norm, eps):
    ta = torchattacks
    return [
        ("APGD-CE", ta.APGD(model, norm=norm, eps=eps, steps=100, n_restarts=1, loss="ce", rho=0.75, seed=0)),
        ("APGD-T", ta.APGDT(model, norm=norm, eps=eps, steps=100, n_restarts=1, rho=0.75, n_classes=10, seed=0)),
        ("FAB-T", ta.FAB(model, norm=norm, eps=eps, steps=100, n_restarts=1, alpha_max=0.1, eta=1.05, beta=0.9,
                         multi_targeted=True, n_classes=10, seed=0)),
        ("Square", ta.Square(model, norm=norm, eps=eps, n_queries=5000, n_restarts=1, p_init=0.8, loss="margin",
                             resc_schedule=False, seed=0)),
    ]


@torch.no_grad()
def _correct(model, x, y):
    return model(x).argmax(1) == y


def cascade(model, x, y, members):
    """AutoAttack's order of play: each member on the still-robust points; robust accuracy after each."""
    robust = _correct(model, x, y)
    out = []
    for name, attack in members:
        t0 = time.perf_counter()
        idx = robust.nonzero().squeeze(1)
        if idx.numel():
            x_adv = attack(x[idx], y[idx]).detach()
            dist = (x_adv - x[idx]).flatten(1)
            assert float(dist.abs().amax(1).max() if attack.norm == "Linf" else dist.norm(dim=1).max()) \
                <= attack.eps + 1e-4
            robust[idx[~_correct(model, x_adv, y[idx])]] = False
        out.append({"member": name, "robust_accuracy_after": float(robust.float().mean()),
                    "time_s": time.perf_counter() - t0})
    return out


def test_standard_preset_vs_torchattacks(benchmark):
    if benchmark.disabled:
        pytest.skip("full AutoAttack budgets take minutes: this comparison runs with --benchmark-only, "
                    "not under --benchmark-disable")
    xtr, ytr, x, y = load_digits_split(seed=0)
    x, y = x[:EXAMPLES], y[:EXAMPLES]
    rows = []
    for label, config, cases in MODELS:
        torch.manual_seed(0)
        model = train(build_model("cnn"), xtr, ytr, config, progress=False).eval()
        clean = float(_correct(model, x, y).float().mean())
        for norm, eps in cases:
            ens = preset("standard", eps, norm=norm, seed=0)
            t0 = time.perf_counter()
            res = ens.run(model, x, y)
            ours_s = time.perf_counter() - t0
            ours = [{"member": m["name"], "robust_accuracy_after": m["robust"] / len(y), "time_s": m["time_s"]}
                    for m in res.members]
            t0 = time.perf_counter()
            theirs = cascade(model, x, y, torchattacks_standard(model, norm, eps))
            theirs_s = time.perf_counter() - t0
            row = {"model": label, "training": config.to_dict(), "clean_accuracy": clean, "norm": norm, "eps": eps,
                   "robcomp": {"members": ours, "robust_accuracy": ours[-1]["robust_accuracy_after"], "time_s": ours_s},
                   "torchattacks": {"members": theirs, "robust_accuracy": theirs[-1]["robust_accuracy_after"],
                                    "time_s": theirs_s},
                   "time_ratio_robcomp_over_torchattacks": ours_s / theirs_s}
            rows.append(row)
            print(f"\n{label} CNN (clean {clean:.4f}), {norm} eps={eps:g}: robust accuracy robcomp "
                  f"{row['robcomp']['robust_accuracy']:.4f} ({ours_s:.1f} s), torchattacks "
                  f"{row['torchattacks']['robust_accuracy']:.4f} ({theirs_s:.1f} s)")
            for a, b in zip(ours, theirs):
                print(f"   after {b['member']:8s} robcomp {a['robust_accuracy_after']:.4f} ({a['time_s']:.1f} s)"
                      f"   torchattacks {b['robust_accuracy_after']:.4f} ({b['time_s']:.1f} s)")
            # equal strength up to the sampling noise of 150 points and the attacks' own randomness
            assert row["robcomp"]["robust_accuracy"] <= row["torchattacks"]["robust_accuracy"] + 3 / len(y), row
    result = {"suite": "autoattack-vs-torchattacks", "env": environment("cpu"),
              "torchattacks": torchattacks.__version__, "torch_threads": torch.get_num_threads(),
              "model": "SmallCNN (robcomp.zoo.models 'cnn') trained on the digits train split, seed 0 (see training)",
              "examples": len(y), "input_shape": list(x.shape[1:]), "dtype": str(x.dtype), "cases": rows}
    write_text_atomic(RESULTS / "autoattack-vs-torchattacks-cpu.json", json.dumps(result, indent=1))
    benchmark.extra_info.update({"cases": len(rows)})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
