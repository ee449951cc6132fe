"""``robcomp.save(model, path)`` / ``robcomp.load(path, model_factory=None)``: no pickle, ever.

One ``.safetensors`` file holds every tensor of the model (its ``state_dict``) and, in the
safetensors header metadata, a JSON **manifest** plus its SHA-256:

```
{"format": "robcomp.model", "format_version": 1,
 "versions": {"robcomp": ..., "torch": ..., "safetensors": ...},
 "recipes": [...],                       # from model.compression_summary, if any
 "compression_summary": {...} | null,
 "modules": [                             # every module, parents before children, in order
   {"name": "features.0.0", "type": "torch.nn.modules.conv.Conv2d",
    "attrs": {"in_channels": 1, "out_channels": 8, "kernel_size": {"__tuple__": [3, 3]}, ...},
    "parameters": {"weight": {"shape": [8, 1, 3, 3], "dtype": "float32", "requires_grad": true},
                   "bias": null},
    "buffers": {...}, "parametrizations": {"weight": {"original": {...}, "chain": [...]}}}, ...],
 "tensors": {"features.0.0.weight": {"shape": [...], "dtype": "...", "sha256": "..."}, ...}}
```

Integrity: the manifest carries the SHA-256 of every tensor's bytes and the metadata carries the
SHA-256 of the manifest, so ``load`` refuses flipped tensor bytes, a manifest spliced onto another
model's tensors, and (with ``model_factory``) a file whose root class is not the factory's.

``load`` rebuilds the module tree from the manifest alone: each module is created with its class's
``__new__`` and ``nn.Module.__init__`` (its own ``__init__`` is *not* called, so a pruned model
whose shapes no longer match what the class would build comes back as saved), its plain
attributes (``num_heads``, ``head_dim``, recipes, ...) are restored, its parameters and buffers
are created with the recorded shapes and dtypes and filled from the file (bit-exact), masks and
other parametrizations are re-attached. Classes are looked up, never imported from arbitrary
modules: ``torch.*``, ``robcomp.*`` and ``transformers.*`` classes, classes of modules already imported, or the
classes of the model ``model_factory()`` returns (pass it for your own model classes).

Attribute values are JSON with tags for what JSON lacks: tuples, str-keyed dicts, sets, recipes,
dtypes, Hugging Face ``transformers`` configs (``{"__hf_config__": {"type", "json", "private"}}``:
the config's own ``to_json_string`` plus its private settings such as the attention
implementation; rebuilt with the class's ``from_dict``, one object again for every module that
shared it) and functions of torch / transformers / robcomp by name (e.g. an activation's
``torch._C._nn.gelu``). A parameter that is the same object as one described before (tied
weights: GPT-2's ``lm_head`` and ``wte``) records ``tied_to`` and is tied again on load.
Non-persistent buffers (not in ``state_dict``: BERT's ``position_ids``, Llama's rotary
``inv_freq``) are stored too, under ``robcomp.non_persistent.<name>``. A ``transformers`` model
therefore loads without ``model_factory``: its classes are imported from ``transformers``.

Errors: a file that is not safetensors, a manifest that is missing, not JSON, changed after saving
(checksum), or inconsistent with the stored tensors (names, shapes, dtypes or digests), and unknown classes all raise ``ValueError``
naming the problem; nothing is half-written (``save`` writes a temporary file and renames it).
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from robcomp._io import atomic_path
from robcomp._version import __version__
from robcomp.summary import CompressionSummary

__all__ = ["save", "load", "read_manifest", "FORMAT", "FORMAT_VERSION"]

FORMAT = "robcomp.model"
FORMAT_VERSION = 2  # 2: every tensor spec carries the sha256 of its bytes
_MANIFEST_KEY = "robcomp.manifest"
_CHECKSUM_KEY = "robcomp.manifest.sha256"
_MODULE_INTERNALS = set(nn.Module().__dict__) - {"training"}
_SKIP_ATTRS = {"compression_summary"}
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
    torch.int32, torch.int64, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2)}


# ----------------------------------------------------------------------------------- values
def _encode(value: Any, where: str) -> Any:
    from robcomp.recipes import Recipe

    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, where) for v in value]}
    if isinstance(value, list):
        return [_encode(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"__dict__": {k: _encode(v, where) for k, v in value.items()}}
    if isinstance(value, Recipe):
        return {"__recipe__": value.to_dict()}
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    if isinstance(value, (set, frozenset)):
        return {"__set__": sorted((_encode(v, where) for v in value), key=repr)}
    if _is_hf_config(value):  # a transformers config: JSON via its own to_json_string / from_dict
        # to_json_string leaves out the private settings (e.g. the attention implementation)
        private = {k: v for k, v in vars(value).items() if k.startswith("_") and _is_json(v)}
        return {"__hf_config__": {"type": _type_name(type(value)), "json": value.to_json_string(use_diff=False),
                                  "private": json.dumps(private, sort_keys=True)}}
    if callable(value) and (fn_name := _function_name(value)):
        return {"__function__": fn_name}
    raise TypeError(f"{where} is a {type(value).__name__}, which robcomp.save cannot store without pickle "
                    "(supported: None, bool, int, float, str, tuples, lists, str-keyed dicts, recipes, dtypes)")


def _decode(value: Any, configs: dict | None = None) -> Any:
    """Inverse of :func:`_encode`. ``configs`` memoises decoded transformers configs by their JSON,
    so modules that shared one config object share one again after loading."""
    from robcomp.recipes import recipe_from_dict

    configs = {} if configs is None else configs
    if isinstance(value, list):
        return [_decode(v, configs) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_decode(v, configs) for v in value["__tuple__"])
        if set(value) == {"__dict__"}:
            return {k: _decode(v, configs) for k, v in value["__dict__"].items()}
        if set(value) == {"__recipe__"}:
            return recipe_from_dict(value["__recipe__"])
        if set(value) == {"__dtype__"}:
            return _dtype(value["__dtype__"])
        if set(value) == {"__set__"}:
            return {_decode(v, configs) for v in value["__set__"]}
        if set(value) == {"__hf_config__"}:
            spec = value["__hf_config__"]
            key = (spec["type"], spec["json"], spec.get("private", "{}"))
            if key not in configs:
                config = _hf_config_class(spec["type"]).from_dict(json.loads(spec["json"]))
                for k, v in json.loads(key[2]).items():
                    if not k.startswith("_"):
                        raise ValueError(f"manifest sets the public config attribute {k!r} as a private one")
                    object.__setattr__(config, k, v)
                configs[key] = config
            return configs[key]
        if set(value) == {"__function__"}:
            name = value["__function__"]
            if not isinstance(name, str) or name.split(".")[0] not in _IMPORTABLE_ROOTS:
                raise ValueError(f"manifest names the function {name!r}: only functions of "
                                 f"{', '.join(_IMPORTABLE_ROOTS)} are loaded")
            return _lookup(name, callable)
        raise ValueError(f"manifest holds an unknown tagged value {value!r}")
    return value


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"manifest names an unsupported dtype {name!r}")
    return _DTYPES[name]


#: packages whose classes and functions ``load`` may import by name (trusted libraries, never the
#: file's choice of arbitrary module)
_IMPORTABLE_ROOTS = ("torch", "robcomp", "transformers")


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _is_hf_config(value: Any) -> bool:
    cls = type(value)
    return (cls.__module__.split(".")[0] == "transformers" and callable(getattr(value, "to_json_string", None))
            and callable(getattr(cls, "from_dict", None)))


#: robcomp modules that moved in 0.1.0's package layout (robcomp/<layer>/...), old -> new: files saved
#: before name their classes and functions by the old paths
_MOVED_MODULES = {
    "robcomp.nn": "robcomp.layers.linear", "robcomp.conv": "robcomp.layers.conv",
    "robcomp.masks": "robcomp.compression.masks", "robcomp.prune": "robcomp.compression.prune",
    "robcomp.models": "robcomp.zoo.models", "robcomp.embeddings": "robcomp.evaluation.embeddings",
    "robcomp.randomised": "robcomp.evaluation.randomised", "robcomp.compress": "robcomp.compression.compress",
}


def _current_name(name: str) -> str:
    """``name`` with a robcomp module path of the flat layout replaced by where it lives now."""
    for old, new in _MOVED_MODULES.items():
        if name.startswith(old + "."):
            return new + name[len(old):]
    return name


def _lookup(name: str, accept: Callable[[Any], bool]) -> Any:
    """The object named ``module.qualname`` in an already imported module or an importable module
    of :data:`_IMPORTABLE_ROOTS` that ``accept`` takes; ValueError otherwise. Qualnames may be
    nested (``Outer.Inner``): the longest importable module prefix is tried first."""
    if not isinstance(name, str) or "." not in name:
        raise ValueError(f"manifest names an invalid object {name!r}")
    name = _current_name(name)
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        mod_name, qual = ".".join(parts[:cut]), parts[cut:]
        if mod_name in sys.modules:
            mod = sys.modules[mod_name]
        elif mod_name.split(".")[0] in _IMPORTABLE_ROOTS:
            try:
                mod = importlib.import_module(mod_name)
            except ImportError:
                continue
        else:
            continue
        obj = mod
        for q in qual:
            obj = getattr(obj, q, None)
        if obj is not None and accept(obj):
            return obj
    raise ValueError(f"manifest names {name!r}, which is not available here: import the module that defines "
                     "it or pass model_factory=... building the original model")


def _hf_config_class(name: str) -> type:
    from transformers import GenerationConfig, PretrainedConfig

    return _lookup(name, lambda obj: isinstance(obj, type) and issubclass(obj, (PretrainedConfig, GenerationConfig)))


def _function_name(fn: Any) -> str | None:
    """``module.qualname`` of a torch / transformers / robcomp function or class that resolves back to
    ``fn`` (None otherwise: lambdas, local functions, other packages)."""
    module, qual = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not (isinstance(module, str) and isinstance(qual, str)) or module.split(".")[0] not in _IMPORTABLE_ROOTS:
        return None
    if "<" in qual:  # lambdas and local functions have no importable name
        return None
    try:
        found = _lookup(f"{module}.{qual}", lambda obj: obj is fn)
    except ValueError:
        return None
    return f"{module}.{qual}" if found is fn else None


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's raw bytes (any dtype, viewed as bytes; CPU, contiguous)."""
    raw = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def _tensor_spec(t: torch.Tensor | None, requires_grad: bool | None = None) -> dict | None:
    if t is None:
        return None
    spec = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    if requires_grad is not None:
        spec["requires_grad"] = bool(requires_grad)
    return spec


def _param_specs(module: nn.Module, name: str, skip_params, tied: dict[int, str] | None) -> dict:
    """Specs of ``module``'s own parameters; one already seen under another name (tied weights,
    e.g. GPT-2's ``lm_head`` and ``wte``) records ``tied_to`` so that ``load`` ties it again."""
    specs = {}
    for k, p in module._parameters.items():
        if k in skip_params:
            continue
        spec = _tensor_spec(p, p.requires_grad if p is not None else None)
        if p is not None and tied is not None:
            if id(p) in tied:
                spec["tied_to"] = tied[id(p)]
            else:
                tied[id(p)] = f"{name}.{k}" if name else k
        specs[k] = spec
    return specs


def _describe(module: nn.Module, name: str, skip_params: set[str] = frozenset(),
              tied: dict[int, str] | None = None) -> dict:
    cls = parametrize.type_before_parametrizations(module)
    attrs = {}
    for key, value in module.__dict__.items():
        if key in _MODULE_INTERNALS or key in _SKIP_ATTRS or key in getattr(module, "transient_attrs", ()):
            continue
        attrs[key] = _encode(value, f"attribute {key!r} of module {name or '<root>'!r} ({cls.__name__})")
    entry = {"name": name, "type": _type_name(cls), "attrs": attrs,
             "parameters": _param_specs(module, name, skip_params, tied),
             "buffers": {k: (None if b is None else {**_tensor_spec(b),
                                                     "persistent": k not in module._non_persistent_buffers_set})
                         for k, b in module._buffers.items()}}
    if parametrize.is_parametrized(module):
        entry["parametrizations"] = {}
        for tensor_name, plist in module.parametrizations.items():
            entry["parametrizations"][tensor_name] = {
                "original": _tensor_spec(plist.original, plist.original.requires_grad),
                "chain": [_describe(p, f"{name}.parametrizations.{tensor_name}.{i}") for i, p in enumerate(plist)]}
    return entry


def _manifest(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict:
    import safetensors

    modules, tied = [], {}
    for name, module in model.named_modules(remove_duplicate=False):
        if "parametrizations" in name.split("."):
            continue  # parametrizations are described by the module that owns them
        modules.append(_describe(module, name, tied=tied))
    summary = getattr(model, "compression_summary", None)
    return {"format": FORMAT, "format_version": FORMAT_VERSION,
            "versions": {"robcomp": __version__, "torch": torch.__version__,
                         "safetensors": safetensors.__version__},
            "recipes": summary.recipes if summary is not None else [],
            "compression_summary": summary.to_dict() if summary is not None else None,
            "modules": modules,
            "tensors": {k: {**_tensor_spec(v), "sha256": _digest(v)} for k, v in tensors.items()}}


# ------------------------------------------------------------------------------------- save
#: prefix of the stored non-persistent buffers (not in ``state_dict``; e.g. BERT's ``position_ids``,
#: Llama's rotary ``inv_freq``): without them a loaded model would compute on uninitialised memory
_NON_PERSISTENT = "robcomp.non_persistent."


def _non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, module in model.named_modules():
        for key in module._non_persistent_buffers_set:
            b = module._buffers.get(key)
            if b is not None:
                out[f"{_NON_PERSISTENT}{name + '.' if name else ''}{key}"] = b.detach().to("cpu").contiguous().clone()
    return out


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` (any robcomp-compressed, pruned or masked model) to ``path`` (a
    ``.safetensors`` file with the manifest in its metadata); returns the path."""
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    path = Path(path)
    state = model.state_dict(keep_vars=False)
    # safetensors refuses shared storage; clone (bit-exact) into contiguous CPU tensors
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    tensors.update(_non_persistent_buffers(model))
    manifest = json.dumps(_manifest(model, tensors))  # key order = registration order
    meta = {_MANIFEST_KEY: manifest, _CHECKSUM_KEY: hashlib.sha256(manifest.encode()).hexdigest()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return path


# ------------------------------------------------------------------------------------- load
def read_manifest(path: str | os.PathLike) -> dict:
    """The verified manifest of a file written by ``save`` (ValueError when it is not one)."""
    return _open(path)[0]


def _open(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such model file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type for bad headers
        raise ValueError(f"{path} is not a safetensors file written by robcomp.save "
                         f"({type(e).__name__}: {e})") from None
    if _MANIFEST_KEY not in meta:
        raise ValueError(f"{path} is a safetensors file without a robcomp manifest: save it with robcomp.save")
    text = meta[_MANIFEST_KEY]
    if hashlib.sha256(text.encode()).hexdigest() != meta.get(_CHECKSUM_KEY):
        raise ValueError(f"{path}: the manifest does not match its checksum: it was modified after saving")
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the manifest is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not a robcomp model manifest (format {manifest.get('format')!r})")
    if manifest.get("format_version") not in (1, FORMAT_VERSION):
        raise ValueError(f"{path}: manifest format_version {manifest.get('format_version')!r} is not supported "
                         f"(this robcomp reads version {FORMAT_VERSION})")
    specs = manifest.get("tensors")
    if not isinstance(specs, dict) or set(specs) != set(tensors):
        missing = sorted(set(specs or {}) ^ set(tensors))[:5]
        raise ValueError(f"{path}: manifest and stored tensors disagree on tensor names (e.g. {missing})")
    for k, t in tensors.items():
        if list(t.shape) != specs[k]["shape"] or str(t.dtype).removeprefix("torch.") != specs[k]["dtype"]:
            raise ValueError(f"{path}: tensor {k!r} is {tuple(t.shape)} {t.dtype}, manifest says "
                             f"{specs[k]['shape']} {specs[k]['dtype']}")
    # version 1 files predate the digests; from version 2 on every tensor must carry one
    if manifest["format_version"] >= 2:
        for k, t in tensors.items():
            if specs[k].get("sha256") != _digest(t):
                raise ValueError(f"{path}: tensor {k!r} does not match its sha256 in the manifest: the file is "
                                 "corrupt, or its manifest belongs to another model")
    return manifest, tensors


def _resolver(model_factory: Callable[[], nn.Module] | None, root_type: str, path):
    known: dict[str, type] = {}
    if model_factory is not None:
        template = model_factory()
        if not isinstance(template, nn.Module):
            raise TypeError(f"model_factory must return an nn.Module, got {type(template).__name__}")
        expected = _type_name(parametrize.type_before_parametrizations(template))
        if expected != _current_name(root_type):
            raise ValueError(f"{path} holds a {root_type}, but model_factory builds a {expected}: "
                             "pass the factory of the saved model's class (or none)")
        for m in template.modules():
            cls = parametrize.type_before_parametrizations(m)
            known[_type_name(cls)] = cls

    def resolve(name: str) -> type:
        if not isinstance(name, str) or "." not in name:
            raise ValueError(f"manifest names an invalid module type {name!r}")
        if _current_name(name) in known:
            return known[_current_name(name)]
        try:
            return _lookup(name, lambda obj: isinstance(obj, type) and issubclass(obj, nn.Module))
        except ValueError:
            raise ValueError(f"manifest names module class {name!r}, which is not available: import the module "
                             "that defines it or pass model_factory=... building the original model") from None

    return resolve


def _empty(spec: dict, what: str) -> torch.Tensor:
    if not isinstance(spec, dict) or "shape" not in spec or "dtype" not in spec:
        raise ValueError(f"manifest entry for {what} is malformed: {spec!r}")
    return torch.empty(spec["shape"], dtype=_dtype(spec["dtype"]))


def _build(entry: dict, resolve, configs: dict) -> nn.Module:
    try:
        cls = resolve(entry["type"])
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        for key, value in entry.get("attrs", {}).items():
            if key in _MODULE_INTERNALS:
                raise ValueError(f"manifest sets the reserved attribute {key!r}")
            object.__setattr__(module, key, _decode(value, configs))
        for key, spec in entry.get("parameters", {}).items():
            param = None if spec is None else nn.Parameter(_empty(spec, f"{entry['name']}.{key}"),
                                                           requires_grad=bool(spec.get("requires_grad", True)))
            module.register_parameter(key, param)
        for key, spec in entry.get("buffers", {}).items():
            module.register_buffer(key, None if spec is None else _empty(spec, f"{entry['name']}.{key}"),
                                   persistent=True if spec is None else bool(spec.get("persistent", True)))
        for tensor_name, p in entry.get("parametrizations", {}).items():
            orig = p["original"]
            module.register_parameter(tensor_name, nn.Parameter(_empty(orig, f"{entry['name']}.{tensor_name}"),
                                                                requires_grad=bool(orig.get("requires_grad", True))))
            for sub in p["chain"]:
                parametrize.register_parametrization(module, tensor_name, _build(sub, resolve, configs), unsafe=True)
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"manifest entry for module {entry.get('name')!r} is malformed "
                         f"({type(e).__name__}: {e})") from None
    return module


def _retie(root: nn.Module, entries: list[dict], path) -> None:
    """Make parameters saved as ``tied_to`` another one the same Parameter object again."""
    for entry in entries:
        for key, spec in (entry.get("parameters") or {}).items():
            if not (isinstance(spec, dict) and "tied_to" in spec):
                continue
            try:
                target = root.get_parameter(spec["tied_to"])
            except AttributeError:
                raise ValueError(f"{path}: parameter {entry['name']}.{key} is tied to {spec['tied_to']!r}, "
                                 "which the model does not have") from None
            module = root.get_submodule(entry["name"])
            if not torch.equal(module._parameters[key], target):
                raise ValueError(f"{path}: parameter {entry['name']}.{key} is tied to {spec['tied_to']!r} "
                                 "but its stored values differ")
            module._parameters[key] = target


def load(path: str | os.PathLike, model_factory: Callable[[], nn.Module] | None = None, *,
         map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model saved at ``path``: same module tree, shapes, attributes, masks and
    compressed layers, tensors bit-exact. ``model_factory()`` (optional) supplies the classes of
    your own model (its weights and shapes are ignored). Returns the model in eval mode with its
    ``compression_summary`` restored."""

    manifest, tensors = _open(path)
    entries = manifest.get("modules")
    if not isinstance(entries, list) or not entries or entries[0].get("name") != "":
        raise ValueError(f"{path}: manifest has no module tree")
    resolve = _resolver(model_factory, entries[0].get("type"), path)
    root = None
    built: dict[str, nn.Module] = {}
    configs: dict = {}
    for entry in entries:
        name = entry.get("name")
        if not isinstance(name, str):
            raise ValueError(f"{path}: manifest module entry without a name")
        module = _build(entry, resolve, configs)
        if name == "":
            root = module
        else:
            parent_name, _, child = name.rpartition(".")
            if parent_name not in built:
                raise ValueError(f"{path}: module {name!r} comes before its parent {parent_name!r} in the manifest")
            built[parent_name].add_module(child, module)
        built[name] = module
    try:
        extra = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith(_NON_PERSISTENT)]}
        missing, unexpected = root.load_state_dict(tensors, strict=False)
        for key, value in extra.items():
            module_name, _, buffer = key.removeprefix(_NON_PERSISTENT).rpartition(".")
            root.get_submodule(module_name).get_buffer(buffer).copy_(value)
    except RuntimeError as e:
        raise ValueError(f"{path}: stored tensors do not fit the manifest's module tree: {e}") from None
    if missing or unexpected:
        raise ValueError(f"{path}: stored tensors do not fit the manifest's module tree "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    _retie(root, entries, path)
    if manifest.get("compression_summary"):
        object.__setattr__(root, "compression_summary", CompressionSummary.from_dict(manifest["compression_summary"]))
    return root.to(map_location).eval()
