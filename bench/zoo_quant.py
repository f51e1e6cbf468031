"""Model-zoo check of ``quantize``: torchvision / timm CNNs and vision transformers.

    python bench/zoo_quant.py --ext build/cuda/lib [--models ResNet-50,ViT-B/16,...]
                              [--batch 4] [--mode w8a8] [--exclude PATTERN] [--json FILE]

Runs in a Python environment that has torchvision and timm (the CUDA-torch venv of
``make cuda-build``, whose torch runs on the CPU too); ``--ext DIR`` names the folder holding a
``pycompress/_C*.so`` built for that torch (as in ``bench/zoo_prune.py``).

Per architecture, with random weights (seed 0; the classification head, which torchvision
initializes to zero, gets random normal weights so that the logits are not constant), in eval
mode, on ``--batch`` random 224 x 224 images (seed 1):

1. ``quantize(model, mode)`` (CNNs: with ``calibration_data``, two batches of random images of
   seeds 2 and 3; transformers: dynamic): recorded are the layers converted per class
   (``Int8Conv2d``, ``Int8MultiheadAttention`` for torchvision's ``nn.MultiheadAttention``,
   ``Int8Linear``), the layers left in floating point with the reason, and for CNNs the share of
   conv multiply-adds in int8, the uint8 edges and the blocks whose residual additions the convs
   compute.
2. The quantized model against the fp32 model on the same images: the mean and worst cosine of
   the logit rows, the cosine of the final features (the input of the head), top-1 agreement of
   the logits (random weights: only a sanity figure) and ``validate``'s worst per-layer cosine.
3. ``save`` and ``load`` into a fresh model of the architecture: whether the outputs are
   bit-identical.

Accuracy only (no timing). Prints one JSON row per architecture and writes them as a
``bench/run.py``-style results file (kernel ``zoo_quant``), default
``bench/results/<device>-zoo-quant.json``; ``bench/tables.py`` renders its ``zoo-quant`` table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# name -> (library, constructor, head attribute path); the CNNs are calibrated
ARCHS = {
    "ResNet-18": ("torchvision", "resnet18", "fc"),
    "ResNet-50": ("torchvision", "resnet50", "fc"),
    "MobileNetV2": ("torchvision", "mobilenet_v2", "classifier.1"),
    "EfficientNet-Lite0": ("timm", "efficientnet_lite0", "classifier"),
    "VGG-16": ("torchvision", "vgg16", "classifier.6"),
    "RegNetY-400MF": ("torchvision", "regnet_y_400mf", "fc"),
    "ConvNeXt-tiny": ("torchvision", "convnext_tiny", "classifier.2"),
    "ViT-B/16": ("torchvision", "vit_b_16", "heads.head"),
    "ViT-tiny": ("timm", "vit_tiny_patch16_224", "head"),
}
TRANSFORMERS = ("ViT-B/16", "ViT-tiny")


def _build(lib: str, ctor: str, head: str):
    import torch

    torch.manual_seed(0)
    if lib == "torchvision":
        import torchvision

        model = getattr(torchvision.models, ctor)(weights=None)
    else:
        import timm

        model = timm.create_model(ctor, pretrained=False)
    lin = model.get_submodule(head)
    with torch.no_grad():
        lin.weight.normal_(0.0, 0.02)
        lin.bias.zero_()
    return model.eval()


def _cos_rows(a, b):
    import torch

    return torch.nn.functional.cosine_similarity(a.double().flatten(1), b.double().flatten(1), dim=1)


def one(name: str, batch: int, mode: str, exclude: str | None = None) -> dict:
    import copy
    import warnings

    import torch

    import pycompress

    lib, ctor, head = ARCHS[name]
    model = _build(lib, ctor, head)
    torch.manual_seed(1)
    x = torch.randn(batch, 3, 224, 224)
    feats = {}

    def grab(key):
        def hook(m, args):
            feats[key] = args[0].detach()
        return hook

    calib = None
    if name not in TRANSFORMERS:
        calib = [torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(s)) for s in (2, 3)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # transformers: the example input only counts the conv multiply-adds (quantization is dynamic)
        q, res = pycompress.quantize(copy.deepcopy(model), mode=mode, exclude=exclude, calibration_data=calib,
                                     example_inputs=x[:1] if calib is None else None, return_result=True)
    classes: dict[str, int] = {}
    for n in res.converted:
        c = type(q.get_submodule(n)).__name__
        classes[c] = classes.get(c, 0) + 1
    h1 = model.get_submodule(head).register_forward_pre_hook(grab("ref"))
    h2 = q.get_submodule(head).register_forward_pre_hook(grab("q"))
    with torch.no_grad():
        ref = model(x)
        out = q(x)
    h1.remove()
    h2.remove()
    cos = _cos_rows(out, ref)
    fcos = _cos_rows(feats["q"], feats["ref"])
    rep = pycompress.validate(model, q, [x])
    worst = min(rep.layers.items(), key=lambda kv: kv[1].cosine)
    with tempfile.TemporaryDirectory() as tmp:
        pycompress.save(q, os.path.join(tmp, "m"))
        fresh = pycompress.load(os.path.join(tmp, "m"), _build(lib, ctor, head))
        with torch.no_grad():
            exact = bool(torch.equal(fresh(x), out))
    return {
        "kernel": "zoo_quant", "case": name, "impl": f"pycompress {mode}", "status": "ok",
        "model": f"{lib}.{ctor}", "mode": mode, "exclude": exclude, "batch": batch,
        "torch": torch.__version__,
        "converted": classes, "skipped": res.skipped,
        "quantize_warnings": [str(w.message)[:300] for w in caught],
        "logit_cosine_mean": float(cos.mean()), "logit_cosine_min": float(cos.min()),
        "feature_cosine_mean": float(fcos.mean()),
        "top1_agreement": float((out.argmax(1) == ref.argmax(1)).double().mean()),
        "validate_passed": bool(rep.passed), "worst_layer": worst[0], "worst_layer_cosine": float(worst[1].cosine),
        "int8_conv_macs": res.int8_mac_fraction, "uint8_edges": len(res.uint8_edges),
        "residual_blocks": len(res.residual_blocks), "save_load_exact": exact,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ext", help="folder with pycompress/_C*.so built for this Python's torch")
    ap.add_argument("--models", default=",".join(ARCHS), help="comma-separated: " + ", ".join(ARCHS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--mode", default="w8a8", choices=("w8a8", "w8a16"))
    ap.add_argument("--exclude", default=None, help="quantize's exclude pattern (e.g. '*.self_attention')")
    ap.add_argument("--json", default=None)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.batch, args.mode, args.exclude)))
        return 0
    sys.path.insert(0, HERE)
    from zoo_prune import _model_names, _stage_package, probe_versions, write_results

    names = _model_names(args.models, ARCHS)
    if names is None:
        return 2

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ)
        if args.ext:
            env["PYTHONPATH"] = _stage_package(os.path.abspath(args.ext), tmp) + os.pathsep + env.get("PYTHONPATH", "")
        versions = probe_versions(env, tmp, "zoo_quant")
        if versions is None:
            return 1
        load_before = os.getloadavg()[0]
        for name in names:
            cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--batch", str(args.batch),
                   "--mode", args.mode] + (["--exclude", args.exclude] if args.exclude else [])
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
            if p.returncode != 0:
                lib, ctor, _ = ARCHS[name]
                row = {"kernel": "zoo_quant", "case": name, "impl": f"pycompress {args.mode}", "model": f"{lib}.{ctor}",
                       "status": "failed", "error": p.stderr.strip()[-2000:]}
            else:
                row = json.loads(p.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = write_results("zoo_quant", rows, versions, load_before, args.json, "zoo-quant",
                        {"batch": args.batch, "mode": args.mode, "exclude": args.exclude})
    print(f"wrote {out}")
    return 0 if all(r.get("status") != "failed" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
