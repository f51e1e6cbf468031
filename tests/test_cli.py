"""The pycompress command line: every command, its --help and its error paths."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

import torchrun_util
from _pylayer_models import user_model_module
from pycompress import cli


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("pycompress: error: ") and "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-demo")
    assert cli.main(["demo", "--task", "digits-mlp", "--quick", "--no-progress", "--out", str(out)]) == 0
    return out


@pytest.fixture
def user_model(tmp_path, monkeypatch):
    model = user_model_module(tmp_path, monkeypatch, "usermodels")
    torch.save(model.state_dict(), tmp_path / "w.pt")
    x = torch.randn(64, 16)
    torch.save({"inputs": x, "labels": model(x).argmax(-1)}, tmp_path / "calib.pt")
    (tmp_path / "recipe.yaml").write_text("steps:\n  - quantize: {mode: w8a8}\n")
    (tmp_path / "bad.yaml").write_text("steps:\n  - squash: {}\n")
    return tmp_path


@pytest.mark.parametrize("command", [[], ["demo"], ["compress"], ["evaluate"], ["report"],
                                     ["bench"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(command + ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: pycompress")


def test_python_dash_m_entry_point():
    res = subprocess.run([sys.executable, "-m", "pycompress", "--help"], capture_output=True,
                         text=True, env=torchrun_util.child_env(), timeout=60)
    assert res.returncode == 0 and "compress" in res.stdout and "bench" in res.stdout


def test_no_command_prints_help(capsys):
    code, out, _ = run_cli(capsys)
    assert code == 1 and "usage: pycompress" in out


def test_demo_writes_report(demo_dir):
    for name in ("report.md", "report.json", "compare.png"):
        assert (demo_dir / name).stat().st_size > 0


def test_report_rerenders(demo_dir, capsys):
    (demo_dir / "report.md").unlink()
    code, out, _ = run_cli(capsys, "report", str(demo_dir))
    assert code == 0 and "student distilled" in out
    assert "| int8 w8a8 |" in (demo_dir / "report.md").read_text()


def test_report_errors(tmp_path, capsys):
    code, _, err = run_cli(capsys, "report", str(tmp_path))
    assert_one_line_error(code, err, "report.json", "not found")
    (tmp_path / "report.json").write_text("{not json")
    code, _, err = run_cli(capsys, "report", str(tmp_path))
    assert_one_line_error(code, err, "not valid JSON")
    (tmp_path / "report.json").write_text('{"rows": []}')
    code, _, err = run_cli(capsys, "report", str(tmp_path))
    assert_one_line_error(code, err, "no result rows")


def test_evaluate_demo_model(demo_dir, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "evaluate", str(demo_dir / "models" / "int8_w8a8"),
                           "--repeats", "5", "--json", str(tmp_path / "e.json"))
    assert code == 0 and "int8_w8a8" in out
    ev = json.loads((tmp_path / "e.json").read_text())
    stored = json.loads((demo_dir / "report.json").read_text())["rows"][1]
    assert ev["metric"] == pytest.approx(stored["accuracy"])
    assert ev["size_bytes"] == stored["bytes"]


def test_evaluate_errors(tmp_path, capsys):
    code, _, err = run_cli(capsys, "evaluate", str(tmp_path / "nowhere"))
    assert_one_line_error(code, err, "pycompress.json")
    (tmp_path / "pycompress.json").write_text('{"factory": "pycompress.demo:build_model"}')
    code, _, err = run_cli(capsys, "evaluate", str(tmp_path))
    assert_one_line_error(code, err, "no saved model")


def test_compress_then_evaluate(user_model, capsys):
    out = user_model / "out"
    code, stdout, err = run_cli(capsys, "compress", "--model", "usermodels:make", "--weights",
                                "w.pt", "--recipe", "recipe.yaml", "--out", str(out),
                                "--calib", "calib.pt")
    assert code == 0, err
    assert (out / "model").is_dir() and (out / "report.md").is_file()
    meta = json.loads((out / "pycompress.json").read_text())
    assert meta["factory"] == "usermodels:make" and meta["validation"]
    code, stdout, err = run_cli(capsys, "evaluate", str(out), "--data", "calib.pt",
                                "--repeats", "3")
    assert code == 0, err
    assert "out" in stdout


def test_compress_with_a_model_file_and_max_drop(user_model, capsys):
    code, _, err = run_cli(capsys, "compress", "--model", "usermodels.py:make", "--weights",
                           "w.pt", "--recipe", "recipe.yaml", "--out", "out2", "--calib",
                           "calib.pt", "--max-drop", "0.05")
    assert code == 0, err


@pytest.mark.parametrize("args,needles", [
    (["--model", "usermodels:nope"], ["no factory", "nope"]),
    (["--model", "usermodels"], ["MODULE:FACTORY"]),
    (["--model", "no_such_module_xyz:make"], ["cannot import", "no_such_module_xyz"]),
    (["--model", "usermodels:not_a_model"], ["not callable"]),
    (["--recipe", "missing.yaml"], ["recipe file not found"]),
    (["--recipe", "bad.yaml"], ["bad.yaml"]),
    (["--weights", "missing.pt"], ["weights file not found"]),
    (["--weights", "calib.pt"], ["do not fit the model"]),
    (["--calib", "missing.pt"], ["data file not found"]),
    (["--calib", None], ["--calib"]),
    (["--calib", "w.pt", "--max-drop", "0.01"], ["expected a tensor"]),
])
def test_compress_errors(user_model, capsys, args, needles):
    base = {"--model": "usermodels:make", "--recipe": "recipe.yaml", "--out": "o",
            "--calib": "calib.pt"}
    extra = []
    for i in range(0, len(args), 2):
        if args[i] in base:
            base[args[i]] = args[i + 1]
        else:
            extra += args[i:i + 2]
    argv = ["compress"]
    for k, v in base.items():
        if v is not None:
            argv += [k, v]
    code, _, err = run_cli(capsys, *(argv + extra))
    assert_one_line_error(code, err, *needles)


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(cli.CLIError, match="report.json"):
        cli.main(["--debug", "report", str(tmp_path)])
    with pytest.raises(cli.CLIError):
        cli.main(["report", "--debug", str(tmp_path)])


def test_bench_missing_runner(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cli, "bench_runner", lambda: str(tmp_path / "bench" / "run.py"))
    code, _, err = run_cli(capsys, "bench")
    assert_one_line_error(code, err, "bench/run.py not found")


def test_bench_forwards_arguments_and_exit_status(monkeypatch, tmp_path, capfd):
    assert os.path.isfile(cli.bench_runner())  # the source tree's runner is found
    fake = tmp_path / "bench" / "run.py"
    fake.parent.mkdir()
    fake.write_text("import sys\nprint('ARGS', sys.argv[1:])\nsys.exit(3 if '--quick' in sys.argv "
                    "else 0)\n")
    monkeypatch.setattr(cli, "bench_runner", lambda: str(fake))
    assert cli.main(["bench", "--kernels", "int8,kd", "--json", "r.json"]) == 0
    assert "ARGS ['--kernels', 'int8,kd', '--json', 'r.json']" in capfd.readouterr().out
    assert cli.main(["bench", "--quick"]) == 3
    assert cli.main(["bench", "--kernels", "sparse", "--runs", "3"]) == 0
    assert "ARGS ['--kernels', 'sparse', '--runs', '3']" in capfd.readouterr().out


def test_bench_unknown_kernel_fails(capsys):
    assert cli.main(["bench", "--kernels", "no_such_kernel", "--quick"]) != 0


def test_data_file_formats(tmp_path):
    import numpy as np
    from safetensors.torch import save_file

    x, y = torch.randn(5, 3), torch.arange(5)
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=y.numpy())
    np.save(tmp_path / "d.npy", x.numpy())
    save_file({"inputs": x, "labels": y}, str(tmp_path / "d.safetensors"))
    torch.save((x, y), tmp_path / "t.pt")
    for name, has_labels in (("d.npz", True), ("d.npy", False), ("d.safetensors", True),
                             ("t.pt", True)):
        gx, gy = cli.load_data_file(str(tmp_path / name))
        assert torch.equal(torch.as_tensor(gx), x), name
        assert (gy is not None) == has_labels and (gy is None or torch.equal(gy, y)), name
    (tmp_path / "bad.pt").write_bytes(b"not a tensor file")
    with pytest.raises(cli.CLIError, match="cannot read data"):
        cli.load_data_file(str(tmp_path / "bad.pt"))


def _export_option(flag):
    from pycompress.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return next(a for a in sub.choices["export"]._actions if flag in a.option_strings)


def test_export_int8_format_choices_are_the_exporters():
    """--int8-format offers every form export_onnx takes, and only those."""
    from pycompress.export.onnx import INT8_FORMATS

    assert sorted(_export_option("--int8-format").choices) == sorted(INT8_FORMATS)


def test_export_attention_choices_are_the_exporters():
    from pycompress.export.onnx import ATTENTION_FORMS

    opt = _export_option("--attention")
    assert sorted(opt.choices) == sorted(ATTENTION_FORMS) and opt.default == "fused"
