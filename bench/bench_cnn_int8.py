"""Benchmark: int8 CNN inference on the CPU, pycompress against the tools users pick instead.

Models: ResNet-18, ResNet-50 and MobileNetV2 built by ``tests/cnn_models.py`` (torchvision's
architectures layer for layer) with random weights (seed 0) and random BatchNorm statistics, and
EfficientNet-Lite0: ``pycompress.demo.efficientnet``'s with its ImageNet weights where the package
has that module and the weights package is installed, else the definition below with random
weights; a row's ``weights`` says which. All in eval mode, 1000 classes, 3 x 224 x 224 inputs
(``--quick``: ResNet-18 at 64 x 64).
Implementations, each used as a new user would, with the process's threads (2 here):

* ``torch fp32``: the model in ``channels_last`` memory format, channels-last inputs, no grad;
* ``ONNX Runtime int8``: ``torch.onnx.export`` (batch axis dynamic), ``quant_pre_process``, then
  ``quantize_static`` with its defaults (QDQ format, int8 activations and weights, per-tensor
  weights, min/max calibration) fed by a ``CalibrationDataReader`` over the calibration images;
  ``InferenceSession`` on the CPU with ``intra_op_num_threads`` = the thread count and
  ``session.intra_op.allow_spinning`` off: its threads would otherwise spin for a while after
  each run, on the cores that the implementation timed after it needs (measured here: ResNet-18
  at batch 1 took 1.6x (OpenVINO) and 1.9x (pycompress) longer after an ONNX Runtime run);
* ``OpenVINO int8``: ``openvino.convert_model`` of the torch model, ``nncf.quantize`` with its
  defaults over the calibration images, ``compile_model(..., "CPU")`` with
  ``INFERENCE_NUM_THREADS`` = the thread count, reshaped to a static batch per case;
* ``pycompress``: ``pycompress.quantize(model, calibration_data=...)`` (without the keyword in
  versions whose ``quantize`` does not take it), fed the NCHW batch as it is, as OpenVINO and
  ONNX Runtime are (the stem conv quantizes it into channels-last bytes). ``conv MACs int8``: the
  fraction of the fp32 model's conv multiply-adds that run in a pycompress int8 conv layer
  after the conversion;
* ``pycompress int8 -> ONNX Runtime``: that model written by ``pycompress.export_onnx`` (default
  form: the convs that ONNX Runtime fuses into ``QLinearConv`` / ``QLinearAdd``; verified, batch
  axis dynamic) and run by ONNX Runtime as above: the deployment path to ONNX Runtime, against
  ONNX Runtime's own quantizer; ``[exact]``: the same with ``int8_format="exact"``
  (``ConvInteger`` and the op's fp32 epilogue: the PyTorch model's integers).

Calibration: 32 images; evaluation: 64 other images, both *structured* (smooth random colour
fields, gradients and rectangles, normalised with the ImageNet mean and std), not white noise.
Accuracy of each implementation against torch fp32 on the evaluation images: ``top1 agree``
(same arg-max), ``top1 agree (confident)`` (over the half of the images with the largest fp32
top-1 / top-2 logit margin) and ``cos``: mean cosine similarity of the logit vectors.

Latency: batch 1 and batch 8, every implementation timed in the same process on the same input,
interleaved (one call of each per round), median over the rounds; ``prepare_s`` is the
conversion time (export, calibration and compilation). ``[1 thread, CPU time]`` rows: the best
process CPU time per call with one thread (torch limited to one thread, an ONNX Runtime session
and an OpenVINO compiled model built for one thread), which other load on a shared machine
barely moves.
"""

from __future__ import annotations

import copy
import inspect
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import cnn_models  # noqa: E402
from common import PER_CORE, rows_by_case  # noqa: E402

KERNEL = "cnn_int8"
TORCH, ORT, OV, PYC = "torch fp32", "ONNX Runtime int8", "OpenVINO int8", "pycompress"
PYC_ORT = "pycompress int8 -> ONNX Runtime"
PYC_ORT_EXACT = "pycompress int8 -> ONNX Runtime [exact]"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- EfficientNet-Lite0
class _MBConv(nn.Module):
    """Inverted residual without squeeze-and-excitation: [1x1 expand, BN, ReLU6], kxk depthwise,
    BN, ReLU6, 1x1 project, BN, ``+ x`` when the shape stays."""

    def __init__(self, cin, cout, k, stride, expand):
        super().__init__()
        hidden = cin * expand
        layers = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, k, stride, k // 2, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(inplace=True), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.residual else y


class _EfficientNetLite0(nn.Module):
    # (repeats, kernel, stride, expansion, output channels); the published EfficientNet-Lite0:
    # EfficientNet-B0's stages without squeeze-and-excitation, ReLU6, a fixed 32-channel stem and
    # 1280-channel head
    STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
              (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))

    def __init__(self, num_classes=1000):
        super().__init__()
        layers = [nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(inplace=True)]
        cin = 32
        for n, k, s, e, c in self.STAGES:
            for i in range(n):
                layers.append(_MBConv(cin, c, k, s if i == 0 else 1, e))
                cin = c
        layers += [nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


def efficientnet_lite0(seed=0, num_classes=1000):
    """The package's EfficientNet-Lite0 with its ImageNet weights where ``pycompress.demo`` has it
    and the weights package is installed (the accuracy figures then come from a trained network);
    else the definition above with random weights."""
    try:
        from pycompress.demo.efficientnet import efficientnet_lite0 as make

        model = make(pretrained=True, num_classes=num_classes).eval()
        model.bench_weights = "ImageNet"
        return model
    except ImportError:  # no such module, or its weights package (MissingDependencyError) is absent
        return cnn_models._build(_EfficientNetLite0, seed, num_classes=num_classes)


MODELS = {"ResNet-18": cnn_models.resnet18, "ResNet-50": cnn_models.resnet50,
          "MobileNetV2": cnn_models.mobilenet_v2_imagenet, "EfficientNet-Lite0": efficientnet_lite0}


# --------------------------------------------------------------------------- inputs and metrics
def structured_images(n: int, seed: int, side: int = 224) -> torch.Tensor:
    """``n`` normalised images ``[n, 3, side, side]``: smooth colour fields (bicubic upsampling of
    a coarse random grid), a linear gradient and two flat rectangles each, in [0, 1] before the
    ImageNet normalisation."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 7, 7, generator=g)
    img = F.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False)
    ramp = torch.linspace(0, 1, side)
    angle = torch.rand(n, 1, 1, 1, generator=g) * 6.2832
    grad = torch.cos(angle) * ramp.view(1, 1, 1, side) + torch.sin(angle) * ramp.view(1, 1, side, 1)
    img = 0.6 * img + 0.4 * (grad - grad.amin((2, 3), keepdim=True)) / 2
    for i in range(n):
        for _ in range(2):
            y0, x0 = torch.randint(0, side * 3 // 4, (2,), generator=g).tolist()
            h, w = torch.randint(side // 8, side // 3, (2,), generator=g).tolist()
            img[i, :, y0:y0 + h, x0:x0 + w] = torch.rand(3, 1, 1, generator=g)
    img = img.clamp(0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((img - mean) / std).contiguous()


def agreement(ref: torch.Tensor, out: torch.Tensor) -> dict:
    ref, out = ref.double(), out.double()
    same = ref.argmax(1) == out.argmax(1)
    top2 = ref.topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]
    confident = margin >= margin.median()
    return {"top1 agree": float(same.double().mean()),
            "top1 agree (confident)": float(same[confident].double().mean()),
            "cos": float(F.cosine_similarity(ref, out, dim=1).mean())}


def conv_macs(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Multiply-adds of every conv-shaped module (``in_channels``, ``groups``, ``kernel_size``)
    on ``x``, by module name."""
    macs: dict[str, int] = {}

    def hook_for(name):
        def hook(m, args, out):
            k = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size, m.kernel_size)
            macs[name] = macs.get(name, 0) + out.numel() * (m.in_channels // m.groups) * k[0] * k[1]
        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in model.named_modules()
               if all(hasattr(m, a) for a in ("in_channels", "groups", "kernel_size"))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return macs


def _is_float_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) or type(m).__name__ == "MaskedConv2d"


# --------------------------------------------------------------------------- the implementations
def prepare_torch(model, calib, tmp):
    m = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def run(x):
        return m(x.contiguous(memory_format=torch.channels_last))
    return run, run, {}


def prepare_ort(model, calib, tmp):
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32, pre, q8 = (os.path.join(tmp, f) for f in ("fp32.onnx", "pre.onnx", "int8.onnx"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (calib[:1],), fp32, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    quant_pre_process(fp32, pre)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"input": calib[i:i + 1].numpy()} for i in range(len(calib))])

        def get_next(self):
            return next(self.items, None)

    quantize_static(pre, q8, Reader(), quant_format=QuantFormat.QDQ)
    return _ort_runner(q8, torch.get_num_threads()), _ort_runner(q8, 1), {"onnxruntime": ort.__version__}


def _ort_runner(path, threads):
    """A CPU session of the file with ``threads`` intra-op threads, as a function of the batch."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # ONNX Runtime's threads otherwise spin for a while after each run, on the cores that the
    # implementation timed next (interleaved with it) needs
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: torch.from_numpy(sess.run(None, {name: x.numpy()})[0])


def prepare_openvino(model, calib, tmp):
    import nncf
    import openvino as ov

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ovm = ov.convert_model(model, example_input=calib[:1], input=[-1, 3, calib.shape[2], calib.shape[3]])
    items = [calib[i:i + 1].numpy() for i in range(len(calib))]
    q = nncf.quantize(ovm, nncf.Dataset(items), subset_size=len(items))
    core = ov.Core()
    compiled = {}

    def runner(threads):
        def run(x):
            key = (x.shape[0], threads)
            if key not in compiled:
                qb = q.clone()
                qb.reshape([x.shape[0], 3, x.shape[2], x.shape[3]])
                c = core.compile_model(qb, "CPU", {"INFERENCE_NUM_THREADS": threads})
                compiled[key] = (c, c.create_infer_request())
            req = compiled[key][1]
            req.infer({0: x.numpy()})
            return torch.from_numpy(req.get_output_tensor(0).data.copy())
        return run

    run = runner(torch.get_num_threads())
    run(calib[:1])
    c = next(iter(compiled.values()))[0]
    info = {"openvino": ov.get_version().split("-")[0], "nncf": nncf.__version__,
            "ov_inference_precision": _type_name(c.get_property("INFERENCE_PRECISION_HINT"))}
    return run, runner(1), info


def _type_name(t) -> str:
    name = getattr(t, "get_type_name", None)
    return name() if callable(name) else str(t)


def _pycompress_model(model, calib):
    """``pycompress.quantize`` of a copy of the model, and its conversion facts."""
    import pycompress

    m = copy.deepcopy(model).to(memory_format=torch.channels_last)
    params = inspect.signature(pycompress.quantize).parameters
    kw = {"return_result": True, "warn": False}
    info = {"calibration_data": "calibration_data" in params}
    if info["calibration_data"]:
        kw["calibration_data"] = [calib[i:i + 8] for i in range(0, len(calib), 8)]
    with torch.no_grad():
        q, result = pycompress.quantize(m, **kw)
    x = calib[:1]
    total = conv_macs(model, x)
    converted = {n: v for n, v in conv_macs(q, x).items() if not _is_float_conv(q.get_submodule(n))}
    info.update({"conv MACs int8": sum(converted.values()) / max(1, sum(total.values())),
                 "layers converted": len(result.converted), "layers skipped": len(result.skipped)})
    return q, info


def prepare_pycompress(model, calib, tmp):
    q, info = _pycompress_model(model, calib)

    def run(x):
        return q(x)
    return run, run, info


def prepare_pycompress_ort(model, calib, tmp, int8_format="auto"):
    import onnxruntime as ort

    import pycompress

    q, info = _pycompress_model(model, calib)
    path = os.path.join(tmp, f"pycompress-int8-{int8_format}.onnx")
    pycompress.export_onnx(q, calib[:1], path, int8_format=int8_format)
    return (_ort_runner(path, torch.get_num_threads()), _ort_runner(path, 1),
            {**info, "onnxruntime": ort.__version__, "int8_format": int8_format})


def prepare_pycompress_ort_exact(model, calib, tmp):
    return prepare_pycompress_ort(model, calib, tmp, "exact")


PREPARE = {TORCH: prepare_torch, ORT: prepare_ort, OV: prepare_openvino, PYC: prepare_pycompress,
           PYC_ORT: prepare_pycompress_ort, PYC_ORT_EXACT: prepare_pycompress_ort_exact}


# --------------------------------------------------------------------------- timing
def _interleaved(fns: dict, x: torch.Tensor, rounds: int) -> dict:
    with torch.no_grad():
        for fn in fns.values():
            for _ in range(2):
                fn(x)
        times = {k: [] for k in fns}
        for _ in range(rounds):
            for k, fn in fns.items():
                t = time.perf_counter()
                fn(x)
                times[k].append((time.perf_counter() - t) * 1e3)
    return {k: {"ms": statistics.median(v), "ms_min": min(v), "repeats": len(v)} for k, v in times.items()}


def _per_core(fns: dict, x: torch.Tensor, repeats: int) -> dict:
    """Best process CPU time per call of each single-thread runner, in ms (torch limited to one
    thread meanwhile; ONNX Runtime and OpenVINO run sessions built for one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        with torch.no_grad():
            for k, fn in fns.items():
                fn(x)
                best = float("inf")
                for _ in range(repeats):
                    t0 = time.process_time()
                    fn(x)
                    best = min(best, time.process_time() - t0)
                out[k] = best * 1e3
        return out
    finally:
        torch.set_num_threads(threads)


def run(device: str, quick: bool = False) -> list[dict]:
    if device != "cpu":
        raise ValueError("the CNN int8 benchmark compares CPU runtimes (ONNX Runtime, OpenVINO); run it on the CPU")
    side = 64 if quick else 224
    models = {"ResNet-18": MODELS["ResNet-18"]} if quick else MODELS
    calib = structured_images(4 if quick else 32, seed=10, side=side)
    evals = structured_images(8 if quick else 64, seed=20, side=side)
    batches = {1: 3 if quick else 30, 8: 2 if quick else 8}  # batch -> rounds
    rows = []
    for name, make in models.items():
        model = make()
        with torch.no_grad():
            ref = torch.cat([model(evals[i:i + 8]) for i in range(0, len(evals), 8)])
        fns, fns_1t, extra = {}, {}, {}
        with tempfile.TemporaryDirectory() as tmp:
            for impl, prepare in PREPARE.items():
                t0 = time.perf_counter()
                try:
                    fn, fn_1t, info = prepare(model, calib, tmp)
                    with torch.no_grad():
                        out = torch.cat([fn(evals[i:i + 8]) for i in range(0, len(evals), 8)])
                except ImportError as e:  # a peer that is not installed: no row
                    print(f"  {name}: {impl} skipped: {e}", file=sys.stderr)
                    continue
                fns[impl], fns_1t[impl] = fn, fn_1t
                extra[impl] = {**info, "prepare_s": time.perf_counter() - t0, **agreement(ref, out.float())}
            for batch, rounds in batches.items():
                x = evals[:batch].clone()
                timed = _interleaved(fns, x, rounds)
                core = _per_core(fns_1t, x, repeats=2 if quick else (5 if batch == 1 else 3))
                case = f"{name} B={batch} {side}x{side}"
                for impl in fns:
                    row = {"kernel": KERNEL, "case": case, "impl": impl, **timed[impl], **extra[impl],
                           "weights": getattr(model, "bench_weights", "random"), "threads": torch.get_num_threads()}
                    rows.append(row)
                    rows.append({**row, "impl": f"{impl} {PER_CORE}", "ms": core[impl], "ms_min": core[impl],
                                 "repeats": 2 if quick else (5 if batch == 1 else 3), "threads": 1})
        del fns, model
    return rows


def summarize(rows: list[dict]) -> list[str]:
    """Per model and batch: every implementation's speed-up over torch fp32, and its accuracy."""
    lines = []
    for case, d in rows_by_case(rows).items():
        base = d.get(TORCH)
        if base is None:
            continue
        parts = []
        for impl, r in d.items():
            if impl == TORCH or impl.endswith(PER_CORE):
                continue
            s = f"{impl} {r['ms']:.1f} ms = {base['ms'] / r['ms']:.2f}x (top-1 {100 * r['top1 agree']:.0f} %, cos {r['cos']:.4f}"
            if "conv MACs int8" in r:
                s += f", conv MACs int8 {100 * r['conv MACs int8']:.0f} %"
            parts.append(s + ")")
        lines.append(f"{case}: torch fp32 {base['ms']:.1f} ms; " + "; ".join(parts))
        core = {i[:-len(PER_CORE) - 1]: r for i, r in d.items() if i.endswith(PER_CORE)}
        if TORCH in core:
            lines.append(f"{case} {PER_CORE}: torch fp32 {core[TORCH]['ms']:.1f} ms; " + "; ".join(
                f"{i} {r['ms']:.1f} ms = {core[TORCH]['ms'] / r['ms']:.2f}x" for i, r in core.items() if i != TORCH))
    return lines
