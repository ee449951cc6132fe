"""The study specification: a TOML file saying which points a study runs and which question each
group of points answers (``robcomp/study/default_study.toml`` is the shipped default; ``robcomp run
--print-config`` prints it, ``robcomp run --config my.toml`` runs another one).

A study is a list of experiments. Each experiment has a ``kind`` (the analysis its report section
runs) and expands into points: models x widths x bases (how the dense parent was trained) x
recipes x training regimes x seeds, plus the dense parent of each (the reference every compressed
point is compared with). A point is identified by the hash of everything that determines its
result (:func:`point_id`), so a rerun skips finished points.

Regimes: ``post`` (compress, no retraining), ``finetune`` (compression-aware fine-tuning with the
clean loss where the recipe supports it, else compress then fine-tune what stays trainable) and
``adv_finetune`` (the same with PGD adversarial examples). Kinds: ``sweep``, ``compact``,
``capacity``, ``equal_bytes``, ``efficiency`` (docs/study.md describes each). Nothing in here is
specific to a recipe: recipes are named as on the command line (``NAME`` or
``NAME:key=value,...``) and ``recipes = "all"`` means every recipe in ``robcomp.recipes.RECIPES``
at its defaults.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["StudySpec", "Experiment", "Point", "load_spec", "shipped_studies", "shipped_spec_text", "parse_spec", "default_spec", "quick_spec",
           "default_spec_text", "point_id", "KINDS", "REGIMES", "BASES", "make_attacks", "parse_attack",
           "default_width", "recipe_label", "SpecError", "spec_from_dict"]

KINDS = ("sweep", "compact", "capacity", "equal_bytes", "efficiency")
#: "matched" fine-tunes in the base's own regime: standard -> finetune, adversarial -> adv_finetune
REGIMES = ("post", "finetune", "adv_finetune", "matched")
BASES = ("standard", "adversarial")
X_AXES = ("auto", "bytes_ratio", "nonzero_ratio")

_TRAIN_KEYS = {"epochs": int, "batch_size": int, "lr": float, "weight_decay": float, "eps": float, "pgd_steps": int}
_FINETUNE_KEYS = {"epochs": int, "lr": float}


class SpecError(ValueError):
    """An invalid study specification; the message names the offending key."""


def _check_type(where: str, value: Any, kind) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise SpecError(f"{where} must be an integer, got {value!r}")
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise SpecError(f"{where} must be {kind.__name__}, got {value!r}")
    return value


def _table(d: dict, where: str, keys: dict, defaults: dict) -> dict:
    unknown = set(d) - set(keys)
    if unknown:
        raise SpecError(f"[{where}]: unknown key(s) {sorted(unknown)}; accepted: {sorted(keys)}")
    out = dict(defaults)
    for k, v in d.items():
        out[k] = _check_type(f"{where}.{k}", v, keys[k])
    return out


# ----------------------------------------------------------------------------------- attacks
def parse_attack(text: str, seed: int = 0):
    """``fgsm:eps=0.1``, ``pgd:eps=0.1,steps=10``, ``apgd:eps=0.1,loss=dlr``, ``square:eps=0.1,
    n_queries=500`` or ``preset:name=standard,eps=0.1``: any class exported by ``robcomp.attacks``
    (matched case-insensitively), or a preset."""
    import inspect

    import robcomp.attacks as A
    from robcomp.options import parse_options

    name, kwargs = parse_options(text, "attack", SpecError)
    if "eps" not in kwargs:
        raise SpecError(f"attack {text!r} needs eps=..., e.g. pgd:eps=0.1,steps=10")
    if name.lower() == "preset":
        preset_name = kwargs.pop("name", None)
        try:
            return A.preset(preset_name, kwargs.pop("eps"), seed=seed, **kwargs)
        except (TypeError, ValueError) as e:
            raise SpecError(f"attack {text!r}: {e}") from None
    classes = {n.lower(): getattr(A, n) for n in A.__all__ if inspect.isclass(getattr(A, n, None))
               and issubclass(getattr(A, n), A.Attack) and n not in ("Attack", "Ensemble", "Transfer")}
    cls = classes.get(name.lower())
    if cls is None:
        raise SpecError(f"unknown attack {name!r} in {text!r}; known: {', '.join(sorted(classes))}, preset")
    if "seed" in inspect.signature(cls).parameters and "seed" not in kwargs:
        kwargs["seed"] = seed
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise SpecError(f"attack {text!r}: {e}") from None


def make_attacks(texts, seed: int = 0) -> list:
    return [parse_attack(t, seed) for t in texts]


# ----------------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class Experiment:
    name: str
    kind: str
    title: str
    question: str = ""
    models: tuple[str, ...] = ("mlp",)
    widths: dict = field(default_factory=dict)  # model -> list of widths (None: model default)
    bases: tuple[str, ...] = ("adversarial",)
    recipes: tuple[str, ...] = ()
    regimes: tuple[str, ...] = ("post",)
    compact_widths: dict = field(default_factory=dict)  # compact: model -> small dense widths
    x: str = "auto"
    seeds: tuple[int, ...] | None = None  # None: the study's seeds
    batch_sizes: tuple[int, ...] | None = None  # None: the study's evaluate.batch_sizes

    def widths_for(self, model: str) -> list:
        return list(self.widths.get(model, [default_width(model)]))


def default_width(model: str) -> int | None:
    """The width a model is built with when none is given (its constructor's default)."""
    import inspect

    from robcomp.zoo.models import MODELS

    param = inspect.signature(MODELS[model]).parameters.get("width")
    return None if param is None or param.default is inspect.Parameter.empty else param.default


@dataclass(frozen=True)
class StudySpec:
    name: str = "study"
    description: str = ""
    seeds: tuple[int, ...] = (0,)
    threads: int = 1
    data_seed: int = 0
    test_examples: int = 0  # 0: the whole test split
    headline_eps: float = 0.1
    critical_drop: float = 0.03
    train: dict = field(default_factory=dict)
    finetune: dict = field(default_factory=dict)
    attacks: tuple[str, ...] = ()
    batch_sizes: tuple[int, ...] = (1, 256)
    latency_repeats: int = 20
    sanity: bool = True
    layer_timing: bool = True
    families: dict = field(default_factory=dict)
    experiments: tuple[Experiment, ...] = ()
    #: ``[kernel_sweep]``: each layer format vs dense over layer size and batch (robcomp.evaluation.kernel_sweep)
    kernel_sweep: dict = field(default_factory=lambda: dict(_SWEEP_DEFAULTS))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def spec_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def family(self, recipe_name: str) -> str:
        for fam, names in self.families.items():
            if recipe_name in names:
                return fam
        return "other"

    def replace(self, **changes) -> "StudySpec":
        return dataclasses.replace(self, **changes)

    # points -----------------------------------------------------------------------------
    def points(self) -> list["Point"]:
        """Every point of the study, in a fixed order (dense parents first within a group)."""
        out: list[Point] = []
        seen: set[str] = set()

        def add(p: Point) -> None:
            if p.id not in seen:
                seen.add(p.id)
                out.append(p)

        for ex in self.experiments:
            seeds = ex.seeds if ex.seeds is not None else self.seeds
            for model in ex.models:
                for seed in seeds:
                    for base in ex.bases:
                        for width in ex.widths_for(model):
                            add(self._point(ex, model, width, base, None, "dense", seed))
                            for recipe in ex.recipes:
                                for regime in ex.regimes:
                                    add(self._point(ex, model, width, base, recipe, regime, seed))
                        if ex.kind == "compact":
                            for width in ex.compact_widths.get(model, []):
                                add(self._point(ex, model, width, base, None, "dense", seed, role="compact"))
        return out

    def _point(self, ex: Experiment, model: str, width, base: str, recipe: str | None, regime: str, seed: int,
               role: str | None = None) -> "Point":
        from robcomp.recipes import parse_recipe

        rdict = None if recipe is None else parse_recipe(recipe).to_dict()
        role = role or ("dense" if recipe is None else "compressed")
        if regime == "matched":
            regime = "adv_finetune" if base == "adversarial" else "finetune"
        ft = None
        if regime in ("finetune", "adv_finetune"):
            ft = {**self.finetune, "adversarial": regime == "adv_finetune", "eps": self.train["eps"],
                  "pgd_steps": self.train["pgd_steps"], "batch_size": self.train["batch_size"],
                  "weight_decay": self.train["weight_decay"], "seed": seed + 1}
        config = {
            "experiment": ex.name, "kind": ex.kind, "role": role, "model": model, "width": width, "base": base,
            "recipe": rdict, "regime": regime, "seed": seed,
            "train": {**self.train, "adversarial": base == "adversarial", "seed": seed},
            "finetune": ft,
            "data": {"name": "digits", "seed": self.data_seed, "test_examples": self.test_examples},
            "attacks": list(self.attacks), "batch_sizes": list(ex.batch_sizes or self.batch_sizes),
            "latency_repeats": self.latency_repeats, "sanity": self.sanity,
            "layer_timing": self.layer_timing and ex.kind == "efficiency",
        }
        return Point(config)


@dataclass(frozen=True)
class Point:
    config: dict

    @property
    def id(self) -> str:
        return point_id(self.config)

    def __getattr__(self, key):
        try:
            return self.__dict__["config"][key]
        except KeyError:
            raise AttributeError(key) from None

    @property
    def recipe_label(self) -> str:
        return recipe_label(self.config["recipe"])


def recipe_label(recipe: dict | None) -> str:
    """``Recipe.label()`` (non-default fields), naming the first numeric field even when it is at
    its default, so that sweep points read ``magnitude_prune(sparsity=0.5)``, not ``magnitude_prune``."""
    if recipe is None:
        return "dense"
    from robcomp.recipes import recipe_from_dict

    r = recipe_from_dict(recipe)
    label = r.label()
    if "(" in label:
        return label
    numeric = [(k, v) for k, v in dataclasses.asdict(r).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not numeric:
        return label
    k, v = numeric[0]
    return f"{r.name}({k}={v:g})" if isinstance(v, float) else f"{r.name}({k}={v})"


def point_id(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


_STUDY_KEYS = {"name": str, "description": str, "seeds": list, "threads": int, "data_seed": int,
               "test_examples": int, "headline_eps": float, "critical_drop": float}
_EVAL_KEYS = {"attacks": list, "batch_sizes": list, "latency_repeats": int, "sanity": bool, "layer_timing": bool}
_EXP_KEYS = {"name": str, "kind": str, "title": str, "question": str, "models": list, "widths": dict, "bases": list,
             "recipes": (list, str), "regimes": list, "compact_widths": dict, "x": str, "seeds": list,
             "batch_sizes": list}
_SWEEP_KEYS = {"enabled": bool, "sizes": list, "batches": list, "budget_s": float}
#: a spec without a [kernel_sweep] table runs none (the shipped default study has one)
_SWEEP_DEFAULTS = {"enabled": False, "sizes": [256, 1024, 4096], "batches": [1, 16, 256], "budget_s": 0.1}
_TRAIN_DEFAULTS = {"epochs": 20, "batch_size": 64, "lr": 3e-3, "weight_decay": 1e-4, "eps": 0.1, "pgd_steps": 5}
_FT_DEFAULTS = {"epochs": 4, "lr": 1e-3}


def _int_list(where: str, v, positive=False) -> tuple:
    if not isinstance(v, list) or not v:
        raise SpecError(f"{where} must be a non-empty list of integers, got {v!r}")
    for x in v:
        _check_type(where, x, int)
        if positive and x < 1:
            raise SpecError(f"{where} must hold positive integers, got {x!r}")
    return tuple(v)


def _widths(where: str, d: dict, models) -> dict:
    from robcomp.zoo.models import MODELS

    out = {}
    for m, ws in d.items():
        if m not in MODELS:
            raise SpecError(f"{where}: unknown model {m!r}; known: {', '.join(MODELS)}")
        out[m] = list(_int_list(f"{where}.{m}", ws, positive=True))
    return out


def parse_spec(data: dict, *, source: str = "spec") -> StudySpec:
    """Validate a spec given as the dict TOML parses into; errors name the offending key."""
    from robcomp.zoo.models import MODELS
    from robcomp.recipes import RECIPES, parse_recipe

    data = copy.deepcopy(data)
    top_unknown = set(data) - {"study", "train", "finetune", "evaluate", "families", "kernel_sweep", "experiment"}
    if top_unknown:
        raise SpecError(f"{source}: unknown table(s) {sorted(top_unknown)}; accepted: study, train, finetune, "
                        "evaluate, families, kernel_sweep, [[experiment]]")
    st = data.get("study", {})
    unknown = set(st) - set(_STUDY_KEYS)
    if unknown:
        raise SpecError(f"[study]: unknown key(s) {sorted(unknown)}; accepted: {sorted(_STUDY_KEYS)}")
    kw: dict[str, Any] = {}
    for k, v in st.items():
        kw[k] = _check_type(f"study.{k}", v, _STUDY_KEYS[k])
    if "seeds" in kw:
        kw["seeds"] = _int_list("study.seeds", kw["seeds"])
    if kw.get("threads", 1) < 1:
        raise SpecError(f"study.threads must be >= 1, got {kw['threads']}")
    if not 0 < kw.get("critical_drop", 0.03) < 1:
        raise SpecError("study.critical_drop must be in (0, 1) (a fraction of the test set)")
    kw["train"] = _table(data.get("train", {}), "train", _TRAIN_KEYS, _TRAIN_DEFAULTS)
    kw["finetune"] = _table(data.get("finetune", {}), "finetune", _FINETUNE_KEYS, _FT_DEFAULTS)
    from robcomp.training.train import TrainConfig

    try:
        TrainConfig(**kw["train"])
        TrainConfig(**{**kw["train"], **kw["finetune"]})
    except ValueError as e:
        raise SpecError(f"[train]/[finetune]: {e}") from None
    ev = data.get("evaluate", {})
    unknown = set(ev) - set(_EVAL_KEYS)
    if unknown:
        raise SpecError(f"[evaluate]: unknown key(s) {sorted(unknown)}; accepted: {sorted(_EVAL_KEYS)}")
    attacks = ev.get("attacks", ["fgsm:eps=0.1", "pgd:eps=0.1,steps=10"])
    if not isinstance(attacks, list) or not attacks or not all(isinstance(a, str) for a in attacks):
        raise SpecError("evaluate.attacks must be a non-empty list of strings like 'pgd:eps=0.1,steps=10'")
    made = make_attacks(attacks)  # validates
    if len({a.name for a in made}) != len(made):
        raise SpecError(f"evaluate.attacks: two attacks have the same name: {[a.name for a in made]}")
    kw["attacks"] = tuple(attacks)
    if "batch_sizes" in ev:
        kw["batch_sizes"] = _int_list("evaluate.batch_sizes", ev["batch_sizes"], positive=True)
    for k in ("latency_repeats", "sanity", "layer_timing"):
        if k in ev:
            kw[k] = _check_type(f"evaluate.{k}", ev[k], _EVAL_KEYS[k])
    fam = data.get("families", {})
    for f, names in fam.items():
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise SpecError(f"families.{f} must be a list of recipe names")
    kw["families"] = fam
    if "kernel_sweep" in data:
        ks = _table(data["kernel_sweep"], "kernel_sweep", _SWEEP_KEYS, {**_SWEEP_DEFAULTS, "enabled": True})
        ks["sizes"] = list(_int_list("kernel_sweep.sizes", ks["sizes"], positive=True))
        ks["batches"] = list(_int_list("kernel_sweep.batches", ks["batches"], positive=True))
        if not ks["budget_s"] > 0:
            raise SpecError(f"kernel_sweep.budget_s must be positive, got {ks['budget_s']}")
        kw["kernel_sweep"] = ks
    eps_available = sorted({a.eps for a in made})
    if "headline_eps" in kw and not any(abs(e - kw["headline_eps"]) < 1e-12 for e in eps_available):
        raise SpecError(f"study.headline_eps = {kw['headline_eps']} is not the eps of any attack "
                        f"(attacks have {eps_available})")
    kw.setdefault("headline_eps", max(eps_available))
    exps = data.get("experiment", [])
    if not isinstance(exps, list) or not exps:
        raise SpecError(f"{source}: needs at least one [[experiment]]")
    experiments, names = [], set()
    for i, e in enumerate(exps):
        where = f"experiment[{i}]" + (f" ({e.get('name')})" if isinstance(e, dict) and e.get("name") else "")
        if not isinstance(e, dict):
            raise SpecError(f"{where} must be a table")
        unknown = set(e) - set(_EXP_KEYS)
        if unknown:
            raise SpecError(f"{where}: unknown key(s) {sorted(unknown)}; accepted: {sorted(_EXP_KEYS)}")
        for req in ("name", "kind"):
            if req not in e:
                raise SpecError(f"{where}: missing key {req!r}")
        for k, v in e.items():
            _check_type(f"{where}.{k}", v, _EXP_KEYS[k])
        if e["name"] in names:
            raise SpecError(f"{where}: duplicate experiment name {e['name']!r}")
        names.add(e["name"])
        if e["kind"] not in KINDS:
            raise SpecError(f"{where}.kind must be one of {KINDS}, got {e['kind']!r}")
        models = tuple(e.get("models", ["mlp"]))
        bad = [m for m in models if m not in MODELS]
        if bad or not models:
            raise SpecError(f"{where}.models: unknown {bad}; known: {', '.join(MODELS)}")
        bases = tuple(e.get("bases", ["adversarial"]))
        if not bases or any(b not in BASES for b in bases):
            raise SpecError(f"{where}.bases must hold values from {BASES}, got {list(bases)}")
        regimes = tuple(e.get("regimes", ["post"]))
        if not regimes or any(r not in REGIMES for r in regimes):
            raise SpecError(f"{where}.regimes must hold values from {REGIMES}, got {list(regimes)}")
        recipes = e.get("recipes", [])
        if recipes == "all":  # every recipe that can be built from its defaults
            recipes = []
            for name in RECIPES:
                try:
                    parse_recipe(name)
                    recipes.append(name)
                except ValueError:
                    pass
        elif isinstance(recipes, str):
            raise SpecError(f"{where}.recipes must be a list of recipes or \"all\", got {recipes!r}")
        for r in recipes:
            if not isinstance(r, str):
                raise SpecError(f"{where}.recipes must hold strings, got {r!r}")
            try:
                parse_recipe(r)
            except ValueError as err:
                raise SpecError(f"{where}.recipes: {err}") from None
        if e["kind"] in ("sweep", "compact", "equal_bytes", "efficiency") and not recipes:
            raise SpecError(f"{where}: kind {e['kind']!r} needs recipes")
        x = e.get("x", "auto")
        if x not in X_AXES:
            raise SpecError(f"{where}.x must be one of {X_AXES}, got {x!r}")
        seeds = _int_list(f"{where}.seeds", e["seeds"]) if "seeds" in e else None
        ex_batches = _int_list(f"{where}.batch_sizes", e["batch_sizes"], positive=True) if "batch_sizes" in e else None
        experiments.append(Experiment(
            name=e["name"], kind=e["kind"], title=e.get("title", e["name"]), question=e.get("question", ""),
            models=models, widths=_widths(f"{where}.widths", e.get("widths", {}), models), bases=bases,
            recipes=tuple(recipes), regimes=regimes,
            compact_widths=_widths(f"{where}.compact_widths", e.get("compact_widths", {}), models),
            x=x, seeds=seeds, batch_sizes=ex_batches))
    kw["experiments"] = tuple(experiments)
    return StudySpec(**kw)


def spec_from_dict(d: dict) -> StudySpec:
    """Inverse of ``StudySpec.to_dict`` (as stored in results.jsonl)."""
    d = dict(d)
    d["experiments"] = tuple(Experiment(**{**e, "models": tuple(e["models"]), "bases": tuple(e["bases"]),
                                           "recipes": tuple(e["recipes"]), "regimes": tuple(e["regimes"]),
                                           "seeds": None if e.get("seeds") is None else tuple(e["seeds"]),
                                           "batch_sizes": None if e.get("batch_sizes") is None
                                           else tuple(e["batch_sizes"])})
                             for e in d.get("experiments", []))
    for k in ("seeds", "attacks", "batch_sizes"):
        d[k] = tuple(d[k])
    return StudySpec(**d)


def shipped_studies() -> list[str]:
    """Names of the study files shipped in the package (``robcomp/study/<name>_study.toml``)."""
    return sorted(f.name[:-len("_study.toml")] for f in resources.files("robcomp.study").iterdir()
                  if f.name.endswith("_study.toml"))


def shipped_spec_text(name: str) -> str | None:
    """The TOML text of the shipped study ``name`` (None when there is none of that name)."""
    if name not in shipped_studies():
        return None
    return resources.files("robcomp.study").joinpath(f"{name}_study.toml").read_text(encoding="utf-8")


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a TOML study file; a bare name that is no file but one of
    :func:`shipped_studies` (``"memory_bound"``) loads that shipped study."""
    name = str(path)
    if not Path(name).exists() and shipped_spec_text(name) is not None:
        return parse_spec(tomllib.loads(shipped_spec_text(name)), source=f"{name}_study.toml")
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError(f"--config {str(path)!r}: cannot read: {e.strerror or e} (shipped studies: "
                        f"{', '.join(shipped_studies())})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"--config {str(path)!r} is not valid TOML: {e}") from None
    return parse_spec(data, source=str(path))


def default_spec_text() -> str:
    return resources.files("robcomp.study").joinpath("default_study.toml").read_text(encoding="utf-8")


def default_spec() -> StudySpec:
    return parse_spec(tomllib.loads(default_spec_text()), source="default_study.toml")


#: --quick caps every model width at this (the default study's wide_mlp is 2048 wide)
QUICK_MAX_WIDTH = 1024


def quick_spec(spec: StudySpec | None = None) -> StudySpec:
    """A smoke-sized version of ``spec`` (default: the default study): one seed, few epochs, a
    slice of the test set, short attacks and timings, widths capped at :data:`QUICK_MAX_WIDTH`, a
    kernel sweep over the small sizes only, every section still filled."""
    spec = spec or default_spec()
    attacks = []
    for a in spec.attacks:
        name, _, args = a.partition(":")
        items = [s for s in args.split(",") if s and not s.strip().startswith(("steps=", "n_queries="))]
        if name.lower() in ("pgd", "apgd", "apgdt", "preset"):
            items.append("steps=3")
        if name.lower() in ("square",):
            items.append("n_queries=20")
        attacks.append(f"{name}:{','.join(items)}")
    exps = []
    for e in spec.experiments:
        # keep the ends and the middle of long lists so every section still has a curve
        recipes = e.recipes if len(e.recipes) <= 4 else tuple(dict.fromkeys(
            (e.recipes[0], e.recipes[len(e.recipes) // 2], e.recipes[-2], e.recipes[-1])))
        widths = {m: (ws if len(ws) <= 3 else [ws[0], ws[len(ws) // 2], ws[-1]]) for m, ws in e.widths.items()}
        for m in e.models:  # the wide model trains in seconds, not tens of seconds, at 1024
            ws = widths.get(m, e.widths_for(m))
            if any(w is not None and w > QUICK_MAX_WIDTH for w in ws):
                widths[m] = list(dict.fromkeys(w if w is None else min(w, QUICK_MAX_WIDTH) for w in ws))
        batches = None if e.batch_sizes is None else tuple(min(b, 64) for b in e.batch_sizes)
        exps.append(dataclasses.replace(e, recipes=recipes, widths=widths, seeds=None, batch_sizes=batches))
    return spec.replace(name=spec.name + " (quick)", seeds=spec.seeds[:1], test_examples=96,
                        train={**spec.train, "epochs": min(spec.train["epochs"], 4), "pgd_steps": 2},
                        finetune={**spec.finetune, "epochs": 1}, attacks=tuple(attacks),
                        batch_sizes=tuple(min(b, 64) for b in spec.batch_sizes), latency_repeats=5,
                        sanity=False, experiments=tuple(exps), kernel_sweep=_quick_sweep(spec.kernel_sweep))


def _quick_sweep(ks: dict) -> dict:
    """The smoke-sized sweep: layers up to 1024 wide, batches up to 16, a short budget per cell."""
    return {**ks, "sizes": [s for s in ks["sizes"] if s <= 1024] or ks["sizes"][:1],
            "batches": [b for b in ks["batches"] if b <= 16] or ks["batches"][:1],
            "budget_s": min(ks["budget_s"], 0.05)}
