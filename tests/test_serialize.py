"""save/load: safetensors + JSON manifest, bit-exact round trips, clear errors on bad files."""
import json
import os
import stat
import struct

import pytest
import torch
import torch.nn as nn

import robcomp
from robcomp.compression.compress import compress
from robcomp.compression.handlers import layer_recipe_types
from robcomp.compression.masks import apply_nm_masks, masked_modules
from robcomp.recipes import ChannelPrune, MagnitudePrune, Sparse24, Sparse24Int4
from robcomp.serialize import read_manifest
from robcomp.zoo.models import build_model

X = torch.rand(8, 1, 8, 8)
LAYER_RECIPES = [cls(group_size=32) if "group_size" in cls.__dataclass_fields__ else cls() for cls in layer_recipe_types()]
ALL_RECIPES = LAYER_RECIPES + [ChannelPrune(0.5), MagnitudePrune(0.7), [ChannelPrune(0.3), Sparse24Int4(group_size=32)]]


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    with torch.no_grad():
        assert torch.equal(a.eval()(X), b.eval()(X))


CASES = ([("mlp", r) for r in ALL_RECIPES] + [("cnn", r) for r in ALL_RECIPES[-3:]]
         + [("vit", r) for r in (LAYER_RECIPES[0], *ALL_RECIPES[-3:])])


@pytest.mark.parametrize("name,recipe", CASES,
                         ids=lambda v: v if isinstance(v, str) else getattr(v, "name", "composed"))
def test_round_trip_bit_exact(tmp_path, name, recipe):
    torch.manual_seed(0)
    model = compress(build_model(name).eval(), recipe, example_inputs=X)
    path = robcomp.save(model, tmp_path / "m.safetensors")
    loaded = robcomp.load(path)
    assert type(loaded) is type(model)
    _same(model, loaded)
    assert loaded.compression_summary.to_json() == model.compression_summary.to_json()
    manifest = read_manifest(path)
    assert manifest["recipes"] == json.loads(json.dumps(model.compression_summary.recipes))
    assert {"robcomp", "torch", "safetensors"} <= set(manifest["versions"])


def test_pruned_vit_attributes_and_masks_survive(tmp_path):
    model = compress(build_model("vit"), ChannelPrune(0.5), example_inputs=X)
    apply_nm_masks(model, 2, 4)
    robcomp.save(model, tmp_path / "v.safetensors")
    loaded = robcomp.load(tmp_path / "v.safetensors")
    assert loaded.blocks[0].attn.head_dim == 8 and loaded.blocks[0].attn.qkv.out_features == 96
    assert set(masked_modules(loaded)) == set(masked_modules(model))
    _same(model, loaded)
    # the masks keep working: fine-tuning the loaded model keeps the pattern
    loaded.train()
    loaded(X).sum().backward()
    g = loaded.blocks[0].mlp[0].parametrizations.weight.original.grad
    mask = loaded.blocks[0].mlp[0].parametrizations.weight[0].mask
    assert (g[~mask] == 0).all()


class UserNet(nn.Module):
    def __init__(self, width=64):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.GELU(), nn.Linear(width, width))
        self.out = nn.Linear(width, 10)
        self.scale = 2.0

    def forward(self, x):
        return self.out(torch.relu(self.body(x))) * self.scale


def test_user_class_with_factory_and_pruned_shapes(tmp_path):
    model = compress(UserNet(), [ChannelPrune(0.5), Sparse24()], example_inputs=X)
    robcomp.save(model, tmp_path / "u.safetensors")
    # the class builds width 64; the pruned model is width 32: shapes come from the manifest
    loaded = robcomp.load(tmp_path / "u.safetensors", model_factory=lambda: UserNet())
    assert loaded.body[1].out_features == 32 and loaded.scale == 2.0
    _same(model, loaded)


def test_class_defined_in_a_function_needs_a_factory(tmp_path):
    class Local(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(x.flatten(1))

    model = Local()
    robcomp.save(model, tmp_path / "l.safetensors")
    with pytest.raises(ValueError, match="model_factory"):
        robcomp.load(tmp_path / "l.safetensors")
    _same(model, robcomp.load(tmp_path / "l.safetensors", model_factory=Local))


def _rewrite_header(path, edit):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * ((8 - len(new) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n:])


def test_tampered_manifest_and_bad_files(tmp_path):
    path = tmp_path / "m.safetensors"
    robcomp.save(compress(build_model("mlp"), Sparse24()), path)

    def tamper(h):  # change a pruned shape in the manifest, leave the checksum
        h["__metadata__"]["robcomp.manifest"] = h["__metadata__"]["robcomp.manifest"].replace('"out_features": 256',
                                                                                              '"out_features": 128')
    _rewrite_header(path, tamper)
    with pytest.raises(ValueError, match="modified after saving"):
        robcomp.load(path)

    robcomp.save(build_model("mlp"), path)

    def tamper_and_rehash(h):  # consistent checksum, but a tensor shape that disagrees with the data
        import hashlib
        m = json.loads(h["__metadata__"]["robcomp.manifest"])
        m["tensors"]["head.weight"]["shape"] = [10, 999]
        text = json.dumps(m)
        h["__metadata__"]["robcomp.manifest"] = text
        h["__metadata__"]["robcomp.manifest.sha256"] = hashlib.sha256(text.encode()).hexdigest()
    _rewrite_header(path, tamper_and_rehash)
    with pytest.raises(ValueError, match="head.weight"):
        robcomp.load(path)

    bad = tmp_path / "pickle.pt"
    torch.save(build_model("mlp").state_dict(), bad)
    with pytest.raises(ValueError, match="not a safetensors file"):
        robcomp.load(bad)
    (tmp_path / "junk.safetensors").write_bytes(b"hello world, not a model")
    with pytest.raises(ValueError, match="not a safetensors file"):
        robcomp.load(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="without a robcomp manifest"):
        robcomp.load(tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError):
        robcomp.load(tmp_path / "missing.safetensors")


def test_unsupported_attribute_is_a_clear_error(tmp_path):
    model = build_model("mlp")
    model.callback = print  # not storable without pickle
    with pytest.raises(TypeError, match="callback"):
        robcomp.save(model, tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())  # nothing half-written


def _flip_one_tensor_byte(path, name):
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    begin, end = json.loads(data[8:8 + n])[name]["data_offsets"]
    data[8 + n + (begin + end) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_flipped_tensor_bytes_are_refused(tmp_path):
    path = robcomp.save(compress(build_model("mlp"), Sparse24()), tmp_path / "m.safetensors")
    robcomp.load(path)  # intact: loads
    _flip_one_tensor_byte(path, "head.weight")
    with pytest.raises(ValueError, match=r"'head.weight' does not match its sha256"):
        robcomp.load(path)


def test_manifest_spliced_onto_another_models_tensors_is_refused(tmp_path):
    torch.manual_seed(1)
    a = robcomp.save(build_model("mlp"), tmp_path / "a.safetensors")
    torch.manual_seed(2)
    b = robcomp.save(build_model("mlp"), tmp_path / "b.safetensors")  # same shapes, other weights
    meta_a = json.loads(a.read_bytes()[8:8 + struct.unpack("<Q", a.read_bytes()[:8])[0]])["__metadata__"]

    def splice(h):  # A's manifest and its (valid) checksum on B's tensors
        h["__metadata__"] = meta_a
    _rewrite_header(b, splice)
    with pytest.raises(ValueError, match="another model"):
        robcomp.load(b)


def test_factory_of_another_class_is_refused(tmp_path):
    path = robcomp.save(compress(build_model("cnn"), ChannelPrune(0.5), example_inputs=X), tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="model_factory builds a .*MLP"):
        robcomp.load(path, model_factory=lambda: build_model("mlp"))
    assert type(robcomp.load(path, model_factory=lambda: build_model("cnn"))) is type(build_model("cnn"))


def test_saved_file_has_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = robcomp.save(build_model("mlp"), tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_version_1_files_without_digests_still_load(tmp_path):
    import hashlib

    model = build_model("mlp")
    path = robcomp.save(model, tmp_path / "v1.safetensors")

    def as_version_1(h):
        m = json.loads(h["__metadata__"]["robcomp.manifest"])
        m["format_version"] = 1
        for spec in m["tensors"].values():
            del spec["sha256"]
        text = json.dumps(m)
        h["__metadata__"]["robcomp.manifest"] = text
        h["__metadata__"]["robcomp.manifest.sha256"] = hashlib.sha256(text.encode()).hexdigest()
    _rewrite_header(path, as_version_1)
    _same(model, robcomp.load(path))


@pytest.mark.parametrize("model_factory", [None, lambda: build_model("mlp")], ids=["no_factory", "factory"])
def test_files_naming_the_flat_layout_modules_still_load(tmp_path, model_factory):
    """Files saved before the package layout name robcomp.nn.* and robcomp.models.*: they load as the
    classes' new homes, with or without a model_factory."""
    import hashlib

    model = compress(build_model("mlp"), Sparse24())
    path = robcomp.save(model, tmp_path / "flat.safetensors")

    def as_flat_layout(h):
        text = h["__metadata__"]["robcomp.manifest"]
        assert "robcomp.layers.linear.Sparse24Linear" in text and "robcomp.zoo.models.MLP" in text
        text = text.replace("robcomp.layers.linear.", "robcomp.nn.").replace("robcomp.zoo.models.", "robcomp.models.")
        h["__metadata__"]["robcomp.manifest"] = text
        h["__metadata__"]["robcomp.manifest.sha256"] = hashlib.sha256(text.encode()).hexdigest()
    _rewrite_header(path, as_flat_layout)
    assert "robcomp.nn.Sparse24Linear" in json.dumps(read_manifest(path))
    loaded = robcomp.load(path, model_factory)
    _same(model, loaded)
    assert type(loaded.body[0]).__module__ == "robcomp.layers.linear"
