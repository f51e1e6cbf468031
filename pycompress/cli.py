"""``pycompress`` command line: demo, compress, evaluate, report, bench, export.

    pycompress demo [--task vision|digits-mlp] [--out DIR] [--seed N] [--quick]
    pycompress compress --model MODULE:FACTORY [--weights FILE] --recipe FILE --out DIR [--calib FILE]
    pycompress evaluate DIR [--data FILE]
    pycompress report DIR
    pycompress bench [--kernels int8,sparse,kd] [--json FILE] [--quick]
    pycompress export --model MODULE:FACTORY [--weights PATH] --onnx OUT.onnx
                      (--input-shape 8,16[:dtype] [--input-shape ...] | --inputs FILE)

Also runs as ``python -m pycompress ...`` and under ``torchrun ... -m pycompress demo``.
Errors print one line (``pycompress: error: ...``) and exit with status 1; ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from typing import Any

__all__ = ["main", "load_factory", "load_data_file"]


class CLIError(Exception):
    """An error the user can fix: printed as one line without a traceback."""


# --------------------------------------------------------------------------- helpers


def load_factory(spec: str):
    """``MODULE:FACTORY`` (a dotted module importable from the current directory, or a path to a
    ``.py`` file) -> the callable ``FACTORY`` (``a.b:make`` or ``models.py:Net``)."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise CLIError(f"--model must look like MODULE:FACTORY (e.g. mypkg.models:make_model), "
                       f"got {spec!r}")
    mod_name, attr = spec.split(":")
    if mod_name.endswith(".py"):
        path = os.path.abspath(mod_name)
        if not os.path.isfile(path):
            raise CLIError(f"model file not found: {mod_name}")
        name = "pycompress_user_" + os.path.splitext(os.path.basename(path))[0]
        loader_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        loader_spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            raise CLIError(f"cannot import module {mod_name!r} for --model: {e}") from e
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise CLIError(f"module {mod_name!r} has no factory {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise CLIError(f"{spec} is not callable")
    return factory


def _build_model(spec: str, kwargs: dict | None = None):
    import torch.nn as nn

    model = load_factory(spec)(**(kwargs or {}))
    if not isinstance(model, nn.Module):
        raise CLIError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _load_weights(model, path: str) -> None:
    import torch

    import pycompress

    if not os.path.exists(path):
        raise CLIError(f"weights file not found: {path}")
    if os.path.isdir(path) or path.endswith(".pycompress"):
        pycompress.load(path, model)
        return
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CLIError(f"cannot read weights from {path}: {str(e).splitlines()[0]}") from e
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise CLIError(f"{path} does not hold a state_dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CLIError(f"weights in {path} do not fit the model: "
                       f"{' '.join(str(e).split())[:300]}") from e


def load_data_file(path: str) -> tuple[Any, Any]:
    """(inputs, labels or None) from ``.pt`` (a tensor, a tuple/list ``(inputs, labels)`` or a
    dict with ``inputs``/``labels``), ``.safetensors``, ``.npy`` or ``.npz`` (keys ``inputs``
    and ``labels``, or ``x`` and ``y``). Files are read without unpickling code."""
    import numpy as np
    import torch

    if not os.path.isfile(path):
        raise CLIError(f"data file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj = load_file(path)
        elif path.endswith(".npy"):
            obj = torch.from_numpy(np.load(path, allow_pickle=False))
        elif path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                obj = {k: torch.from_numpy(z[k]) for k in z.files}
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except CLIError:
        raise
    except Exception as e:
        raise CLIError(f"cannot read data from {path}: {str(e).splitlines()[0]}") from e
    if isinstance(obj, torch.Tensor):
        return obj, None
    if isinstance(obj, (tuple, list)) and len(obj) in (1, 2):
        return obj[0], (obj[1] if len(obj) == 2 else None)
    if isinstance(obj, dict):
        for xk, yk in (("inputs", "labels"), ("x", "y")):
            if xk in obj:
                return obj[xk], obj.get(yk)
    raise CLIError(f"{path}: expected a tensor, (inputs, labels) or a dict with 'inputs' "
                   f"(and 'labels')")


def _read_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise CLIError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CLIError(f"{path} is not valid JSON: {e}") from e


def _write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def _to_jsonable(report) -> Any:
    if report is None:
        return None
    if hasattr(report, "to_dict"):
        return report.to_dict()
    if isinstance(report, dict):
        return report
    return str(report)


# --------------------------------------------------------------------------- commands


def cmd_demo(args) -> int:
    from pycompress import demo

    demo.run_demo(out=args.out, seed=args.seed, quick=args.quick,
                  progress=not args.no_progress, task=args.task)
    return 0


def cmd_compress(args) -> int:
    import pycompress

    if not os.path.isfile(args.recipe):
        raise CLIError(f"recipe file not found: {args.recipe}")
    if not args.recipe.endswith((".yaml", ".yml", ".json")):
        raise CLIError(f"recipe must be a .yaml, .yml or .json file, got {args.recipe}")
    model = _build_model(args.model)
    if args.weights:
        _load_weights(model, args.weights)
    model.eval()
    calib, labels = (load_data_file(args.calib) if args.calib else (None, None))
    if calib is None:
        raise CLIError("--calib FILE is needed: calibration inputs for the recipe and the "
                       "validation of the result")
    reference = copy.deepcopy(model)
    metric, calibration = None, calib
    if args.max_drop is not None:
        if labels is None:
            raise CLIError("--max-drop needs labels in the --calib file to measure accuracy")
        metric, calibration = "accuracy", [(calib, labels)]
    try:
        model, creport = pycompress.compress(model, args.recipe, calibration, metric=metric,
                                             max_drop=args.max_drop)
    except (ValueError, TypeError, KeyError) as e:
        raise CLIError(f"recipe {args.recipe}: {e}") from e
    vreport = pycompress.validate(reference, model, calib)
    os.makedirs(args.out, exist_ok=True)
    pycompress.save(model, os.path.join(args.out, "model"))
    factory = args.model
    mod, _, attr = factory.partition(":")
    if mod.endswith(".py"):
        factory = os.path.abspath(mod) + ":" + attr
    _write_json(os.path.join(args.out, "pycompress.json"), {
        "factory": factory,
        "recipe": os.path.abspath(args.recipe),
        "calib": os.path.abspath(args.calib),
        "compression": _to_jsonable(creport),
        "validation": _to_jsonable(vreport),
    })
    md = ["# pycompress compress", "", f"model: `{args.model}`, recipe: `{args.recipe}`", ""]
    if hasattr(vreport, "to_markdown"):
        md += ["## Validation against the original model", "", vreport.to_markdown(), ""]
    if hasattr(creport, "to_markdown"):
        md += ["## Compression", "", creport.to_markdown(), ""]
    with open(os.path.join(args.out, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
    print(f"compressed model saved to {os.path.join(args.out, 'model')}")
    print(vreport if not hasattr(vreport, "to_markdown") else vreport.to_markdown())
    return 0


def cmd_evaluate(args) -> int:
    import pycompress
    from pycompress import demo

    meta = _read_json(os.path.join(args.dir, "pycompress.json"),
                      "pycompress.json (written by `pycompress compress` or the demo)")
    if "factory" not in meta:
        raise CLIError(f"{args.dir}/pycompress.json names no model factory")
    model_path = os.path.join(args.dir, "model")
    if not os.path.exists(model_path):
        raise CLIError(f"no saved model in {args.dir} (expected {model_path})")
    model = _build_model(meta["factory"], meta.get("factory_kwargs"))
    pycompress.load(model_path, model)
    if args.data:
        x, y = load_data_file(args.data)
    elif meta.get("data"):
        ds = load_factory(meta["data"])(**meta.get("data_kwargs", {}))
        x, y = ds.tensors[0], ds.tensors[1]
    else:
        raise CLIError("no evaluation data: pass --data FILE (inputs and labels)")
    if y is None:
        raise CLIError("the evaluation data has no labels: accuracy needs (inputs, labels)")
    from torch.utils.data import TensorDataset

    import torch

    previous = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        report = demo.measure(model, TensorDataset(x, y), os.path.basename(
            os.path.normpath(args.dir)), repeats=args.repeats)
    finally:
        torch.set_num_threads(previous)
    print(demo.render_table([demo.row_from_report(report)]))
    if args.json:
        _write_json(args.json, report.to_dict())
    return 0


def cmd_report(args) -> int:
    from pycompress import demo

    path = os.path.join(args.dir, "report.json")
    report = _read_json(path, "report.json (written by `pycompress demo`)")
    if not isinstance(report.get("rows"), list) or not report["rows"]:
        raise CLIError(f"{path} holds no result rows")
    try:
        text = demo.render_markdown(report)
    except (KeyError, TypeError) as e:
        raise CLIError(f"{path} is not a pycompress demo report (missing {e})") from e
    with open(os.path.join(args.dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(text)
    demo.write_plot(report["rows"], args.dir)
    print(demo.render_table(report["rows"]))
    print(f"\nre-rendered {os.path.join(args.dir, 'report.md')} and compare.png")
    return 0


def bench_runner() -> str:
    """Path of bench/run.py in the source tree next to the package."""
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.join(os.path.dirname(here), "bench", "run.py")


def cmd_bench(args) -> int:
    runner = bench_runner()
    if not os.path.isfile(runner):
        raise CLIError(f"the kernel benchmarks are not installed ({runner} not found): they "
                       "live in bench/ of a source checkout; run this from an editable install "
                       "(pip install -e .)")
    cmd = [sys.executable, runner]
    if args.kernels:
        cmd += ["--kernels", args.kernels]
    if args.json:
        cmd += ["--json", args.json]
    if args.quick:
        cmd += ["--quick"]
    if args.device:
        cmd += ["--device", args.device]
    if args.runs is not None:
        cmd += ["--runs", str(args.runs)]
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(runner))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.call(cmd, env=env)


_EXPORT_DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "bool")


def _parse_input_shape(spec: str, int_high: int, seed: int):
    """``"8,16"`` / ``"8,16:int64"`` -> a random example tensor of that shape and dtype."""
    import torch

    shape_s, _, dtype_s = spec.partition(":")
    dtype_s = dtype_s or "float32"
    try:
        shape = [int(v) for v in shape_s.split(",")]
    except ValueError:
        shape = []
    if not shape or any(v < 1 for v in shape):
        raise CLIError(f"--input-shape must look like 8,16 or 8,16:int64 (positive sizes), got {spec!r}")
    if dtype_s not in _EXPORT_DTYPES:
        raise CLIError(f"--input-shape {spec!r}: dtype must be one of {', '.join(_EXPORT_DTYPES)}")
    dtype = getattr(torch, dtype_s)
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    if dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool)
    return torch.randint(0, int_high, shape, generator=g, dtype=dtype)


def cmd_export(args) -> int:
    import pycompress

    if not args.onnx.endswith(".onnx"):
        raise CLIError(f"--onnx must name a .onnx file, got {args.onnx}")
    out_dir = os.path.dirname(os.path.abspath(args.onnx))
    if not os.path.isdir(out_dir):
        raise CLIError(f"--onnx: the folder {out_dir} does not exist")
    if bool(args.input_shape) == bool(args.inputs):
        raise CLIError("give the example inputs either with --input-shape (once per positional "
                       "input) or with --inputs FILE")
    if args.int_high < 1:
        raise CLIError(f"--int-high must be >= 1, got {args.int_high}")
    if args.opset is not None and args.opset < 15:
        raise CLIError(f"--opset must be >= 15, got {args.opset}")
    if args.input_shape:
        example = tuple(_parse_input_shape(s, args.int_high, i) for i, s in enumerate(args.input_shape))
    else:
        example, _ = load_data_file(args.inputs)
        if isinstance(example, list):
            example = tuple(example)
    names = None
    if args.input_names:
        names = [n.strip() for n in args.input_names.split(",")]
        n_in = len(example) if isinstance(example, tuple) else 1
        if len(names) != n_in or not all(names):
            raise CLIError(f"--input-names has {len(names)} name(s) for {n_in} input(s)")
    model = _build_model(args.model)
    if args.weights:
        _load_weights(model, args.weights)
    model.eval()
    try:
        path = pycompress.export_onnx(model, example, args.onnx, input_names=names,
                                      dynamic_axes={} if args.static else None, opset=args.opset,
                                      verify=not args.no_verify, int8_format=args.int8_format,
                                      exporter=args.exporter, attention=args.attention)
    except ImportError as e:
        raise CLIError(str(e)) from e
    except (ValueError, TypeError, OSError) as e:
        raise CLIError(f"export failed: {e}") from e
    size = os.path.getsize(path) / 1e6
    print(f"wrote {path} ({size:.2f} MB)" + ("" if args.no_verify else
                                              ", verified in ONNX Runtime against PyTorch"))
    return 0


# --------------------------------------------------------------------------- parser


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    """--model MODULE:FACTORY, shared by the commands that build the user's model."""
    parser.add_argument("--model", required=True, help="MODULE:FACTORY returning an nn.Module "
                        "(MODULE may be a .py file)")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks on errors")
    p = argparse.ArgumentParser(
        prog="pycompress", parents=[common],
        description="Compress trained PyTorch models (prune, quantize, distill) and measure it.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", parents=[common], help="transfer + compression demos",
                       description="--task vision (what `make demo` runs): transfer EfficientNet-Lite0 "
                       "pretrained on ImageNet to upsampled digits, compress it (int8, channel pruning by "
                       "activation / magnitude / mixed + compact, pruned + int8, a distilled CNN). "
                       "--task digits-mlp: transfer a digits MLP from 0-4 to 5-9 and compress it. Both "
                       "write report.md, report.json, compare.png and the models.")
    d.add_argument("--task", choices=["vision", "digits-mlp"], default="vision",
                   help="which story (default: vision; digits-mlp is the fast one)")
    d.add_argument("--out", default="pycompress-demo", help="output folder (default: "
                   "./pycompress-demo)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.add_argument("--quick", action="store_true", help="fewer epochs and timing repeats (vision: "
                   "also 60 training images per class instead of all 1198)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("compress", parents=[common], help="apply a recipe to your model",
                       description="Build MODULE:FACTORY, load --weights, apply the recipe with "
                       "pycompress.compress, validate against the original and save to --out.")
    _add_model_argument(c)
    c.add_argument("--weights", help="state_dict file (.safetensors, .pt) or a pycompress.save "
                   "folder")
    c.add_argument("--recipe", required=True, help="recipe file (.yaml or .json)")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--calib", help="calibration inputs (.pt, .safetensors, .npy, .npz; "
                   "optionally with labels)")
    c.add_argument("--max-drop", type=float, default=None,
                   help="largest accuracy drop allowed (needs labels in --calib)")
    c.set_defaults(func=cmd_compress)

    e = sub.add_parser("evaluate", parents=[common], help="evaluate a saved model",
                       description="Load the model saved in DIR (by `compress` or the demo) "
                       "and measure accuracy, size and latency.")
    e.add_argument("dir", help="folder holding pycompress.json and model")
    e.add_argument("--data", help="inputs and labels (.pt, .safetensors, .npz)")
    e.add_argument("--repeats", type=int, default=100, help="latency repeats (default 100)")
    e.add_argument("--json", help="also write the measurements to this JSON file")
    e.add_argument("--threads", type=int, default=None,
                   help="intra-op threads while measuring (default: torch's)")
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("report", parents=[common], help="re-render a demo report",
                       description="Re-render report.md and compare.png from DIR/report.json "
                       "and print the table.")
    r.add_argument("dir", help="folder holding report.json")
    r.set_defaults(func=cmd_report)

    b = sub.add_parser("bench", parents=[common], help="kernel microbenchmarks",
                       description="Run bench/run.py of the source tree.")
    b.add_argument("--kernels", help="comma-separated kernels (e.g. int8,sparse,kd)")
    b.add_argument("--json", help="write the results to this JSON file")
    b.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    b.add_argument("--device", choices=["cpu", "cuda"], help="device (default: cpu)")
    b.add_argument("--runs", type=int, help="repeat each kernel's benchmark N times in fresh processes "
                   "and keep the median run per row")
    b.set_defaults(func=cmd_bench)

    x = sub.add_parser("export", parents=[common], help="export a model to ONNX",
                       description="Build MODULE:FACTORY, load --weights (e.g. a folder written "
                       "by `pycompress compress`, which restores the compressed layers) and write "
                       "an ONNX file with standard int8 operators, verified in ONNX Runtime. "
                       "Needs pip install pycompress[onnx].")
    _add_model_argument(x)
    x.add_argument("--weights", help="pycompress.save folder, or a state_dict file "
                   "(.safetensors, .pt)")
    x.add_argument("--onnx", required=True, help="output .onnx file")
    x.add_argument("--input-shape", action="append", metavar="SHAPE[:DTYPE]",
                   help="shape of one positional example input, e.g. 8,16 or 8,16:int64 "
                   "(repeat once per input; random values; integers in [0, --int-high))")
    x.add_argument("--inputs", help="example inputs from a file instead (.pt, .safetensors, "
                   ".npy, .npz)")
    x.add_argument("--int-high", type=int, default=100, help="integer example inputs are drawn "
                   "from [0, INT_HIGH) (default 100)")
    x.add_argument("--input-names", help="comma-separated graph input names")
    x.add_argument("--opset", type=int, default=None,
                   help="ONNX opset (default 23 where the exporter, onnx and onnxruntime have it, else 18)")
    x.add_argument("--int8-format", default="auto",
                   choices=["auto", "standard", "u8u8", "u8s8", "s8s8", "contrib", "contrib-u8u8",
                            "contrib-u8s8", "contrib-s8s8", "qdq", "exact"],
                   help="integer form of the int8 layers (default auto: convs that ONNX Runtime fuses into "
                        "QLinearConv / QLinearAdd where they allow it, the exact form should that fail the "
                        "check; qdq: the same without that fallback; exact: ConvInteger and the op's epilogue)")
    x.add_argument("--exporter", default="auto", choices=["auto", "dynamo", "torchscript"],
                   help="torch exporter (default auto: torch.export-based on torch >= 2.6)")
    x.add_argument("--attention", default="fused", choices=["fused", "exporter"],
                   help="scaled_dot_product_attention as one fused operator (default; Attention from opset 23, "
                        "ONNX Runtime's MultiHeadAttention below) or as the torch exporter writes it")
    x.add_argument("--static", action="store_true", help="static shapes (default: dynamic batch)")
    x.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime check")
    x.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pycompress`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("pycompress: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI turns every failure into one line
        if getattr(args, "debug", False):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        if not isinstance(e, CLIError):
            msg = f"{type(e).__name__}: {msg}"
        print(f"pycompress: error: {msg} (--debug shows the traceback)", file=sys.stderr)
        return 1
    finally:
        from pycompress.distillation import distributed

        distributed.shutdown()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
