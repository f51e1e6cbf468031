"""``pycompress.save`` / ``pycompress.load``: compressed models as safetensors + a JSON manifest.

A saved model is a directory with two files:

``model.safetensors``
    every tensor of ``model.state_dict()`` (tensors that are the same view of the same storage,
    e.g. tied embeddings, are stored once and listed as aliases in the manifest).
``pycompress.json``
    the manifest: format version, the root class name, every module path, and for each module
    that is a pycompress layer its class name and ``config()``; the shape of every plain
    ``nn.Linear``, ``nn.Conv2d`` and BatchNorm and the head counts of (BERT- and GPT-2-style)
    attention modules, so that layers made smaller by :func:`pycompress.compact` are rebuilt with
    their new shapes inside a fresh model of the original architecture; the paths of the
    ``nn.Identity`` modules (the BatchNorms and activations that :func:`pycompress.quantize`
    folded into convs are replaced the same way on loading); the blocks whose residual
    additions convs compute (``torch.fx.GraphModule`` s made by :func:`pycompress.quantize`, rebuilt
    from the fresh model's block on loading) with those convs and their activations; the SHA-256
    and size of the weights file.

Nothing is ever unpickled: tensors come from safetensors, everything else from JSON, and layer
classes are looked up by name among the known pycompress layers only (never imported from a path
written in the file). Both files are written to temporary files and moved into place with
``os.replace``; the manifest is replaced last and carries the weights' checksum, so an
interrupted save can never be loaded as a mix of old and new files.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from pycompress import _utils
from pycompress.nn import conv1d, registry
from pycompress.nn.registry import COMPACTED_ATTR, register_layer
from pycompress.nn.residual import is_batchnorm_act, rewrite_residual_block

__all__ = ["save", "load", "register_layer", "WEIGHTS_NAME", "MANIFEST_NAME", "FORMAT_VERSION"]

WEIGHTS_NAME = "model.safetensors"
MANIFEST_NAME = "pycompress.json"
FORMAT_NAME = "pycompress-model"
FORMAT_VERSION = 1
# set to True on the root module by pycompress.compact: the saved layers may be narrower than those
# of a fresh model of the architecture


# --------------------------------------------------------------------------- helpers
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tensors_for_saving(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Deduplicates identical views (aliases) and copies partially shared tensors."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for key, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state_dict entry {key!r} is a {type(t).__name__}, not a tensor")
        t = t.detach()
        if t.device.type == "meta":
            raise ValueError(f"tensor {key!r} is on the meta device (no data to save)")
        view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() > 0 and view in seen:
            aliases[key] = seen[view]
            continue
        sptr = t.untyped_storage().data_ptr()
        if t.numel() > 0 and sptr in storages or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        else:
            storages.add(sptr)
        if t.numel() > 0:
            seen[view] = key
        tensors[key] = t.to("cpu").contiguous()
    # any remaining sharing (e.g. two clones above are fine; overlapping originals are not)
    return tensors, aliases


_HEAD_ATTRS = ("num_attention_heads", "attention_head_size", "all_head_size")
# the same facts under the names of GPT-2-family attention modules
_GPT2_HEAD_ATTRS = ("num_heads", "head_dim", "split_size")
_FIXED_ATTRS = ("attention_head_size", "head_dim")  # compact never changes a head's width


_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _channel_structure(model: nn.Module, skip: list[str]) -> dict[str, dict]:
    """Widths of the plain ``nn.Conv2d`` and BatchNorm layers (``compact`` narrows them)."""
    out: dict[str, dict] = {}
    for name, module in model.named_modules():
        if not name or any(name == p or name.startswith(p + ".") for p in skip):
            continue
        if type(module) is nn.Conv2d:
            out[name] = {"type": "Conv2d", "in_channels": module.in_channels, "out_channels": module.out_channels,
                         "groups": module.groups, "bias": module.bias is not None}
        elif type(module) in _NORMS:
            out[name] = {"type": type(module).__name__, "num_features": module.num_features}
    return out


def _plan_channel_structure(shapes: dict, model: nn.Module, root: Path, plan: dict[str, nn.Module]) -> None:
    """Plans (without touching ``model``) the ``nn.Conv2d`` / BatchNorm layers of a fresh model to
    rebuild narrower, as saved (kernel, stride, padding, eps, momentum... come from the fresh layer)."""
    if not isinstance(shapes, dict):
        raise ValueError(f"{root}: corrupt manifest (channel_shapes)")
    for name, shp in shapes.items():
        try:
            current = model.get_submodule(name)
            kind = shp["type"]
            if kind == "Conv2d":
                want = {k: int(shp[k]) for k in ("in_channels", "out_channels", "groups")}
                bias = bool(shp["bias"])
            else:
                want = {"num_features": int(shp["num_features"])}
        except (AttributeError, KeyError, TypeError, ValueError):
            raise ValueError(f"{root}: corrupt manifest entry for layer {name!r}") from None
        if type(current).__name__ != kind:
            continue  # replaced by a saved pycompress layer, or checked with the tensors
        have = {k: getattr(current, k) for k in want}
        if have == want and (kind != "Conv2d" or bias == (current.bias is not None)):
            continue
        if any(want[k] > have[k] or want[k] < 1 for k in want if k != "groups"):
            raise ValueError(f"{root}: architecture mismatch — layer {name!r} was saved as {kind}({want}) "
                             f"but the model's is {kind}({have})")
        if kind == "Conv2d":
            if want["groups"] != have["groups"] and not (have["groups"] == have["in_channels"] == have["out_channels"]
                                                         and want["groups"] == want["in_channels"] == want["out_channels"]):
                raise ValueError(f"{root}: architecture mismatch — layer {name!r} was saved with groups="
                                 f"{want['groups']} but the model's has groups={have['groups']}")
            w = current.weight
            new = nn.Conv2d(want["in_channels"], want["out_channels"], current.kernel_size, current.stride,
                            current.padding, current.dilation, want["groups"], bias=bias,
                            padding_mode=current.padding_mode, device=w.device, dtype=w.dtype)
        else:
            ref = current.weight if current.weight is not None else current.running_mean
            new = type(current)(want["num_features"], eps=current.eps, momentum=current.momentum,
                                affine=current.affine, track_running_stats=current.track_running_stats,
                                device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)
        new.train(current.training)
        plan[name] = new


def _structure(model: nn.Module, skip: list[str]) -> tuple[dict[str, dict], dict[str, dict]]:
    """(shapes of the plain ``nn.Linear`` layers, head attributes of attention modules)."""
    shapes: dict[str, dict] = {}
    attrs: dict[str, dict] = {}
    for name, module in model.named_modules():
        if not name or any(name == p or name.startswith(p + ".") for p in skip):
            continue
        if type(module) is nn.Linear:
            shapes[name] = {"in_features": module.in_features, "out_features": module.out_features,
                            "bias": module.bias is not None}
        for names in (_HEAD_ATTRS, _GPT2_HEAD_ATTRS):
            vals = {a: getattr(module, a, None) for a in names}
            if all(isinstance(v, int) and not isinstance(v, bool) for v in vals.values()):
                attrs[name] = vals
                break
    return shapes, attrs


def _residual_blocks(model: nn.Module) -> dict[str, dict[str, str]]:
    """block path -> {conv path inside it: activation} for every block rebuilt by quantize so that
    its convs compute its residual additions (a GraphModule calling ``Int8Conv2d(residual=True)``
    layers with two arguments)."""
    out: dict[str, dict[str, str]] = {}
    for name, module in model.named_modules():
        if not name or not isinstance(module, torch.fx.GraphModule):
            continue
        fused = {}
        for node in module.graph.nodes:
            if node.op == "call_module" and len(node.args) == 2:
                layer = module.get_submodule(node.target)
                if getattr(layer, "residual", False) is True and registry.is_pycompress_layer(layer):
                    fused[str(node.target)] = layer.activation
        if fused:
            out[name] = fused
    return out


def _plan_residual_blocks(manifest: dict, model: nn.Module, root: Path, plan: dict[str, nn.Module]) -> dict:
    """Rebuilds, aside, the saved residual blocks from the fresh model's blocks (validated now;
    their children are attached when the layers are swapped in)."""
    blocks = manifest.get("residual_blocks", {})
    if not isinstance(blocks, dict) or not all(
            isinstance(b, str) and b and isinstance(f, dict) and f
            and all(isinstance(k, str) and isinstance(v, str) for k, v in f.items()) for b, f in blocks.items()):
        raise ValueError(f"{root}: corrupt manifest (residual_blocks)")
    out = {}
    for name, fused in blocks.items():
        try:
            block = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{root}: architecture mismatch — the manifest names block {name!r}, which is not in "
                             "the model (no such module)") from None

        def layer_of(rel, name=name, block=block):
            full = f"{name}.{rel}"
            return plan[full] if full in plan else block.get_submodule(rel)
        for rel in fused:
            if not getattr(plan.get(f"{name}.{rel}"), "residual", False):
                raise ValueError(f"{root}: corrupt manifest — block {name!r} lists {rel!r}, which is not saved as a "
                                 "layer with a residual input")
        try:
            out[name] = rewrite_residual_block(block, fused, layer_of)
        except ValueError as e:
            raise ValueError(f"{root}: architecture mismatch — block {name!r}: {e}") from None
    return out


def _module_tree(model: nn.Module) -> tuple[dict[str, dict], list[str]]:
    """(pycompress layers: path → {class, config}, all module paths)."""
    layers: dict[str, dict] = {}
    paths: list[str] = []
    skip_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in skip_prefixes):
            continue
        paths.append(name)
        if registry.is_pycompress_layer(module):
            cfg = module.config()
            try:
                json.dumps(cfg, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"config() of layer {name!r} ({type(module).__name__}) is not JSON-serializable: {e}"
                ) from None
            layers[name] = {"class": type(module).__name__, "config": cfg}
            if name:
                skip_prefixes.append(name)
    return layers, paths


# --------------------------------------------------------------------------- save
def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Saves ``model`` (compressed or not) to the directory ``path``.

    Writes ``model.safetensors`` (all tensors of the state dict) and ``pycompress.json`` (the
    manifest: which module paths are which pycompress layer with which ``config()``, and the
    weights' SHA-256). The directory is created if needed; an existing save in it is replaced
    atomically (temporary files + ``os.replace``).

    Args:
        model: the model to save (a ``torch.compile`` wrapper is saved as the model it wraps).
        path: a directory (created when missing).

    Returns:
        The directory as a ``Path``.

    Example:
        >>> import copy, tempfile, torch, pycompress
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        >>> q = pycompress.quantize(copy.deepcopy(model))
        >>> out = pycompress.save(q, tempfile.mkdtemp() + "/mlp-int8")
        >>> sorted(p.name for p in out.iterdir())
        ['model.safetensors', 'pycompress.json']
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    model = _utils.unwrap_compiled(model)
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory; save() writes a directory")

    layers, paths = _module_tree(model)
    linear_shapes, head_attrs = _structure(model, [p for p in layers if p])
    state = model.state_dict()
    tensors, aliases = _tensors_for_saving(state)

    created = not out.exists()
    target = out
    if created:
        out.parent.mkdir(parents=True, exist_ok=True)
        target = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    tmp_weights = tmp_manifest = None
    try:
        fd, tmp_weights = tempfile.mkstemp(prefix=".model.", suffix=".safetensors.tmp", dir=target)
        os.close(fd)
        save_file(tensors, tmp_weights, metadata={"format": FORMAT_NAME})
        with open(tmp_weights, "rb+") as f:
            os.fsync(f.fileno())
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "pycompress_version": _version(),
            "torch_version": torch.__version__,
            "model_class": type(model).__name__,
            "modules": paths,
            "layers": layers,
            "aliases": aliases,
            "compacted": bool(getattr(model, COMPACTED_ATTR, False)),
            "linear_shapes": linear_shapes,
            "channel_shapes": _channel_structure(model, [p for p in layers if p]),
            "attributes": head_attrs,
            "identities": _identities(model, [p for p in layers if p]),
            "residual_blocks": _residual_blocks(model),
            "weights": {
                "file": WEIGHTS_NAME,
                "sha256": _sha256(Path(tmp_weights)),
                "bytes": os.path.getsize(tmp_weights),
                "tensors": len(tensors),
            },
        }
        fd, tmp_manifest = tempfile.mkstemp(prefix=".pycompress.", suffix=".json.tmp", dir=target)
        with os.fdopen(fd, "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=False, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_weights, target / WEIGHTS_NAME)
        tmp_weights = None
        os.replace(tmp_manifest, target / MANIFEST_NAME)
        tmp_manifest = None
        _utils.fsync_dir(target)
        if created:
            try:
                os.replace(target, out)
            except OSError:  # someone created it meanwhile: move the files instead
                out.mkdir(parents=True, exist_ok=True)
                os.replace(target / WEIGHTS_NAME, out / WEIGHTS_NAME)
                os.replace(target / MANIFEST_NAME, out / MANIFEST_NAME)
                os.rmdir(target)
            _utils.fsync_dir(out.parent)
    finally:
        for tmp in (tmp_weights, tmp_manifest):
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
        if created and target.exists() and target != out:
            for p in target.iterdir():
                p.unlink()
            target.rmdir()
    return out


def _version() -> str:
    from pycompress._version import __version__

    return __version__


# --------------------------------------------------------------------------- load
def _read_manifest(root: Path) -> dict:
    mpath = root / MANIFEST_NAME
    if not root.exists():
        raise FileNotFoundError(f"no saved model at {root} (directory does not exist)")
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory written by pycompress.save")
    if not mpath.exists():
        raise FileNotFoundError(f"{root}: manifest {MANIFEST_NAME} is missing (not a pycompress save?)")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{mpath}: corrupt manifest (not valid JSON: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{mpath}: not a pycompress manifest (format field missing or wrong)")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{mpath}: format version {version!r} is not supported by this pycompress "
            f"(supports <= {FORMAT_VERSION}); upgrade pycompress"
        )
    for key, typ in (("modules", list), ("layers", dict), ("aliases", dict), ("weights", dict)):
        if not isinstance(manifest.get(key), typ):
            raise ValueError(f"{mpath}: corrupt manifest (field {key!r} missing or of the wrong type)")
    return manifest


def _check_architecture(manifest: dict, model: nn.Module, root: Path) -> None:
    saved = set(manifest["modules"])
    layers = manifest["layers"]
    have: set[str] = set()
    skip: list[str] = []
    # a module saved as nn.Identity (checked in _plan_identities) replaces its whole subtree: the
    # drop and act modules inside a BatchNormAct2d folded into a conv
    identities = manifest.get("identities", [])
    identities = {n for n in identities if isinstance(n, str) and n} if isinstance(identities, list) else set()
    for name, _ in model.named_modules():
        if any(name.startswith(p + ".") for p in skip):
            continue
        have.add(name)
        if name and (name in layers or name in identities):
            skip.append(name)  # the saved layer replaces this whole subtree
    missing = sorted(saved - have)
    extra = sorted(have - saved)
    if missing or extra or manifest.get("model_class") != type(model).__name__:
        def _list(xs):
            return ", ".join(repr(x) for x in xs[:6]) + (f", ... ({len(xs)} in all)" if len(xs) > 6 else "")

        parts = []
        if manifest.get("model_class") != type(model).__name__:
            parts.append(f"saved from a {manifest.get('model_class')}, loading into a {type(model).__name__}")
        if missing:
            parts.append(f"modules in the file but not in the model: {_list(missing)}")
        if extra:
            parts.append(f"modules in the model but not in the file: {_list(extra)}")
        raise ValueError(
            f"{root}: architecture mismatch — the model is not the architecture that was saved ("
            + "; ".join(parts) + ")"
        )


def _feature_mismatch(name: str, cfg: dict, module: nn.Module, compacted: bool = False) -> str | None:
    """Why the saved layer cannot replace ``module`` (None when it can). The layer of a model
    saved after ``compact`` may be narrower than the fresh model's, never wider."""
    for attr in ("in_features", "out_features", "in_channels", "out_channels"):
        want = cfg.get(attr)
        have = getattr(module, attr, None)
        if have is None and conv1d.is_conv1d(module):
            have = module.nx if attr == "in_features" else module.nf
        if want is not None and have is not None and (want > have if compacted else want != have):
            return (
                f"layer {name!r}: saved with {attr}={want} but the model's "
                f"{type(module).__name__} has {attr}={have}"
            )
    return None


def _plan_conv1d_as_linear(shapes: dict, model: nn.Module, root: Path, compacted: bool,
                           plan: dict[str, nn.Module]) -> None:
    """Plans a plain ``nn.Linear`` where one was saved and the model has a transformers ``Conv1D``
    (weight ``[in, out]``; e.g. after ``compact`` or ``deploy_pruned(mode="dense")``)."""
    for name, shp in shapes.items():
        try:
            current = model.get_submodule(name)
        except AttributeError:
            continue  # reported by the architecture check
        if not conv1d.is_conv1d(current):
            continue
        try:
            want = (int(shp["in_features"]), int(shp["out_features"]), bool(shp["bias"]))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{root}: corrupt manifest entry for linear layer {name!r}") from None
        have = (current.nx, current.nf)
        if (want[:2] != have and not compacted) or want[0] > have[0] or want[1] > have[1] or min(want[:2]) < 1:
            raise ValueError(f"{root}: architecture mismatch — layer {name!r} was saved as Linear"
                             f"({want[0]}, {want[1]}) but the model's is Conv1D(nf={have[1]}, nx={have[0]})")
        w = current.weight
        new = nn.Linear(want[0], want[1], bias=want[2], device=w.device, dtype=w.dtype)
        new.train(current.training)
        plan[name] = new


def _plan_structure(manifest: dict, model: nn.Module, root: Path, plan: dict[str, nn.Module],
                    attr_plan: list[tuple[nn.Module, str, int]]) -> None:
    """Plans (without touching ``model``) the plain ``nn.Linear`` layers to rebuild with a
    smaller shape and the attention head counts to set (both from :func:`pycompress.compact`)."""
    shapes, attrs = manifest.get("linear_shapes", {}), manifest.get("attributes", {})
    if not isinstance(shapes, dict) or not isinstance(attrs, dict):
        raise ValueError(f"{root}: corrupt manifest (linear_shapes / attributes)")
    _plan_conv1d_as_linear(shapes, model, root, bool(manifest.get("compacted")), plan)
    if not manifest.get("compacted"):
        return  # shapes must match exactly (checked with the tensors)
    _plan_channel_structure(manifest.get("channel_shapes", {}), model, root, plan)
    for name, shp in shapes.items():
        try:
            current = model.get_submodule(name)
            want = (int(shp["in_features"]), int(shp["out_features"]), bool(shp["bias"]))
        except (AttributeError, KeyError, TypeError, ValueError):
            raise ValueError(f"{root}: corrupt manifest entry for linear layer {name!r}") from None
        if type(current) is not nn.Linear:
            continue
        have = (current.in_features, current.out_features, current.bias is not None)
        if want == have:
            continue
        if not name or want[0] > have[0] or want[1] > have[1] or min(want[:2]) < 1:
            raise ValueError(f"{root}: architecture mismatch — layer {name!r} was saved as Linear"
                             f"({want[0]}, {want[1]}) but the model's is Linear({have[0]}, {have[1]})")
        new = nn.Linear(want[0], want[1], bias=want[2], device=current.weight.device, dtype=current.weight.dtype)
        new.train(current.training)
        plan[name] = new
    for name, vals in attrs.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{root}: corrupt manifest (attributes of unknown module {name!r})") from None
        if not isinstance(vals, dict):
            raise ValueError(f"{root}: corrupt manifest entry for attributes of {name!r}")
        for attr, value in vals.items():
            cur = getattr(module, attr, None)
            if (attr not in _HEAD_ATTRS + _GPT2_HEAD_ATTRS or not isinstance(value, int) or isinstance(value, bool)
                    or not isinstance(cur, int)):
                raise ValueError(f"{root}: cannot set {attr}={value!r} on {name!r}")
            if value != cur and (value > cur or attr in _FIXED_ATTRS or value < 1):
                raise ValueError(f"{root}: architecture mismatch — {name!r} was saved with {attr}={value} "
                                 f"but the model has {attr}={cur}")
            attr_plan.append((module, attr, value))


def _plan_layers(manifest: dict, model: nn.Module, root: Path, plan: dict[str, nn.Module]) -> None:
    """Builds, aside, the pycompress layers that replace modules of ``model``."""
    known = registry.pycompress_layer_classes()
    for name, entry in manifest["layers"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("class"), str):
            raise ValueError(f"{root}: corrupt manifest entry for layer {name!r}")
        cls = known.get(entry["class"])
        if cls is None:
            raise ValueError(
                f"{root}: layer {name!r} is a {entry['class']}, which this pycompress does not know "
                f"(known layers: {', '.join(sorted(known)) or 'none'})"
            )
        cfg = entry.get("config")
        if not name:
            raise ValueError(f"{root}: the saved root module is a {entry['class']}; load it with "
                             f"{entry['class']}.from_config(...) and load_state_dict instead")
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{root}: architecture mismatch — the manifest names layer {name!r}, which is "
                             "not in the model (no such module)") from None
        narrower = isinstance(cfg, dict) and any(
            cfg.get(a) is not None and cfg.get(a) != getattr(current, a, None)
            for a in ("in_features", "out_features", "in_channels", "out_channels"))
        if type(current) is not cls or narrower:
            problem = _feature_mismatch(name, cfg if isinstance(cfg, dict) else {}, current,
                                        compacted=bool(manifest.get("compacted")))
            if problem:
                raise ValueError(f"{root}: architecture mismatch — {problem}")
            try:
                new = cls.from_config(cfg)
            except Exception as e:
                raise ValueError(f"{root}: cannot rebuild layer {name!r} ({entry['class']}) from its config: {e}") from e
            if not isinstance(new, nn.Module):
                raise ValueError(f"{root}: {entry['class']}.from_config returned a {type(new).__name__}, "
                                 "not an nn.Module")
            new = new.to(_utils.model_device(current))
            if hasattr(new, "layer_name"):  # named in the layer's error messages
                new.layer_name = name
            new.train(current.training)
            plan[name] = new


# modules that quantize() replaces by nn.Identity (a BatchNorm folded into a conv, an activation
# computed in its epilogue, a zero-padding module computed by the conv); load() replaces them the
# same way in a fresh model; timm's BatchNormAct2d (a BatchNorm with its activation, not importable
# here) is recognised by its structure
_IDENTITY_REPLACEABLE = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.ZeroPad2d, nn.ConstantPad2d)


def _identity_replaceable(m: nn.Module) -> bool:
    return type(m) in _IDENTITY_REPLACEABLE or is_batchnorm_act(m)


def _identities(model: nn.Module, skip: list[str]) -> list[str]:
    """Paths of the ``nn.Identity`` modules of ``model`` (outside pycompress layers)."""
    return [name for name, m in model.named_modules(remove_duplicate=False)
            if name and type(m) is nn.Identity and not any(name.startswith(p + ".") for p in skip)]


def _plan_identities(manifest: dict, model: nn.Module, root: Path, plan: dict[str, nn.Module]) -> None:
    """Plans ``nn.Identity`` where one was saved and the fresh model has a BatchNorm or an
    activation module (folded / fused into a conv by quantize)."""
    names = manifest.get("identities", [])
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{root}: corrupt manifest (identities)")
    for name in names:
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{root}: architecture mismatch — the manifest names module {name!r}, which is "
                             "not in the model (no such module)") from None
        if type(current) is nn.Identity or name in plan:
            continue
        if not _identity_replaceable(current):
            raise ValueError(f"{root}: architecture mismatch — module {name!r} was saved as nn.Identity but the "
                             f"model's is a {type(current).__name__} (only BatchNorm2d, activation and zero-padding "
                             "modules are replaced by nn.Identity when a conv is quantized)")
        new = nn.Identity()
        new.train(current.training)
        plan[name] = new


def _weights_path(manifest: dict, root: Path) -> Path:
    """The weights file named by the manifest; never a path that leaves the save folder."""
    name = manifest["weights"].get("file", WEIGHTS_NAME)
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        raise ValueError(f"{root}: corrupt manifest (weights file {name!r} is not a plain file name)")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"{root}: the manifest's weights file {name!r} is outside the save folder; "
                         "refusing to read it")
    wpath = root / rel
    if not wpath.exists():
        raise FileNotFoundError(f"{root}: weights file {name} is missing")
    real, base = wpath.resolve(), root.resolve()
    if real == base or base not in real.parents:
        raise ValueError(f"{root}: the weights file {name!r} resolves to {real}, outside the save folder "
                         "(a link out of the folder); refusing to read it")
    if not real.is_file():
        raise ValueError(f"{root}: the weights file {name!r} is not a regular file")
    return wpath


def _planned_state(model: nn.Module, plan: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The state dict ``model`` would have with the planned modules swapped in."""
    state = model.state_dict()
    for name in plan:
        prefix = name + "."
        for key in [k for k in state if k.startswith(prefix)]:
            del state[key]
    for name, new in plan.items():
        state.update(new.state_dict(prefix=name + "."))
    return state


def load(path: str | os.PathLike, model: nn.Module, *, strict: bool = True) -> nn.Module:
    """Loads a directory written by :func:`save` into ``model`` and returns it.

    ``model`` must be a freshly constructed model of the original architecture (e.g.
    ``BertModel(config)``); every module path that was saved as a pycompress layer is rebuilt
    with ``from_config`` and all tensors are loaded, so that the outputs are bit-identical to
    those of the saved model. Tensors are moved to the device of the module they belong to.

    Loading is all or nothing: the manifest, the weights file (size, checksum, tensor names,
    shapes and dtypes) and every layer are checked and the new layers are built and filled
    aside before any module of ``model`` is replaced; when anything is wrong, ``load`` raises
    and ``model`` is exactly as it was (same modules, same tensors). The weights file must lie
    inside the save folder (no absolute path, no ``..``, no link out of it).

    Args:
        path: the directory given to :func:`save`.
        model: an instance of the original architecture (modified in place).
        strict: require the file and the model to hold exactly the same tensors.

    Raises:
        FileNotFoundError: missing directory, manifest or weights file.
        ValueError: corrupt manifest or weights (bad JSON, checksum mismatch, truncated file, a
            weights file outside the save folder), a different architecture (module paths,
            class, shapes or dtypes differ), an unknown layer class.

    Example:
        >>> import copy, tempfile, torch, pycompress
        >>> make = lambda: torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        >>> q = pycompress.quantize(make())
        >>> d = pycompress.save(q, tempfile.mkdtemp() + "/m")
        >>> restored = pycompress.load(d, make())
        >>> x = torch.randn(3, 16)
        >>> torch.equal(restored(x), q(x))
        True
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    outer = model
    model = _utils.unwrap_compiled(model)
    root = Path(path)
    manifest = _read_manifest(root)
    winfo = manifest["weights"]
    wpath = _weights_path(manifest, root)
    size = os.path.getsize(wpath)
    if winfo.get("bytes") is not None and size != winfo["bytes"]:
        raise ValueError(
            f"{wpath}: weights file is {size} bytes but the manifest says {winfo['bytes']} "
            "(truncated, corrupted or from another save)"
        )
    if winfo.get("sha256") and _sha256(wpath) != winfo["sha256"]:
        raise ValueError(f"{wpath}: checksum mismatch — the weights file is corrupted or from another save")

    # 1. check and plan; nothing below touches ``model`` until step 3
    _check_architecture(manifest, model, root)
    plan: dict[str, nn.Module] = {}
    attr_plan: list[tuple[nn.Module, str, int]] = []
    _plan_structure(manifest, model, root, plan, attr_plan)
    _plan_layers(manifest, model, root, plan)
    _plan_identities(manifest, model, root, plan)
    blocks = _plan_residual_blocks(manifest, model, root, plan)

    try:
        tensors = load_file(str(wpath), device="cpu")
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{wpath}: corrupt weights file ({e})") from None
    for alias, canonical in manifest["aliases"].items():
        if not isinstance(alias, str) or not isinstance(canonical, str) or canonical not in tensors:
            raise ValueError(f"{root}: corrupt manifest (alias {alias!r} → missing tensor {canonical!r})")
        tensors[alias] = tensors[canonical]

    expected = _planned_state(model, plan)
    problems = []
    for key, t in tensors.items():
        want = expected.get(key)
        if want is None:
            continue
        if tuple(want.shape) != tuple(t.shape):
            problems.append(f"{key}: file has shape {tuple(t.shape)}, model expects {tuple(want.shape)}")
        elif want.dtype != t.dtype:
            problems.append(f"{key}: file has dtype {t.dtype}, model has {want.dtype}")
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if strict:
        problems += [f"{k}: missing from the file" for k in missing[:10]]
        problems += [f"{k}: in the file but not in the model" for k in unexpected[:10]]
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise ValueError(
            f"{root}: the saved tensors do not fit this model (different architecture or configuration): "
            + "; ".join(problems[:8]) + more
        )

    # 2. fill the new layers aside (their own load checks run here)
    for name, new in plan.items():
        prefix = name + "."
        sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            new.load_state_dict(sub, strict=strict)
        except Exception as e:
            raise ValueError(f"{root}: cannot load the saved tensors of layer {name!r}: {e}") from e

    # 3. swap everything at once; the rest of the tensors are copied into the kept modules
    replaced = {name: model.get_submodule(name) for name in plan}
    old_attrs = [(module, attr, getattr(module, attr)) for module, attr, _ in attr_plan]
    kept = {k: v for k, v in tensors.items()
            if k in expected and not any(k.startswith(name + ".") for name in plan)}
    swapped_blocks: list[tuple[str, nn.Module]] = []
    try:
        for name in sorted(plan, key=lambda n: n.count(".")):
            _utils.set_module(model, name, plan[name])
        for module, attr, value in attr_plan:
            setattr(module, attr, value)
        model.load_state_dict(kept, strict=False)
        for name in sorted(blocks, key=lambda n: n.count(".")):
            block, gm = model.get_submodule(name), blocks[name]
            for child, m in block.named_children():
                setattr(gm, child, m)
            _utils.set_module(model, name, gm)
            swapped_blocks.append((name, block))
    except BaseException:
        for name, block in reversed(swapped_blocks):
            _utils.set_module(model, name, block)
        for module, attr, value in reversed(old_attrs):
            setattr(module, attr, value)
        for name in sorted(replaced, key=lambda n: -n.count(".")):
            _utils.set_module(model, name, replaced[name])
        raise
    if plan:  # torch's fused transformer paths read float weights the pycompress layers lack
        registry.disable_transformer_fast_paths(model)
    if manifest.get("compacted"):
        setattr(model, COMPACTED_ATTR, True)
    return outer
