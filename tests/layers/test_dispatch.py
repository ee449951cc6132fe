"""The dispatch mechanism (robcomp.layers.dispatch, robcomp.tune) with injected timings: the decision rule,
the on-disk table and its key, tune()'s table and its use by forward, paths in evaluate's record."""
import copy
import json

import pytest
import torch
import torch.nn as nn

import robcomp
from robcomp.layers import dispatch
from robcomp.layers.linear import CompressedLinear, Int8DynamicLinear, Sparse24Linear, layer_paths
from robcomp.layers.tuning import layer_op


def test_decide_picks_fastest_with_preference_and_ignores_failures():
    assert dispatch.decide({"triton": 1.0, "dense": 2.0}) == "triton"
    assert dispatch.decide({"triton": 2.0, "dense": 1.0, "semi_structured": 1.5}) == "dense"
    assert dispatch.decide({"triton": 1.01, "dense": 1.0}) == "triton"  # within tolerance
    assert dispatch.decide({"triton": None, "dense": 3.0, "semi_structured": float("nan")}) == "dense"
    assert dispatch.decide({"triton": float("inf"), "semi_structured": 0.5, "dense": 1.0}) == "semi_structured"
    assert dispatch.decide({}) == "triton"
    assert dispatch.decide({"native": 2.0, "dense": 1.0}, preferred="native") == "dense"


def test_choose_measures_once_then_uses_the_cache_on_a_fake_gpu(tmp_path, monkeypatch):
    """The CUDA candidates cannot run here: the mechanism is the same with a faked device key."""
    cache = dispatch.DispatchCache(tmp_path / "d.json")
    monkeypatch.setattr(dispatch, "device_key", lambda device: "FakeGPU|cc9.0|torch x|triton y|numba z")
    calls = []
    fake_ms = {"triton": 3.0, "dense": 1.0, "semi_structured": 2.0}

    def candidates():
        calls.append(1)
        return {name: (lambda name=name: name) for name in fake_ms}

    def measure(fn):
        name = fn()
        if name == "semi_structured":
            raise RuntimeError("not supported here")
        return fake_ms[name]

    dev = torch.device("cuda")
    args = ("Sparse24Linear", dev, (5, 64, 64), torch.float16, candidates)
    assert dispatch.choose(*args, measure=measure, cache=cache) == "dense"
    assert dispatch.choose(*args, measure=measure, cache=cache) == "dense"  # same M bucket (8)
    assert len(calls) == 1
    key = "Sparse24Linear|FakeGPU|cc9.0|torch x|triton y|numba z|float16|M8|N64|K64"
    saved = json.loads((tmp_path / "d.json").read_text())
    assert saved[key] == {"choice": "dense", "timings_ms": {"triton": 3.0, "dense": 1.0, "semi_structured": None}}
    assert dispatch.DispatchCache(tmp_path / "d.json").get(key) == "dense"


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    from robcomp._io import cache_dir

    monkeypatch.setenv("ROBCOMP_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path
    assert dispatch.default_cache().path == tmp_path / "dispatch.json"
    monkeypatch.delenv("ROBCOMP_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir().parts[-2:] == (".cache", "robcomp")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # the dispatch file shares the one cache dir
    assert dispatch.default_cache().path == tmp_path / "xdg" / "robcomp" / "dispatch.json"


def test_cache_ignores_corrupt_files_and_unknown_choices(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("{not json")
    cache = dispatch.DispatchCache(path)
    assert cache.get("k") is None
    cache.put("k", "native", {"native": 1.0, "dense": float("nan")})
    assert json.loads(path.read_text())["k"]["timings_ms"] == {"native": 1.0, "dense": None}
    path.write_text(json.dumps({"k": {"choice": "warp_drive"}}))
    assert dispatch.DispatchCache(path).get("k") is None


def test_cpu_device_key_names_cpu_threads_and_versions():
    key = dispatch.device_key(torch.device("cpu"))
    assert f"threads{torch.get_num_threads()}" in key and f"torch {torch.__version__}" in key and "numba" in key


def _model():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    return nn.Sequential(Sparse24Linear.from_linear(dense[0]), nn.ReLU(), Int8DynamicLinear.from_linear(dense[2]))


def test_tune_records_the_fastest_path_per_shape_and_forward_uses_it(tmp_path):
    model = _model()
    cache = dispatch.DispatchCache(tmp_path / "dispatch.json")
    x = torch.randn(4, 64)
    # injected timings: (layer, M, path) -> ms
    timings = {("0", 1): {"native": 3.0, "dense": 2.0, "reference": 1.0},
               ("0", 4): {"native": 1.0, "dense": 2.0, "reference": 3.0},
               ("2", 1): {"native": 1.0, "reference": 5.0},
               ("2", 4): {"native": 9.0, "reference": 5.0}}
    names = {id(m): n for n, m in model.named_modules()}
    calls = []

    def measure(fn):
        calls.append(fn)
        y = fn()
        assert torch.isfinite(y).all()  # candidates run on fresh random inputs
        layer, path = fn.func.__self__, fn.args[0]
        return timings[(names[id(layer)], y.shape[0])][path]

    table = robcomp.tune(model, x, batch_sizes=(1, 4), cache=cache, measure=measure)
    assert table["0"]["float32|M1"]["choice"] == "reference"
    assert table["0"]["float32|M4"]["choice"] == "native"
    assert table["2"]["float32|M1"]["choice"] == "native"
    assert table["2"]["float32|M4"]["choice"] == "reference"
    assert table["0"]["float32|M1"]["candidates"] == ["native", "dense", "reference"]
    assert table["0"]["float32|M1"]["timings_ms"] == timings[("0", 1)]
    json.dumps(table)  # serialisable
    n_calls = len(calls)
    # forward runs the recorded choices and never times
    model(x[:1])
    assert (model[0].last_path, model[2].last_path) == ("reference", "native")
    model(x)
    assert (model[0].last_path, model[2].last_path) == ("native", "reference")
    assert len(calls) == n_calls
    assert layer_paths(model) == {"0": {"float32|M1": "reference", "float32|M4": "native"},
                                  "2": {"float32|M1": "native", "float32|M4": "reference"}}
    # the table lives on disk, keyed by format, device key, dtype, M bucket, N, K
    saved = json.loads((tmp_path / "dispatch.json").read_text())
    key = f"{layer_op(model[0])}|{dispatch.device_key(torch.device('cpu'))}|float32|M1|N32|K64"
    assert saved[key]["choice"] == "reference"
    # a fresh model on the same machine is tuned from the disk table without measuring
    fresh = _model()
    table2 = robcomp.tune(fresh, x, batch_sizes=(1, 4), cache=dispatch.DispatchCache(tmp_path / "dispatch.json"),
                          measure=lambda fn: pytest.fail("measured although the table had the entry"))
    assert all(e["cached"] for rows in table2.values() for e in rows.values())
    assert {k: e["choice"] for k, e in table2["0"].items()} == {"float32|M1": "reference", "float32|M4": "native"}
    fresh(x[:1])
    assert fresh[0].last_path == "reference"


def test_untuned_layers_use_the_static_default_and_explicit_backends_are_fixed(tmp_path):
    model = _model()
    model(torch.randn(1, 64))
    assert model[0].last_path == "native" and model[2].last_path == "numba_int8"  # W8A8 at M = 1: the int8 GEMV
    model(torch.randn(8, 64))
    assert model[0].last_path == "native"  # 2:4 on CPU at small batches: the blocked numba kernel
    ref_model = copy.deepcopy(model)
    for m in ref_model.modules():
        if isinstance(m, CompressedLinear):
            m.backend = "torch"
    table = robcomp.tune(ref_model, torch.randn(2, 64), cache=dispatch.DispatchCache(tmp_path / "d.json"),
                         measure=lambda fn: pytest.fail("an explicit backend is not tuned"))
    assert table["0"]["float32|M2"] == {"choice": "reference", "fixed_by_backend": "torch"}


def test_tune_rejects_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        robcomp.tune("not a model", torch.randn(1, 4))
    with pytest.raises(ValueError, match="batch_sizes"):
        robcomp.tune(_model(), torch.randn(1, 64), batch_sizes=(0,))


def test_environment_backend_overrides_auto(monkeypatch):
    model = _model()
    monkeypatch.setenv("ROBCOMP_BACKEND", "torch")
    model(torch.randn(1, 64))
    assert model[0].last_path == "reference"


def test_evaluate_records_the_path_of_every_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    robcomp.compress(model, robcomp.Sparse24(), filter_fn=lambda m, name: name == "1")
    x, y = torch.rand(6, 16), torch.randint(0, 4, (6,))
    record = robcomp.evaluate(model.eval(), (x, y), batch_sizes=(1,))
    assert record["paths"] == {"1": {"float32|M1": "native", **{k: v for k, v in model[1].paths_run.items()
                                                                 if k != "float32|M1"}}}
    assert set(record["paths"]["1"].values()) <= set(dispatch.PATHS)
    json.dumps(record)


def test_cuda_candidates_per_format(monkeypatch):
    """The CUDA paths each format offers robcomp.tune (listed without touching a GPU)."""
    monkeypatch.setattr("robcomp.layers.linear.triton_available", lambda: True)
    lin = nn.Linear(64, 32)
    expected = {robcomp.Sparse24(): ("triton", "semi_structured", "dense", "reference"),
                robcomp.Int8WeightOnly(): ("triton", "dense", "reference"),
                robcomp.Int4WeightOnly(group_size=32): ("triton", "dense", "reference"),
                robcomp.Int8Dynamic(): ("triton", "int_mm", "reference"),
                robcomp.FP8Dynamic(): ("triton", "scaled_mm", "reference"),
                robcomp.Sparse24Int4(group_size=32): ("triton", "dense", "reference")}
    from robcomp.compression.handlers import layer_type_for
    for recipe, paths in expected.items():
        layer = layer_type_for(recipe).from_linear(lin, recipe)
        assert layer.paths(torch.device("cuda"), torch.float16) == paths
        assert layer.default_path(torch.device("cuda"), torch.float16, 1) == "triton"
        # every listed path has an implementation (run_path raises for unknown names)
        for p in paths:
            assert p in dispatch.PATHS
            assert p in ("triton", "dense", "reference") or hasattr(layer, f"forward_{p}")


def test_inference_only_path_falls_back_when_a_gradient_is_needed():
    layer = Sparse24Linear.from_linear(nn.Linear(64, 32))
    x = torch.randn(2, 64, requires_grad=True)
    y = layer.run_path("semi_structured", x)  # needs CUDA: with a gradient it runs the fallback
    assert layer.last_path == "reference"
    y.sum().backward()
    assert x.grad is not None
