"""Benchmark: int8 2-D convolution (``pycompress.ops.int8_conv2d``) against torch fp32 conv.

Layer shapes of ResNet-18/50 and MobileNetV2 at 224x224 input, batch 1 and 8. Peers measured in
the same run: torch fp32 ``F.conv2d`` with channels_last input and weight (the fast fp32 layout on
the CPU, what ``model.to(memory_format=torch.channels_last)`` gives).
Our rows:

- ``int8 u8->f32``: uint8 input (static per-tensor scale and zero point), fp32 output;
- ``int8 u8->u8``: uint8 input, requantized uint8 output with ReLU (what consecutive int8 layers
  pass each other);
- ``int8 f32->f32 (dynamic)``: fp32 input quantized per image inside the op, fp32 output.

``GOPS`` counts 2 operations per multiply-add of the conv (the int8 rate for our rows).
Every row has ``rel err`` against the fp32 conv of the same real-valued weights and input.

Each case also has rows timed on one thread by CPU time (``[1 thread, CPU time]``, best of the
repeats, see ``common.per_core_ms``): on a shared machine the wall-clock medians of two threads
follow the scheduler (a parallel region waits for whichever thread was descheduled), while one
thread's CPU time stays comparable between runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import pycompress.ops as ops
from common import PER_CORE, per_core_ms, time_fn

KERNEL = "int8_conv"
FP32 = "torch fp32 conv (channels_last)"
U8F32 = "pycompress int8 u8->f32"
U8U8 = "pycompress int8 u8->u8 relu"
DYN = "pycompress int8 f32->f32 (dynamic)"

# name, Cin, H(=W), Cout, k, stride, groups
LAYERS = [
    ("resnet 3x3 64->64 56", 64, 56, 64, 3, 1, 1),
    ("resnet 3x3 128->128 28", 128, 28, 128, 3, 1, 1),
    ("resnet 3x3 128->128 28 s2", 128, 28, 128, 3, 2, 1),
    ("resnet 3x3 256->256 14", 256, 14, 256, 3, 1, 1),
    ("resnet 3x3 512->512 7", 512, 7, 512, 3, 1, 1),
    ("bottleneck 1x1 256->64 56", 256, 56, 64, 1, 1, 1),
    ("mobilenet dw 3x3 144 56", 144, 56, 144, 3, 1, 144),
    ("mobilenet dw 3x3 144 56 s2", 144, 56, 144, 3, 2, 144),
    ("stem 7x7 3->64 224 s2", 3, 224, 64, 7, 2, 1),
]
QUICK = {"resnet 3x3 64->64 56", "resnet 3x3 128->128 28 s2", "bottleneck 1x1 256->64 56", "mobilenet dw 3x3 144 56"}


def _layer(cin, cout, k, groups):
    w = torch.randn(cout, cin // groups, k, k) * (2.0 / (cin // groups * k * k)) ** 0.5
    bias = torch.randn(cout) * 0.1
    w_scale = w.abs().amax(dim=(1, 2, 3)) / 127
    wq = torch.round(w / w_scale[:, None, None, None]).clamp(-127, 127).to(torch.int8)
    return w, bias, wq, w_scale.float()


def run(device: str, quick: bool = False) -> list[dict]:
    if device != "cpu":
        return []
    rows = []
    torch.manual_seed(0)
    batches = [1] if quick else [1, 8]
    layers = [lay for lay in LAYERS if not quick or lay[0] in QUICK]
    for name, cin, hw, cout, k, s, g in layers:
        w, bias, wq, w_scale = _layer(cin, cout, k, g)
        w = w.contiguous(memory_format=torch.channels_last)  # as after model.to(memory_format=...)
        packed = ops.int8_conv2d_pack_weight(wq, g)
        pad = k // 2
        for n in batches:
            x = torch.relu(torch.randn(n, cin, hw, hw)).contiguous(memory_format=torch.channels_last)
            x_scale = torch.tensor([float(x.max()) / 255])
            x_zp = torch.tensor([0], dtype=torch.int32)
            xq = torch.round(x / x_scale).clamp(0, 255).to(torch.uint8).contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                ref = F.conv2d(x, w, bias, s, pad, 1, g)
            out_scale = float(ref.relu().max()) / 255
            ho = ref.shape[2]
            macs = n * cout * ho * ref.shape[3] * (cin // g) * k * k
            kw = dict(w_packed=packed, stride=s, padding=pad, groups=g)
            impls = [
                (FP32, lambda: F.conv2d(x, w, bias, s, pad, 1, g), lambda y: y),
                (U8F32, lambda: ops.int8_conv2d(xq, wq, w_scale, bias, x_scale=x_scale, x_zero_point=x_zp, **kw),
                 lambda y: y),
                (U8U8, lambda: ops.int8_conv2d(xq, wq, w_scale, bias, x_scale=x_scale, x_zero_point=x_zp,
                                               activation="relu", out_dtype=torch.uint8, out_scale=out_scale, **kw),
                 lambda y: y.float() * out_scale),
                (DYN, lambda: ops.int8_conv2d(x, wq, w_scale, bias, **kw), lambda y: y),
            ]
            base = None
            case = f"{name} N={n}"
            rep_pc = 5 if quick else 10
            pc = per_core_ms([(impl, fn) for impl, fn, _ in impls], rep_pc)
            for impl, ms in pc.items():
                rows.append({"kernel": KERNEL, "case": case, "impl": f"{impl} {PER_CORE}", "N": n, "ms": ms,
                             "GOPS": 2.0 * macs / (ms * 1e-3) / 1e9, "x fp32": pc[FP32] / ms})
            with torch.no_grad():
                for impl, fn, deq in impls:
                    target = ref.relu() if impl == U8U8 else ref
                    err = ((deq(fn()).float() - target).norm() / target.norm()).item()
                    rep = 10 if quick else 20
                    t = time_fn(fn, device, warmup=3, repeats=rep, min_time_s=0.2)
                    if impl == FP32:
                        base = t["ms"]
                    rows.append({
                        "kernel": KERNEL, "case": case, "impl": impl, "N": n, **t,
                        "GOPS": 2.0 * macs / (t["ms"] * 1e-3) / 1e9,
                        "x fp32": base / t["ms"],
                        "rel err": err,
                    })
    return rows


def summarize(rows: list[dict]) -> list[str]:
    """One line per case: our rows' speed-up over torch fp32 conv and their int8 GOPS."""
    out = []
    by: dict[str, dict[str, dict]] = {}
    for r in rows:
        by.setdefault(r["case"], {})[r["impl"]] = r
    for case, impls in by.items():
        for suffix, label in (("", "2 threads, median"), (f" {PER_CORE}", "1 thread, CPU time")):
            if FP32 + suffix not in impls:
                continue
            base = impls[FP32 + suffix]["ms"]
            parts = [f"fp32 {base:.3f} ms"]
            for impl in (U8F32, U8U8, DYN):
                if impl + suffix in impls:
                    r = impls[impl + suffix]
                    parts.append(f"{impl.replace('pycompress int8 ', '')} {r['ms']:.3f} ms = "
                                 f"{base / r['ms']:.2f}x, {r['GOPS']:.0f} GOPS")
            out.append(f"{case} [{label}]: " + "; ".join(parts))
    return out
