"""pycompress.save / load: bit-exact round trips, atomic writes, clear errors on bad files."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import pycompress
from pycompress.export.serialization import MANIFEST_NAME, WEIGHTS_NAME
from pycompress.nn.registry import COMPACTED_ATTR
from _pylayer_models import SmallCNN, int8_cls, mlp  # noqa: F401


def _assert_bit_identical(a: nn.Module, b: nn.Module, x):
    a.eval(), b.eval()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
def test_quantized_round_trip_is_bit_exact(int8_cls, tmp_path, mode):
    model = pycompress.quantize(mlp(seed=0), mode=mode, exclude="4")
    out = pycompress.save(model, tmp_path / "m")
    assert sorted(p.name for p in out.iterdir()) == [WEIGHTS_NAME, MANIFEST_NAME]
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert set(manifest["layers"]) == {"0", "2"}
    assert manifest["layers"]["0"]["class"] == int8_cls.__name__
    assert manifest["layers"]["0"]["config"] == model[0].config()
    fresh = mlp(seed=123)  # a freshly constructed model, other random weights
    loaded = pycompress.load(out, fresh)
    assert loaded is fresh
    assert isinstance(fresh[0], int8_cls) and isinstance(fresh[2], int8_cls) and type(fresh[4]) is nn.Linear
    assert fresh[0].mode == mode
    _assert_bit_identical(model, fresh, torch.randn(9, 32))


def test_cnn_round_trip_keeps_batchnorm_buffers(int8_cls, tmp_path):
    model = SmallCNN()
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 16, 16))  # moves the BatchNorm running statistics
    pycompress.quantize(model)
    pycompress.save(model, tmp_path / "cnn")
    fresh = pycompress.load(tmp_path / "cnn", SmallCNN())
    _assert_bit_identical(model, fresh, torch.randn(2, 3, 16, 16))


def test_plain_model_and_tied_weights(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.head = nn.Linear(8, 20, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.emb(ids))

    model = Tied()
    pycompress.save(model, tmp_path / "tied")
    manifest = json.loads((tmp_path / "tied" / MANIFEST_NAME).read_text())
    assert manifest["aliases"] == {"head.weight": "emb.weight"} and manifest["layers"] == {}
    fresh = pycompress.load(tmp_path / "tied", Tied())
    assert fresh.head.weight is fresh.emb.weight
    _assert_bit_identical(model, fresh, torch.randint(0, 20, (3, 5)))


def test_overwrite_replaces_the_previous_save(int8_cls, tmp_path):
    pycompress.save(mlp(seed=0), tmp_path / "m")
    q = pycompress.quantize(mlp(seed=1))
    pycompress.save(q, tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == [WEIGHTS_NAME, MANIFEST_NAME]  # no temporary files left
    _assert_bit_identical(q, pycompress.load(tmp_path / "m", mlp()), torch.randn(3, 32))


def test_crash_while_saving_a_new_directory_leaves_nothing(int8_cls, tmp_path, monkeypatch):
    real_replace = os.replace

    def crash(src, dst):
        if str(dst).endswith(MANIFEST_NAME):
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        pycompress.save(pycompress.quantize(mlp()), tmp_path / "m")
    assert os.listdir(tmp_path) == []


def test_crash_between_the_two_renames_is_detected(int8_cls, tmp_path, monkeypatch):
    old = mlp(seed=0)
    pycompress.save(old, tmp_path / "m")
    real_replace = os.replace

    def crash(src, dst):
        if str(dst).endswith(MANIFEST_NAME):
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        pycompress.save(pycompress.quantize(mlp(seed=1)), tmp_path / "m")
    monkeypatch.setattr(os, "replace", real_replace)
    assert sorted(os.listdir(tmp_path / "m")) == [WEIGHTS_NAME, MANIFEST_NAME]
    # new weights next to the old manifest: refused, never loaded as a mix
    with pytest.raises(ValueError, match="weights file"):
        pycompress.load(tmp_path / "m", mlp())


def test_corrupted_weights(tmp_path):
    pycompress.save(mlp(), tmp_path / "m")
    w = tmp_path / "m" / WEIGHTS_NAME
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        pycompress.load(tmp_path / "m", mlp())
    w.write_bytes(bytes(data[:100]))
    with pytest.raises(ValueError, match="truncated"):
        pycompress.load(tmp_path / "m", mlp())


def test_corrupted_header_without_checksum(tmp_path):
    pycompress.save(mlp(), tmp_path / "m")
    w = tmp_path / "m" / WEIGHTS_NAME
    w.write_bytes(b"\xff" * w.stat().st_size)
    mpath = tmp_path / "m" / MANIFEST_NAME
    manifest = json.loads(mpath.read_text())
    manifest["weights"].pop("sha256")
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="corrupt weights file"):
        pycompress.load(tmp_path / "m", mlp())


def test_corrupted_or_missing_manifest(tmp_path):
    pycompress.save(mlp(), tmp_path / "m")
    mpath = tmp_path / "m" / MANIFEST_NAME
    text = mpath.read_text()
    mpath.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="corrupt manifest"):
        pycompress.load(tmp_path / "m", mlp())
    mpath.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a pycompress manifest"):
        pycompress.load(tmp_path / "m", mlp())
    mpath.unlink()
    with pytest.raises(FileNotFoundError, match="manifest"):
        pycompress.load(tmp_path / "m", mlp())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pycompress.load(tmp_path / "nothing", mlp())


def test_missing_weights(tmp_path):
    pycompress.save(mlp(), tmp_path / "m")
    (tmp_path / "m" / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="weights file"):
        pycompress.load(tmp_path / "m", mlp())


def test_newer_format_version_is_refused(tmp_path):
    pycompress.save(mlp(), tmp_path / "m")
    mpath = tmp_path / "m" / MANIFEST_NAME
    manifest = json.loads(mpath.read_text())
    manifest["format_version"] = 99
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="format version 99"):
        pycompress.load(tmp_path / "m", mlp())


def test_different_architecture(int8_cls, tmp_path):
    pycompress.save(pycompress.quantize(mlp()), tmp_path / "m")
    with pytest.raises(ValueError, match=r"architecture mismatch.*saved from a Sequential, loading into a SmallCNN"):
        pycompress.load(tmp_path / "m", SmallCNN())
    deeper = nn.Sequential(*mlp(), nn.Linear(10, 10))
    with pytest.raises(ValueError, match=r"modules in the model but not in the file: '5'"):
        pycompress.load(tmp_path / "m", deeper)
    with pytest.raises(ValueError, match=r"layer '0': saved with out_features=64 but the model's Linear has out_features=48"):
        pycompress.load(tmp_path / "m", mlp(hidden=48))


def test_different_sizes_of_plain_layers(tmp_path):
    pycompress.save(mlp(), tmp_path / "m")
    with pytest.raises(ValueError, match=r"do not fit this model.*0.weight: file has shape \(64, 32\), model expects \(48, 32\)"):
        pycompress.load(tmp_path / "m", mlp(hidden=48))
    with pytest.raises(ValueError, match="file has dtype torch.float32, model has torch.float64"):
        pycompress.load(tmp_path / "m", mlp().double())


def test_unknown_layer_class_is_never_imported(int8_cls, tmp_path):
    pycompress.save(pycompress.quantize(mlp()), tmp_path / "m")
    mpath = tmp_path / "m" / MANIFEST_NAME
    manifest = json.loads(mpath.read_text())
    manifest["layers"]["0"]["class"] = "os.system"
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="'os.system', which this pycompress does not know|is a os.system"):
        pycompress.load(tmp_path / "m", mlp())


def test_bad_arguments(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        pycompress.save(mlp(), tmp_path / "file")
    with pytest.raises(TypeError, match="model must be"):
        pycompress.save("model", tmp_path / "m")
    with pytest.raises(TypeError, match="path must be"):
        pycompress.save(mlp(), 3)
    with pytest.raises(TypeError, match="model must be"):
        pycompress.load(tmp_path, None)


class _HalfLinear(nn.Module):
    """A custom layer: fp16 weights, registered so that save/load rebuild it."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.float16))

    def forward(self, x):
        return x @ self.weight.float().t()

    def config(self):
        return {"in_features": self.in_features, "out_features": self.out_features}

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg["in_features"], cfg["out_features"])


def test_registered_custom_layers_round_trip(tmp_path):
    from pycompress.export.serialization import register_layer

    assert register_layer(_HalfLinear) is _HalfLinear
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    half = _HalfLinear(8, 3)
    half.weight.copy_(model[2].weight.detach().half())
    model[2] = half
    pycompress.save(model, tmp_path / "m")
    fresh = pycompress.load(tmp_path / "m", nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)))
    assert isinstance(fresh[2], _HalfLinear)
    _assert_bit_identical(model, fresh, torch.randn(4, 8))

    class _HalfLinear2(_HalfLinear):
        pass

    _HalfLinear2.__name__ = "_HalfLinear"
    with pytest.raises(ValueError, match="already registered"):
        register_layer(_HalfLinear2)
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_layer(int)
    with pytest.raises(TypeError, match="no config"):
        register_layer(nn.Linear)


def test_unserializable_config_is_refused(tmp_path):
    from pycompress.export.serialization import register_layer

    class _BadConfig(_HalfLinear):
        def config(self):
            return {"in_features": self.in_features, "dtype": torch.float16}

    register_layer(_BadConfig)
    model = nn.Sequential(_BadConfig(4, 4))
    with pytest.raises(ValueError, match="not JSON-serializable"):
        pycompress.save(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()


needs_prune = pytest.mark.skipif(not hasattr(pycompress, "prune"), reason="this build has no pycompress.prune")


@needs_prune
@pytest.mark.parametrize("deploy", [None, "sparse", "dense"])
def test_pruned_models_round_trip(tmp_path, deploy):
    model = pycompress.prune(mlp(), 0.7, exclude="4")
    if deploy is not None:
        pycompress.deploy_pruned(model, mode=deploy)
    kinds = {n: type(model.get_submodule(n)).__name__ for n in ("0", "2", "4")}
    pycompress.save(model, tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / MANIFEST_NAME).read_text())
    assert {n: e["class"] for n, e in manifest["layers"].items()} == {
        n: k for n, k in kinds.items() if k != "Linear"}
    fresh = pycompress.load(tmp_path / "m", mlp(seed=9))
    assert {n: type(fresh.get_submodule(n)).__name__ for n in ("0", "2", "4")} == kinds
    _assert_bit_identical(model, fresh, torch.randn(5, 32))


@needs_prune
def test_pruned_then_quantized_round_trip(int8_cls, tmp_path):
    model = pycompress.quantize(pycompress.prune(mlp(), 0.5, pattern="2:4"))
    pycompress.save(model, tmp_path / "m")
    fresh = pycompress.load(tmp_path / "m", mlp(seed=9))
    _assert_bit_identical(model, fresh, torch.randn(5, 32))


def test_compiled_wrappers_save_as_the_plain_model(int8_cls, tmp_path):
    model = pycompress.quantize(mlp())
    compiled = torch.compile(model)
    pycompress.save(compiled, tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / MANIFEST_NAME).read_text())
    assert set(manifest["layers"]) == {"0", "2", "4"}
    fresh = pycompress.load(tmp_path / "m", mlp(seed=4))
    _assert_bit_identical(model, fresh, torch.randn(3, 32))


# --------------------------------------------------------------------------- all or nothing
def _snapshot(model: nn.Module):
    return ({n: type(m) for n, m in model.named_modules()},
            {k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: id(m) for n, m in model.named_modules()})


def _assert_unchanged(model: nn.Module, snap) -> None:
    types, state, ids = snap
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert {n: id(m) for n, m in model.named_modules()} == ids
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), k


class _EmbMLP(nn.Module):
    def __init__(self, vocab=20):
        super().__init__()
        self.emb = nn.Embedding(vocab, 32)
        self.mlp = mlp()

    def forward(self, ids):
        return self.mlp(self.emb(ids).mean(1))


def test_failed_load_leaves_the_model_as_it_was_embedding_of_another_size(int8_cls, tmp_path):
    saved = _EmbMLP(vocab=20)
    pycompress.quantize(saved.mlp)
    pycompress.save(saved, tmp_path / "m")
    target = _EmbMLP(vocab=30)
    snap = _snapshot(target)
    with pytest.raises(ValueError, match=r"emb.weight: file has shape \(20, 32\), model expects \(30, 32\)"):
        pycompress.load(tmp_path / "m", target)
    _assert_unchanged(target, snap)
    assert all(type(target.mlp[i]) is nn.Linear for i in (0, 2, 4))


def test_failed_load_leaves_the_model_as_it_was_missing_layer_path(int8_cls, tmp_path):
    pycompress.save(pycompress.quantize(mlp()), tmp_path / "m")
    mpath = tmp_path / "m" / MANIFEST_NAME
    manifest = json.loads(mpath.read_text())
    manifest["layers"]["9"] = dict(manifest["layers"]["2"])
    mpath.write_text(json.dumps(manifest))
    target = mlp(seed=5)
    snap = _snapshot(target)
    with pytest.raises(ValueError, match="layer '9'.*not in the model|'9'.*no such module"):
        pycompress.load(tmp_path / "m", target)
    _assert_unchanged(target, snap)


@needs_prune
def test_failed_load_leaves_the_model_as_it_was_bad_aliases(tmp_path):
    pycompress.save(pycompress.prune(mlp(), 0.5, exclude="4"), tmp_path / "m")
    mpath = tmp_path / "m" / MANIFEST_NAME
    manifest = json.loads(mpath.read_text())
    assert manifest["layers"]["0"]["class"] == "MaskedLinear"
    manifest["aliases"]["0.mask"] = "no.such.tensor"
    mpath.write_text(json.dumps(manifest))
    target = mlp(seed=5)
    snap = _snapshot(target)
    with pytest.raises(ValueError, match=r"alias '0.mask'.*missing tensor 'no.such.tensor'"):
        pycompress.load(tmp_path / "m", target)
    _assert_unchanged(target, snap)


def test_failed_load_leaves_a_compacted_shape_change_undone(tmp_path):
    # a compacted save whose narrower Linear fits but whose other tensors do not
    model = mlp()
    model[0] = nn.Linear(32, 40)
    model[2] = nn.Linear(40, 64)
    setattr(model, COMPACTED_ATTR, True)
    pycompress.save(model, tmp_path / "m")
    target = mlp(seed=5).double()
    snap = _snapshot(target)
    with pytest.raises(ValueError, match="dtype"):
        pycompress.load(tmp_path / "m", target)
    _assert_unchanged(target, snap)


@pytest.mark.parametrize("where", ["../other/model.safetensors", "/abs", "sub/../../x.safetensors"])
def test_weights_file_outside_the_save_folder_is_refused(tmp_path, where):
    pycompress.save(mlp(), tmp_path / "m")
    (tmp_path / "other").mkdir()
    os.replace(tmp_path / "m" / WEIGHTS_NAME, tmp_path / "other" / WEIGHTS_NAME)
    mpath = tmp_path / "m" / MANIFEST_NAME
    manifest = json.loads(mpath.read_text())
    manifest["weights"]["file"] = str(tmp_path / "other" / WEIGHTS_NAME) if where == "/abs" else where
    mpath.write_text(json.dumps(manifest))
    target = mlp(seed=5)
    snap = _snapshot(target)
    with pytest.raises(ValueError, match="outside the save folder|not a plain file name"):
        pycompress.load(tmp_path / "m", target)
    _assert_unchanged(target, snap)


def test_weights_file_symlinked_out_of_the_save_folder_is_refused(tmp_path):
    pycompress.save(mlp(), tmp_path / "m")
    (tmp_path / "other").mkdir()
    os.replace(tmp_path / "m" / WEIGHTS_NAME, tmp_path / "other" / WEIGHTS_NAME)
    os.symlink(tmp_path / "other" / WEIGHTS_NAME, tmp_path / "m" / WEIGHTS_NAME)
    target = mlp(seed=5)
    snap = _snapshot(target)
    with pytest.raises(ValueError, match="outside the save folder"):
        pycompress.load(tmp_path / "m", target)
    _assert_unchanged(target, snap)


def test_weights_file_under_another_name_inside_the_folder_is_followed(tmp_path):
    model = mlp()
    pycompress.save(model, tmp_path / "m")
    os.replace(tmp_path / "m" / WEIGHTS_NAME, tmp_path / "m" / "w.safetensors")
    mpath = tmp_path / "m" / MANIFEST_NAME
    manifest = json.loads(mpath.read_text())
    manifest["weights"]["file"] = "w.safetensors"
    mpath.write_text(json.dumps(manifest))
    _assert_bit_identical(model, pycompress.load(tmp_path / "m", mlp(seed=5)), torch.randn(3, 32))
