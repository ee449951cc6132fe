"""``evaluate(model, data, attacks=...)``: accuracy, robustness and speed of one model, in one record.

Robust accuracy counts an example as robust only if it is classified correctly both clean and
under the attack (a clean mistake is never "robust"). Attacks run against the model exactly as
given: compressed layers compute their input gradients from the compressed weights; where a layer
uses a straight-through gradient the record says so (``input_gradients``, ``straight_through``).

Honesty features (see docs/evaluation.md):

* every adversarial example is checked against its threat model (eps ball and [0, 1]);
* sanity checks run next to the evaluation and are reported as named flags (``sanity``);
* :class:`~robcomp.attacks.Ensemble` attacks (AutoAttack style) record per-member statistics;
* twin mode (``twin=``) crafts on a differentiable twin and replays on the deployed model;
* ``state_path=`` makes the evaluation resumable: the counters are written atomically after each
  batch, so a crash loses at most the batch in progress and a resumed run gives the same numbers
  (the attacks' randomness is keyed by example index, see ``robcomp.attacks.base``);
* ``rank``/``world_size`` shard the data by batch; :func:`merge_records` adds shard records up;
* a model without input gradients (``no_input_gradient``) gets its white-box attacks marked not
  applicable while black-box and transfer attacks still run;
* a randomised model is attacked with EOT gradients and scored by a vote over several forwards
  (:mod:`robcomp.evaluation.randomised`); its noise is seeded per batch where torch's generators or a
  ``generator`` attribute supply it, and the record says when repeats will differ.

The record is plain JSON-serialisable data.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from robcomp.evaluation import sanity as _sanity
from robcomp.attacks.base import Attack, NoInputGradient, distance, has_input_gradient
from robcomp.attacks.ensemble import Ensemble
from robcomp.attacks.eot import EOT
from robcomp.layers.sizes import count_nonzero_parameters, count_parameters, model_bytes
from robcomp.evaluation.env import environment
from robcomp._io import write_text_atomic
from robcomp.inputs import (check_device, check_images, check_labels, check_labels_in_range,
                            restores_training_mode)
from robcomp.layers.linear import CompressedLinear
from robcomp.outputs import LogitsModel, with_logits
from robcomp.evaluation.randomised import Predictor, batch_seed, noise_control, seeded_noise
from robcomp.evaluation.timing import count_macs, measure_energy, measure_latency, measure_peak_memory

__all__ = ["evaluate", "merge_records", "gradient_kinds"]

STATE_VERSION = 2
NOT_APPLICABLE = "white-box attack on a model without input gradients"


def _as_batches(data, batch_size: int) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """Yield ``(batch_index, first_example_index, x, y)``."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        for i, start in enumerate(range(0, len(x), batch_size)):
            yield i, start, x[start:start + batch_size], y[start:start + batch_size]
        return
    start = 0
    for i, batch in enumerate(data):
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise TypeError("data must yield (x, y) pairs")
        x, y = batch[0], batch[1]
        yield i, start, x, y
        start += len(x)


def _check_data(data) -> None:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        if len(x) != len(y):
            raise ValueError(f"data: x has {len(x)} examples but y has {len(y)}")
        if len(x) == 0:
            raise ValueError("data is empty")
        return
    if isinstance(data, torch.utils.data.DataLoader):
        return
    raise TypeError("data must be a DataLoader yielding (x, y) or an (x, y) pair of tensors")


def gradient_kinds(model: nn.Module) -> dict[str, str]:
    """How each compressed layer's input gradient is computed ("exact" or "straight-through")."""
    return {name: getattr(m, "gradient", "exact") for name, m in model.named_modules()
            if isinstance(m, CompressedLinear) or hasattr(type(m), "gradient")}


def _model_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            t64 = t.detach().double() if t.is_floating_point() else t.detach().to(torch.float64)
            h.update(f"{name}:{tuple(t.shape)}:{float(t64.sum()):.10e}:{float(t64.abs().sum()):.10e}".encode())
    return h.hexdigest()[:16]


def _write_json_atomic(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(obj))  # fsynced rename, umask permissions (not mkstemp's 0600)


def _eps_key(a: Attack) -> str:
    return f"{a.norm} eps={a.eps:g}"


def _fresh_counts(attacks: Sequence[Attack], twin: bool) -> dict:
    return {
        "examples": 0, "clean_correct": 0, "worst_correct": 0, "done_batches": [],
        "robust_correct": {a.name: 0 for a in attacks},
        "worst_by_eps": {k: 0 for k in dict.fromkeys(_eps_key(a) for a in attacks)},
        "attack_time_s": {a.name: 0.0 for a in attacks},
        "violations": {a.name: 0 for a in attacks},
        "ensembles": {a.name: {"members": [{"name": m.name, "kind": m.kind, "applicable": True, "attacked": 0,
                                             "fooled": 0, "robust": 0, "time_s": 0.0} for m in a.attacks]}
                      for a in attacks if isinstance(a, Ensemble)},
        "twin": {a.name: {"twin_robust": 0, "replay_robust": 0, "disagree": 0} for a in attacks} if twin else None,
        "model_checks": None,  # decided on the first batch, kept across resumed sessions
        "not_applicable": {},
    }


def _model_checks(model, x, y, device, randomised) -> dict:
    """Does the model have input gradients, is its forward random, and is its noise seedable?"""
    with seeded_noise(model, 0, device):  # forked generators: the caller's random stream is left alone
        noise = noise_control(model, x, device)
        gradient = has_input_gradient(model, x, y)
    detected = noise != "deterministic"
    return {"input_gradient": gradient, "randomised_detected": detected,
            "randomised": detected if randomised is None else bool(randomised), "noise": noise}


def _logits_models(model, twin, output_fn, x1, device, dtype):
    """The model (and twin) as forwards returning logits: wrapped when they return a ModelOutput /
    dict / tuple. The probe forward runs on forked generators (the caller's stream is left alone)."""
    x1 = x1.to(device=device, dtype=dtype if x1.is_floating_point() else None)
    with seeded_noise(model, 0, device):
        model = with_logits(model, output_fn, x1)
        twin = None if twin is None else with_logits(twin, None, x1)
    return model, twin


def _applicable(attack: Attack, gradient: bool) -> bool:
    if gradient or attack.kind != "white-box":
        return True
    return isinstance(attack, Ensemble) and any(m.kind != "white-box" for m in attack.attacks)


def _short(name: str) -> str:
    return name.replace(" Linf", "").replace(" L2", "/L2")[:28]


@restores_training_mode
def evaluate(model: nn.Module, data, *, attacks: Sequence[Attack] = (), batch_sizes: Sequence[int] = (1, 256),
             device: torch.device | str | None = None, batch_size: int = 256, latency_repeats: int = 30,
             name: str | None = None, progress: bool = False, seed: int = 0,
             state_path: str | os.PathLike | None = None, rank: int = 0, world_size: int = 1,
             twin: nn.Module | None = None, sanity: bool = True, sanity_examples: int = 128,
             measure: bool = True, randomised: bool | None = None, eot_samples: int = 20, votes: int = 10,
             scoring: str = "majority", output_fn=None, per_example: bool = False) -> dict:
    """Evaluate ``model`` on ``data``: clean and robust accuracy, sanity flags, latency, memory,
    energy, size, MACs. Returns a JSON-serialisable record (fields: docs/evaluation.md).

    ``attacks``: robcomp attacks (an :class:`Ensemble` / preset counts as one attack with
    per-member statistics). ``seed`` salts every attack's keyed randomness. ``state_path``: resume
    from / checkpoint to this JSON file. ``rank``/``world_size``: evaluate only batches
    ``b % world_size == rank``. ``twin``: a differentiable twin to craft on (replayed on
    ``model``). ``sanity``: run the sanity probes on the first ``sanity_examples`` examples.
    ``measure``: latency, peak memory, energy (skip for accuracy-only runs).
    ``randomised``: None detects a random forward on the first batch; True/False force the
    treatment: white-box attacks on ``EOT(model, eot_samples)``, every prediction a ``scoring``
    vote (``"majority"`` or ``"expectation"``) over ``votes`` forwards.
    ``output_fn(output) -> logits``: picks the logits of a model that does not return a tensor
    (default: ``.logits`` / ``["logits"]`` / first element, see :mod:`robcomp.outputs`).
    ``per_example``: also record each example's outcome (``record["per_example"]``: ``index``,
    ``clean``, ``worst`` as 0/1 lists in example order), e.g. to check a sharded run example by example.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    attacks = list(attacks)
    for attack in attacks:
        if not isinstance(attack, Attack):
            raise TypeError(f"attacks must hold robcomp attacks, got {type(attack).__name__}")
    names = [a.name for a in attacks]
    if len(set(names)) != len(names):
        raise ValueError(f"attacks must have distinct names, got {names}")
    if any((not isinstance(b, int)) or isinstance(b, bool) or b < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be positive integers, got {tuple(batch_sizes)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(world_size, int) or world_size < 1 or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
    if twin is not None and not isinstance(twin, nn.Module):
        raise TypeError(f"twin must be an nn.Module, got {type(twin).__name__}")
    if isinstance(eot_samples, bool) or not isinstance(eot_samples, int) or eot_samples < 1:
        raise ValueError(f"eot_samples must be a positive integer, got {eot_samples!r}")
    if randomised not in (None, True, False):
        raise ValueError(f"randomised must be None (detect), True or False, got {randomised!r}")
    Predictor(True, scoring, votes)  # validates scoring and votes
    if output_fn is not None and not callable(output_fn):
        raise TypeError("output_fn must be callable as output_fn(model_output) -> logits tensor")
    _check_data(data)
    try:
        first_param = next(model.parameters())
    except StopIteration:
        first_param = None
    device = check_device(device) if device is not None else (first_param.device if first_param is not None
                                                              else torch.device("cpu"))
    dtype = first_param.dtype if first_param is not None and first_param.is_floating_point() else torch.float32
    model = model.to(device).eval()
    if twin is not None:
        twin = twin.to(device).eval()

    fingerprint = {"version": STATE_VERSION, "attacks": [a.to_dict() for a in attacks], "batch_size": batch_size,
                   "rank": rank, "world_size": world_size, "seed": seed, "model": _model_digest(model),
                   "twin": None if twin is None else _model_digest(twin),
                   "randomised": randomised, "eot_samples": eot_samples, "votes": votes, "scoring": scoring,
                   **({"per_example": True} if per_example else {})}  # absent when off: older states still resume
    state_path = Path(state_path) if state_path is not None else None
    counts = _fresh_counts(attacks, twin is not None)
    if per_example:
        counts["per_example"] = {"index": [], "clean": [], "worst": []}
    if state_path is not None and state_path.exists():
        saved = json.loads(state_path.read_text())
        if saved.get("fingerprint") != json.loads(json.dumps(fingerprint)):
            raise ValueError(f"state_path {str(state_path)!r} holds the state of a different evaluation "
                             "(model, attacks, batch size, seed or shard differ): delete it or choose another path")
        counts = saved["counts"]
    done = set(counts["done_batches"])

    input_shape, sanity_x, sanity_y = None, [], []
    bar = tqdm(desc=f"evaluate {name or ''}".strip(), disable=not progress, leave=False, unit="batch")
    for b, start, x, y in _as_batches(data, batch_size):
        if b % world_size != rank:
            continue
        check_images(x, "data x")
        check_labels(y, len(x), "data y")
        if input_shape is None:
            input_shape = tuple(x.shape[1:])
            model, twin = _logits_models(model, twin, output_fn, x[:1], device, dtype)
        x = x.to(device=device, dtype=dtype if x.is_floating_point() else None)
        y = y.to(device)
        if len(x) == 0:
            raise ValueError(f"data: batch {b} is empty")
        with torch.no_grad():
            n_classes = model(x[:1]).shape[-1]
        check_labels_in_range(y, n_classes, "data y")
        if sanity and sum(len(t) for t in sanity_x) < sanity_examples:
            need = sanity_examples - sum(len(t) for t in sanity_x)
            sanity_x.append(x[:need])
            sanity_y.append(y[:need])
        if counts["model_checks"] is None:
            counts["model_checks"] = _model_checks(model, x[:sanity_examples], y[:sanity_examples], device,
                                                   randomised)
        if b in done:
            continue
        with seeded_noise(model, batch_seed(seed, b), device):
            _evaluate_batch(model, twin, attacks, counts, x, y, torch.arange(start, start + len(x), device=device),
                            seed, eot_samples, Predictor(counts["model_checks"]["randomised"], scoring, votes))
        c = counts
        c["done_batches"].append(b)
        if state_path is not None:
            _write_json_atomic(state_path, {"fingerprint": fingerprint, "counts": counts})
        bar.update(1)
        if progress:
            n = c["examples"]
            bar.set_postfix({"clean": f"{c['clean_correct'] / n:.3f}",
                             **{_short(k): f"{v / n:.3f}" for k, v in c["robust_correct"].items()}})
    bar.close()
    total = counts["examples"]
    if total == 0:
        raise ValueError("data yielded no example" + (f" for shard rank={rank} of {world_size}" if world_size > 1
                                                      else ""))
    return _record(model, attacks, counts, total, input_shape, device, dtype, name=name, seed=seed, rank=rank,
                   world_size=world_size, batch_sizes=batch_sizes, latency_repeats=latency_repeats,
                   sanity_data=(torch.cat(sanity_x), torch.cat(sanity_y)) if sanity and sanity_x else None,
                   measure=measure, twin=twin is not None, scoring=scoring, votes=votes, eot_samples=eot_samples)


def _evaluate_batch(model, twin, attacks, counts, x, y, ids, seed, eot_samples, predict: Predictor) -> None:
    """Clean and robust counts of one batch (added to ``counts`` in place)."""
    c = counts
    gradient = c["model_checks"]["input_gradient"]
    # white-box attacks see the EOT-marked model (mean gradient over eot_samples forwards)
    target = EOT(model, eot_samples) if predict.randomised and eot_samples > 1 else model
    clean_ok = predict(model, x) == y
    c["examples"] += len(y)
    c["clean_correct"] += int(clean_ok.sum())
    robust_all = clean_ok.clone()
    by_eps = {k: clean_ok.clone() for k in c["worst_by_eps"]}
    for attack in attacks:
        if not _applicable(attack, gradient):
            c["not_applicable"][attack.name] = NOT_APPLICABLE
            continue
        t0 = time.perf_counter()
        try:
            if isinstance(attack, Ensemble):
                res = attack.run(target, x, y, ids=ids, salt=seed, clean_ok=clean_ok,
                                 predict=lambda m, xx: predict(model, xx), white_box=gradient)
                x_adv, robust = res.x_adv, res.robust  # the ensemble's own verdict: no re-scoring
            else:
                x_adv = attack(target, x, y, ids=ids, salt=seed)
                robust = clean_ok & (predict(model, x_adv) == y)
        except NoInputGradient as e:  # e.g. a transfer attack whose source has no input gradient
            c["not_applicable"][attack.name] = str(e)
            continue
        if isinstance(attack, Ensemble):
            for acc, m in zip(c["ensembles"][attack.name]["members"], res.members):
                acc["applicable"] = m["applicable"]
                for k in ("attacked", "fooled", "robust", "time_s"):
                    acc[k] += m[k]
        c["attack_time_s"][attack.name] += time.perf_counter() - t0
        c["robust_correct"][attack.name] += int(robust.sum())
        robust_all &= robust
        by_eps[_eps_key(attack)] &= robust
        outside = (distance(x_adv, x, attack.norm) > attack.eps + 1e-5) | \
            (x_adv.flatten(1).amin(1) < 0) | (x_adv.flatten(1).amax(1) > 1)
        c["violations"][attack.name] += int(outside.sum())
        if twin is not None:
            x_tw = attack(twin, x, y, ids=ids, salt=seed)
            with torch.no_grad():
                twin_clean = twin(x).argmax(-1) == y
                pred_tw = twin(x_tw).argmax(-1)
            pred_dep = predict(model, x_tw)
            t = c["twin"][attack.name]
            t["twin_robust"] += int((twin_clean & (pred_tw == y)).sum())
            t["replay_robust"] += int((clean_ok & (pred_dep == y)).sum())
            t["disagree"] += int((pred_tw != pred_dep).sum())
    c["worst_correct"] += int(robust_all.sum())
    if c.get("per_example") is not None:
        pe = c["per_example"]
        pe["index"] += ids.tolist()
        pe["clean"] += clean_ok.int().tolist()
        pe["worst"] += robust_all.int().tolist()
    for k, v in by_eps.items():
        c["worst_by_eps"][k] += int(v.sum())


def _record(model, attacks, counts, total, input_shape, device, dtype, *, name, seed, rank, world_size,
            batch_sizes, latency_repeats, sanity_data, measure, twin, scoring, votes, eot_samples) -> dict:
    c = counts
    na = c["not_applicable"]
    robust = {k: None if k in na else v / total for k, v in c["robust_correct"].items()}
    applicable_eps = {_eps_key(a) for a in attacks if a.name not in na}
    mc = c["model_checks"] or {"input_gradient": None, "randomised_detected": False, "randomised": False,
                               "noise": "deterministic"}
    predictor = Predictor(mc["randomised"], scoring, votes)
    ensembles = {}
    for ens_name, stats in c["ensembles"].items():
        ensembles[ens_name] = {"members": [{**m, "robust_accuracy_after": m["robust"] / total} for m in stats["members"]]}
    kinds = gradient_kinds(model.model if isinstance(model, LogitsModel) else model)  # the user's layer names
    straight = sorted(k for k, v in kinds.items() if v == "straight-through")
    record = {
        "model": name,
        "examples": total,
        "clean_accuracy": c["clean_correct"] / total,
        "robust_accuracy": robust,
        "robust_accuracy_by_eps": {k: v / total if k in applicable_eps else None for k, v in c["worst_by_eps"].items()},
        # per example: robust only if no applicable attack succeeded on it
        "worst_case_robust_accuracy": c["worst_correct"] / total if applicable_eps else None,
        "not_applicable": dict(na),
        "no_input_gradient": mc["input_gradient"] is False,
        "randomised": {"forward": mc["randomised_detected"], "treated": mc["randomised"],
                       "eot_samples": eot_samples if mc["randomised"] else 1,
                       "scoring": predictor.describe(), "noise": mc["noise"]},
        "randomness": {"attacks": "keyed by (attack seed, evaluation seed, example index): repeatable",
                       "model": {"deterministic": "no random forward",
                                 "seeded": "seeded per batch from the evaluation seed: repeatable",
                                 "uncontrolled": "noise from a source the evaluation cannot seed: "
                                                 "repeated evaluations differ"}[mc["noise"]],
                       "repeatable": mc["noise"] != "uncontrolled"},
        "attacks": [a.to_dict() for a in attacks],
        "attack_time_s": dict(c["attack_time_s"]),
        "ensembles": ensembles,
        "counts": {k: c[k] for k in ("examples", "clean_correct", "worst_correct", "robust_correct", "worst_by_eps")},
        "shard": {"rank": rank, "world_size": world_size},
        **({"per_example": c["per_example"]} if c.get("per_example") is not None else {}),
        "seed": seed,
        "dtype": str(dtype).replace("torch.", ""),
        "model_bytes": model_bytes(model),
        "parameters": count_parameters(model),
        **count_nonzero_parameters(model),
        "input_gradients": kinds,
        "straight_through": straight,
        "gradient": "straight-through" if straight else "exact",
    }
    if twin:
        record["twin"] = {k: None if k in na else {"twin_robust_accuracy": v["twin_robust"] / total,
                                                   "replay_robust_accuracy": v["replay_robust"] / total,
                                                   "disagreement": v["disagree"] / total}
                          for k, v in c["twin"].items()}
    if input_shape is not None:
        record["macs"] = count_macs(model, input_shape, device=device, dtype=dtype)
    # sanity flags
    checks = _sanity.check_results(attacks, robust, total, violations=c["violations"], ensembles=ensembles)
    if sanity_data is not None:
        # probe at the white-box epsilon where the model is neither broken nor untouched (robust
        # accuracy closest to half the clean accuracy): there more steps have the most to find
        white = [a for a in attacks if a.kind in ("white-box", "ensemble") and a.eps > 0
                 and robust[a.name] is not None and a.norm in ("Linf", "L2")]
        half = c["clean_correct"] / total / 2
        eps_attack = min(white, key=lambda a: (abs(robust[a.name] - half), a.eps)) if white else None
        with seeded_noise(model, batch_seed(seed, -1), device):
            probes = _sanity.probe_model(model, *sanity_data, eps=eps_attack.eps if eps_attack else None,
                                         norm=eps_attack.norm if eps_attack else "Linf", salt=seed,
                                         eot_samples=eot_samples if mc["randomised"] else 1, predict=predictor)
        from_results = checks.pop("more_iterations_weaker")
        from_probe = probes.pop("more_iterations_weaker")
        flagged = [f["flagged"] for f in (from_results, from_probe) if f["flagged"] is not None]
        checks["more_iterations_weaker"] = {"flagged": any(flagged) if flagged else None,
                                            "value": {"results": from_results["value"], "probe": from_probe["value"]},
                                            "threshold": from_probe["threshold"],
                                            "detail": f"results: {from_results['detail']}; {from_probe['detail']}"}
        checks.update(probes)
    gradient = mc["input_gradient"]
    checks["no_input_gradient"] = _sanity.no_input_gradient_flag(gradient, sorted(na))
    record["sanity"] = {k: checks[k] for k in _sanity.FLAGS if k in checks}
    record["sanity_flags"] = _sanity.flagged_names(record["sanity"])
    if measure and input_shape is not None:
        record["latency"] = {str(b): measure_latency(model, input_shape, b, device=device, dtype=dtype,
                                                     repeats=latency_repeats) for b in batch_sizes}
        largest = max(batch_sizes) if batch_sizes else 1
        record["peak_memory"] = measure_peak_memory(model, input_shape, largest, device=device, dtype=dtype)
        record["energy"] = measure_energy(model, input_shape, largest, device=device, dtype=dtype)
    else:
        record["latency"] = {}
    record["env"] = environment(device)
    # which implementation each compressed layer ran, per dtype and row bucket (robcomp.layers.dispatch)
    from robcomp.layers.linear import layer_paths
    record["paths"] = layer_paths(model)
    return record


def merge_records(records: Sequence[dict]) -> dict:
    """Combine the accuracy counts of shard records (``rank`` 0..world_size-1) into one record.

    Accuracies are recomputed from the summed counts, ensemble member statistics are summed,
    ``per_example`` outcomes (when every record has them) are joined in example order; sanity
    flags are OR-ed; measurements (latency, memory) are taken from the first record.
    """
    if not records:
        raise ValueError("records is empty")
    out = json.loads(json.dumps(records[0]))
    counts = {"examples": 0, "clean_correct": 0, "worst_correct": 0,
              "robust_correct": {k: 0 for k in out["counts"]["robust_correct"]},
              "worst_by_eps": {k: 0 for k in out["counts"]["worst_by_eps"]}}
    for r in records:
        rc = r["counts"]
        for k in ("examples", "clean_correct", "worst_correct"):
            counts[k] += rc[k]
        for sub in ("robust_correct", "worst_by_eps"):
            for k, v in rc[sub].items():
                counts[sub][k] += v
    n = counts["examples"]
    out["counts"] = counts
    out["examples"] = n
    out["clean_accuracy"] = counts["clean_correct"] / n
    na = {k: v for r in records for k, v in r.get("not_applicable", {}).items()}
    out["not_applicable"] = na
    out["robust_accuracy"] = {k: None if k in na else v / n for k, v in counts["robust_correct"].items()}
    out["robust_accuracy_by_eps"] = {k: None if out["robust_accuracy_by_eps"].get(k) is None else v / n
                                     for k, v in counts["worst_by_eps"].items()}
    if out["worst_case_robust_accuracy"] is not None:
        out["worst_case_robust_accuracy"] = counts["worst_correct"] / n
    out["attack_time_s"] = {k: sum(r["attack_time_s"][k] for r in records) for k in out["attack_time_s"]}
    out["shard"] = {"merged": [r["shard"] for r in records]}
    for ens_name, stats in out.get("ensembles", {}).items():
        for i, m in enumerate(stats["members"]):
            for k in ("attacked", "fooled", "robust", "time_s"):
                m[k] = sum(r["ensembles"][ens_name]["members"][i][k] for r in records)
            m["applicable"] = all(r["ensembles"][ens_name]["members"][i]["applicable"] for r in records)
            m["robust_accuracy_after"] = m["robust"] / n
    if all("per_example" in r for r in records):
        keys = ("index", "clean", "worst")
        rows = sorted(row for r in records for row in zip(*(r["per_example"][k] for k in keys)))
        out["per_example"] = {k: [row[i] for row in rows] for i, k in enumerate(keys)}
    else:
        out.pop("per_example", None)
    flags = sorted({f for r in records for f in r.get("sanity_flags", [])})
    out["sanity_flags"] = flags
    return out
