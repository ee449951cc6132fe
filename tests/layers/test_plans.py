"""Eager call plans (robcomp/layers/plans.py) and the prepared CPU forwards they run
(kernels/cpu_prepared.py): a planned call gives what the unplanned path gives, records the same
path, and is rebuilt whenever what it depends on changes."""
import copy
import pickle

import pytest
import torch
import torch.nn as nn

import robcomp as rc
from robcomp.kernels import cpu as C
from robcomp.kernels import cpu_prepared as P
from robcomp.layers.linear import (FP8DynamicLinear, Int4WeightOnlyLinear, Int8DynamicLinear, Int8WeightOnlyLinear,
                                   Sparse24Int4Linear, Sparse24Linear)
from robcomp.recipes import FP8Dynamic, Int4WeightOnly, Int8Dynamic, Int8WeightOnly, Sparse24, Sparse24Int4
from numerics import PoisonedNumpy

pytestmark = pytest.mark.skipif(not C.available(), reason="numba is a declared dependency; absent here")

# (class, recipe, N, K): shapes the prepared forwards take, N and K no multiple of 64
CASES = [
    (Int8WeightOnlyLinear, Int8WeightOnly(), 52, 208),
    (Int4WeightOnlyLinear, Int4WeightOnly(group_size=64), 48, 192),
    (Int8DynamicLinear, Int8Dynamic(), 52, 200),
    (Sparse24Linear, Sparse24(), 52, 200),
    (Sparse24Int4Linear, Sparse24Int4(group_size=32), 52, 224),
    (FP8DynamicLinear, FP8Dynamic(), 52, 200),
]
IDS = [c[1].label() for c in CASES]


def _layer(cls, recipe, n, k, bias=True):
    lin = nn.Linear(k, n, bias=bias)
    lin.weight.data = torch.randn(n, k) * 0.05
    if bias:
        lin.bias.data = torch.randn(n) * 0.1
    return cls.from_linear(lin, recipe)


def _unplanned(layer, x):
    """What ``forward`` ran before plans: the selected path through the generic launchers."""
    return layer.run_path(layer.select_path(x), x)


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setattr(P, "np", PoisonedNumpy())


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("shape", [(1, None), (1, 1, None), (3, None)], ids=["1xK", "1x1xK", "3xK"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_planned_forward_equals_the_unplanned_path(case, shape, dtype, bias, poisoned):
    cls, recipe, n, k = case
    layer = _layer(cls, recipe, n, k, bias)
    if dtype == torch.bfloat16:
        layer = layer.to(torch.bfloat16)
    x = torch.randn(*shape[:-1], k).to(dtype)
    with torch.no_grad():
        want = _unplanned(layer, x)
        for _ in range(2):  # the first call builds the plan, the second runs it
            got = layer(x.clone())
            assert got.dtype == dtype and got.shape == (*shape[:-1], n)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert layer.last_path == layer.select_path(x)
    # against the stored weight in float64: the plan is no copy of a wrong answer
    w = layer.dequantize().double()
    exact = x.double() @ w.T + (0 if layer.bias is None else layer.bias.double())
    err = ((got.double() - exact).norm() / exact.norm()).item()
    assert err < (5e-2 if layer.gradient == "straight-through" or dtype == torch.bfloat16 else 2e-2)


@pytest.mark.parametrize("path", ["fbgemm", "onednn"])
@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_planned_int8_engine_forward_equals_its_launcher(path, m, dtype, bias):
    """fbgemm's and oneDNN's int8 GEMMs run prepared at any M, bit for bit as their launchers."""
    layer = _layer(Int8DynamicLinear, Int8Dynamic(), 52, 200, bias)
    if not layer.can_run(path, torch.device("cpu")):
        pytest.skip(f"{path}'s u8 x s8 GEMM is not exact on this CPU (no VNNI); the path is not offered")
    layer = layer.to(dtype)
    layer.tuned_paths[("cpu", dtype, 1 if m == 1 else 8)] = path
    x = torch.randn(m, 200).to(dtype) * 2
    with torch.no_grad():
        want = layer.run_path(path, x)
        for _ in range(2):
            got = layer(x)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert layer.last_path == path and layer.prepared(path, m) is not None
        ref = layer.forward_reference(x)
    assert got.dtype == dtype
    err = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err < (1e-2 if dtype == torch.bfloat16 else 1e-6)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_the_batch1_forwards_are_prepared_where_they_exist(case):
    """The one-row numba kernels and tinygemm / int8pack run prepared: a plan holds them."""
    cls, recipe, n, k = case
    layer = _layer(cls, recipe, n, k)
    x = torch.randn(1, k)
    with torch.no_grad():
        layer(x)
    path = layer.last_path
    prepared = layer.prepared(path, 1)
    expected = {Int8WeightOnlyLinear: "numba_fp32", Int8DynamicLinear: "numba_int8", Sparse24Linear: "native",
                Sparse24Int4Linear: "native", Int4WeightOnlyLinear: "native", FP8DynamicLinear: "native"}
    assert path == expected[cls] and prepared is not None
    assert layer.prepared("reference", 1) is None


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_gradient_call_after_an_inference_call_gets_its_gradient(case):
    cls, recipe, n, k = case
    layer = _layer(cls, recipe, n, k)
    x = torch.randn(1, k)
    with torch.no_grad():
        layer(x)
    xr = x.clone().requires_grad_()
    dy = torch.randn(1, n)
    (gx,) = torch.autograd.grad(layer(xr), xr, dy)
    want = dy.double() @ layer.dequantize().double()
    assert ((gx.double() - want).norm() / want.norm()).item() < 1.2e-2


def test_in_place_edits_and_replaced_buffers_rebuild_the_plan():
    layer = _layer(Sparse24Linear, Sparse24(), 52, 200)
    x = torch.randn(1, 200)
    with torch.no_grad():
        before = layer(x)
        layer.values.mul_(2)  # in place: the plan's float32 view sees it, its version check too
        torch.testing.assert_close(layer(x) - layer.bias, 2 * (before - layer.bias), rtol=1e-5, atol=1e-5)
        layer.values = layer.values / 2  # replaced: __setattr__ drops the plans
        torch.testing.assert_close(layer(x), before, rtol=1e-6, atol=1e-6)
        layer.bias.add_(1.0)  # the bias is read live
        torch.testing.assert_close(layer(x), before + 1.0, rtol=1e-6, atol=1e-6)
        bf = layer.to(torch.bfloat16)  # converted: _apply drops the plans; bf16 values are a copy
        want = _unplanned(bf, x.bfloat16())
        torch.testing.assert_close(bf(x.bfloat16()), want, rtol=0, atol=0)
        bf.values.mul_(0.5)  # a converted copy goes stale: the version check rebuilds it
        torch.testing.assert_close(bf(x.bfloat16()), _unplanned(bf, x.bfloat16()), rtol=0, atol=0)


def test_int4_plan_follows_an_in_place_edit_of_the_codes():
    """tinygemm runs a derived copy: an in-place edit of the stored codes must rebuild it."""
    layer = _layer(Int4WeightOnlyLinear, Int4WeightOnly(group_size=64), 48, 192)
    x = torch.randn(1, 192)
    with torch.no_grad():
        layer(x)
        layer.qweight.copy_(torch.randint(0, 256, layer.qweight.shape, dtype=torch.uint8))
        torch.testing.assert_close(layer(x), _unplanned(layer, x), rtol=0, atol=0)
        want = layer.forward_reference(x)
        assert ((layer(x) - want).norm() / want.norm()).item() < 1.2e-2


def test_environment_backend_and_tuning_change_the_plan(monkeypatch, tmp_path):
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    rc.compress(model, Int8WeightOnly())
    layer = model[0]
    x = torch.randn(1, 64)
    with torch.no_grad():
        model(x)
        assert layer.last_path == "numba_fp32"
        monkeypatch.setenv("ROBCOMP_BACKEND", "torch")
        model(x)
        assert layer.last_path == "reference"
        monkeypatch.delenv("ROBCOMP_BACKEND")
        model(x)
        assert layer.last_path == "numba_fp32"
        layer.backend = "torch"
        model(x)
        assert layer.last_path == "reference"
        layer.backend = "auto"
        layer.tuned_paths[("cpu", torch.float32, 1)] = "dense"
        layer.forget_plans()  # what robcomp.tune does after recording a choice
        model(x)
        assert layer.last_path == "dense"
    assert layer.paths_run == {"float32|M1": "dense"}


def test_bad_input_is_refused_on_every_call():
    layer = _layer(Int8WeightOnlyLinear, Int8WeightOnly(), 52, 208)
    with torch.no_grad():
        layer(torch.randn(1, 208))
        with pytest.raises(ValueError, match="in_features=208"):
            layer(torch.randn(1, 200))
        with pytest.raises(TypeError):
            layer(torch.ones(1, 208, dtype=torch.int64))
        with pytest.raises(ValueError, match="empty"):
            layer(torch.randn(0, 208))


def test_plans_are_neither_copied_nor_pickled():
    layer = _layer(Sparse24Linear, Sparse24(), 52, 200)
    x = torch.randn(1, 200)
    with torch.no_grad():
        y = layer(x)
    assert layer.__dict__.get("_plans")
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert "_plans" not in clone.__dict__
        with torch.no_grad():
            clone.values.mul_(3)  # the clone's buffers are its own: the original is untouched
            torch.testing.assert_close(layer(x), y, rtol=0, atol=0)


def test_output_is_fresh_memory():
    """In-place ops after the layer (ReLU(inplace=True)) must not reach a kernel's buffer."""
    layer = _layer(Int8WeightOnlyLinear, Int8WeightOnly(), 52, 208)
    x = torch.randn(1, 208)
    with torch.no_grad():
        a = layer(x)
        b = layer(x)
        a.zero_()
        assert b.abs().sum() > 0
        assert a.data_ptr() != x.data_ptr()


def test_fp8_weight_with_nan_codes_keeps_the_table_decoder():
    """The prepared fp8 forward decodes by bit arithmetic; NaN codes need the table path."""
    layer = _layer(FP8DynamicLinear, FP8Dynamic(), 52, 200)
    with torch.no_grad():
        layer.qweight_bits[0, 0] = 0x7F  # e4m3fn NaN
        assert layer.prepared("native", 1) is None
        y = layer(torch.randn(1, 200))
    assert torch.isnan(y[0, 0]) and torch.isfinite(y[0, 1:]).all()


def test_numba_fp8_quantiser_is_bit_exact_against_the_reference():
    from robcomp.kernels import reference as R

    x = torch.randn(40, 136) * torch.logspace(-9, 4, 40)[:, None]
    x[1, 3], x[2] = 0.0, 0.0
    x[3, 5] = float("nan")
    e4m3 = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    e4m3 = e4m3[torch.isfinite(e4m3)].sort().values
    mids = ((e4m3[1:].double() + e4m3[:-1].double()) / 2).float()  # ties: round to nearest even
    mids = torch.cat([mids[mids > 0], -mids[mids > 0]])
    for row, chunk in zip(range(4, 40), mids.split(135)):  # 448 first: the row's scale is exactly 1
        x[row, 0], x[row, 1:1 + chunk.numel()] = 448.0, chunk
    q, s = C.quantize_fp8_rows(x)
    wq, ws = R.quantize_rows_fp8(x)
    torch.testing.assert_close(q, wq.float(), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(s, ws, rtol=0, atol=0, equal_nan=True)


def test_an_inference_only_path_falls_back_once_x_needs_a_gradient():
    """The bias always needs a gradient; whether x does must still change the plan."""
    layer = _layer(Int8WeightOnlyLinear, Int8WeightOnly(), 52, 208)
    layer.inference_only = frozenset({"numba_fp32"})
    x = torch.randn(1, 208)
    layer(x)  # grad mode, the bias requires grad, x does not: the inference-only path runs
    assert layer.last_path == "numba_fp32"
    xr = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(layer(xr).sum(), xr)
    assert layer.last_path == layer.fallback_path(x.device)
    want = layer.dequantize().double().sum(0)
    assert ((gx.double() - want).norm() / want.norm()).item() < 1e-5
