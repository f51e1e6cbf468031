"""bench/run.py mechanics: combining repeated runs, and the --runs option end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import run as bench_run  # noqa: E402
from common import per_core_ms, run_ratio_range  # noqa: E402


def _row(case, impl, ms, ms_min=None, **extra):
    return {"kernel": "k", "case": case, "impl": impl, "ms": ms, "ms_min": ms if ms_min is None else ms_min,
            **extra}


def test_combine_runs_keeps_the_median_run_row():
    runs = [[_row("a", "x", 3.0, tag=0), _row("a", "y", 10.0)],
            [_row("a", "x", 1.0, 0.5, tag=1), _row("a", "y", 12.0)],
            [_row("a", "x", 2.0, tag=2), _row("a", "y", 11.0), _row("b", "x", 7.0)]]
    rows = bench_run.combine_runs(runs)
    assert [(r["case"], r["impl"]) for r in rows] == [("a", "x"), ("a", "y"), ("b", "x")]
    x, y, b = rows
    assert x["ms"] == 2.0 and x["tag"] == 2 and x["ms_runs"] == [3.0, 1.0, 2.0] and x["ms_min"] == 0.5
    assert y["ms"] == 11.0 and y["ms_runs"] == [10.0, 12.0, 11.0]
    assert b["ms"] == 7.0 and b["ms_runs"] == [7.0]
    # two runs: the lower median (the faster run's row)
    two = bench_run.combine_runs(runs[:2])
    assert two[0]["ms"] == 1.0 and two[0]["tag"] == 1


def test_run_ratio_range():
    base = {"ms": 2.0, "ms_runs": [2.0, 4.0, 3.0]}
    ours = {"ms": 1.0, "ms_runs": [1.0, 1.0, 2.0]}
    assert run_ratio_range(base, ours) == " (runs: 1.5-4.0x)"
    assert run_ratio_range(base, {"ms": 1.0}) == ""
    assert run_ratio_range({"ms": 1.0, "ms_runs": [1.0]}, {"ms": 1.0, "ms_runs": [1.0]}) == ""


def test_per_core_ms_counts_the_calling_thread_only():
    import threading
    import time

    import torch

    threads = torch.get_num_threads()
    stop = threading.Event()

    def burn():  # CPU time in another thread while the timed call sleeps
        n = 0
        while not stop.is_set():
            n += 1

    bg = threading.Thread(target=burn)
    bg.start()
    a = torch.randn(64, 64)
    try:
        out = per_core_ms([("sleep", lambda: time.sleep(0.02)), ("work", lambda: torch.mm(a, a))], 3)
    finally:
        stop.set()
        bg.join()
    assert set(out) == {"sleep", "work"}
    assert out["sleep"] < 5.0  # 20 ms asleep: next to no CPU time of this thread
    assert 0.0 < out["work"] < 1e3
    assert torch.get_num_threads() == threads


def test_runs_option_end_to_end(tmp_path):
    out = tmp_path / "r.json"
    cmd = [sys.executable, os.path.join(BENCH, "run.py"), "--kernels", "sparse", "--quick", "--device", "cpu",
           "--runs", "2", "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    assert data["meta"]["runs"] == 2
    rows = data["kernels"]["sparse"]
    assert rows and all(len(r["ms_runs"]) == 2 and r["ms"] in r["ms_runs"] for r in rows)
    assert "(runs: " in res.stdout


def test_omp_wait_policy_option_restarts_with_the_variable_set(tmp_path):
    out = tmp_path / "r.json"
    env = {k: v for k, v in os.environ.items() if k not in bench_run.THREADING_ENV}
    env["OMP_NUM_THREADS"] = "2"
    cmd = [sys.executable, os.path.join(BENCH, "run.py"), "--kernels", "quant", "--quick", "--device", "cpu",
           "--omp-wait-policy", "active", "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    expected = {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "2"}
    assert data["meta"]["threading_env"] == expected
    assert data["kernel_env"]["quant"] == expected
    assert "OMP_WAIT_POLICY=ACTIVE" in res.stdout.splitlines()[0]
    # a second kernel measured with default settings keeps the first one's record
    del env["OMP_NUM_THREADS"]
    cmd = [sys.executable, os.path.join(BENCH, "run.py"), "--kernels", "semi24", "--quick", "--device", "cpu",
           "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    assert data["kernel_env"] == {"quant": expected, "semi24": {}}
    assert "default OpenMP settings" in res.stdout.splitlines()[0]


def test_a_failing_benchmark_keeps_the_others_results(tmp_path, monkeypatch, capsys):
    import types

    ok = types.ModuleType("bench_fakeok")
    ok.run = lambda device, quick: [{"kernel": "fakeok", "case": "c", "impl": "i", "ms": 1.5}]
    boom = types.ModuleType("bench_fakeboom")

    def explode(device, quick):
        raise RuntimeError("the fake benchmark broke")

    boom.run = explode
    monkeypatch.setitem(sys.modules, "bench_fakeok", ok)
    monkeypatch.setitem(sys.modules, "bench_fakeboom", boom)
    monkeypatch.setattr(bench_run, "available_kernels", lambda: ["fakeboom", "fakeok"])
    out = tmp_path / "r.json"
    rc = bench_run.main(["--kernels", "fakeboom,fakeok", "--device", "cpu", "--json", str(out)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "fakeboom" in err and "the fake benchmark broke" in err
    data = json.loads(out.read_text())
    assert list(data["kernels"]) == ["fakeok"] and data["kernels"]["fakeok"][0]["ms"] == 1.5
    assert data["meta"]["cpu_id"]
    # only failures: nothing written, an error
    out2 = tmp_path / "none.json"
    assert bench_run.main(["--kernels", "fakeboom", "--device", "cpu", "--json", str(out2)]) == 1
    assert not out2.exists()
    # results of another CPU in the file are not merged with this one's
    data["meta"]["cpu_id"] = "SomeVendor family 1 model 2 stepping 3"
    data["kernels"]["other"] = [{"kernel": "other", "case": "c", "impl": "i", "ms": 9.0}]
    out.write_text(json.dumps(data))
    assert bench_run.main(["--kernels", "fakeok", "--device", "cpu", "--json", str(out)]) == 0
    assert list(json.loads(out.read_text())["kernels"]) == ["fakeok"]
    assert "another machine" in capsys.readouterr().err


def test_omp_wait_policy_option_rejects_unknown_values():
    res = subprocess.run([sys.executable, os.path.join(BENCH, "run.py"), "--omp-wait-policy", "spin"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "invalid choice" in res.stderr


def test_runs_option_rejects_zero():
    res = subprocess.run([sys.executable, os.path.join(BENCH, "run.py"), "--runs", "0"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "--runs must be >= 1" in res.stderr


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))
