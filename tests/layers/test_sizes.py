"""Model size counters against counts derived independently from the dense weights."""
import torch
import torch.nn as nn

import robcomp as rc
from robcomp.compression.masks import apply_nm_masks
from robcomp.layers.sizes import count_nonzero_parameters, count_parameters, model_bytes


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def test_masked_weights_count_after_their_mask():
    model = _model()
    apply_nm_masks(model, 2, 4, filter_fn=lambda m, n: n == "0")
    w = model[0].weight.detach()  # the masked weight the layer computes with
    expected = int((w != 0).sum()) + 64 + 64 * 10 + 10  # + bias 0, dense head
    assert int((w != 0).sum()) == 64 * 64 // 2
    assert count_nonzero_parameters(model) == {"nonzero_parameters": expected,
                                               "dense_equivalent_parameters": 64 * 64 + 64 + 64 * 10 + 10}


def test_compressed_layers_count_their_dequantised_weight_and_what_they_store():
    model = _model()
    rc.compress(model, rc.Sparse24(), filter_fn=lambda m, n: n == "0", backend="torch")
    counts = count_nonzero_parameters(model)
    assert counts["dense_equivalent_parameters"] == 64 * 64 + 64 + 64 * 10 + 10
    assert counts["nonzero_parameters"] == 64 * 64 // 2 + 64 + 64 * 10 + 10
    stored = sum(b.numel() for b in model[0].buffers()) + 64 + 64 * 10 + 10
    assert count_parameters(model) == stored
    assert model_bytes(model) == sum(t.numel() * t.element_size()
                                     for t in list(model.parameters()) + list(model.buffers()))
