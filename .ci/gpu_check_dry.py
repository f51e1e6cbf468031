#!/usr/bin/env python3
"""make gpu-check-dry: the GPU check (.ci/gpu_check.py) walked on a CPU machine, so that it never
fails on the device for a reason that could be seen here.

1. budget   the step deadlines on a fake clock: the worst case the default budget allows adds up
            to at most 480 s, unused time moves on to the later steps, benchmark slices share
            what is left, a budget that does not add up is refused
2. dry run  the real check with --dry-run: the CUDA tests are collected (pytest --collect-only
            -m cuda) and every op registered for CUDA in csrc/ has some, each benchmark family's
            entry points import, every result file is written
3. build cut off   a build that outlives its cap (a 120 s sleep against a 3 s cap) is killed and
            reported as cut off; the tests and benchmarks still report ("not run"), in time
4. tests and benches cut off   a made-up CUDA test suite run for real: a failure does not stop
            the run (no -x), a slow test fails at its per-test timeout, a test that ignores it is
            killed as hung and the rest resume in a new process, as after a CUDA error that
            leaves the context unusable and after a crash; the tests step stops at its deadline
            and what did not run is counted; a benchmark that outlives its slice is cut off and
            the next one still runs; all within the budget

Results go to a temporary folder, removed when everything passed (kept and named otherwise).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from xml.etree import ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import gpu_check  # noqa: E402

PY = sys.executable
failures: list[str] = []


def check(cond: bool, what: str) -> None:
    print(f"  {'ok  ' if cond else 'FAIL'} {what}", flush=True)
    if not cond:
        failures.append(what)


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def check_budget() -> None:
    print("== 1. budget logic (fake clock)", flush=True)
    b = gpu_check.Budget()
    check(b.worst_case() <= 480, f"default worst case {b.formula()} <= 480 s")
    check(b.caps["build"] >= 120 and b.caps["tests"] >= 120, "build and tests caps of at least 2 minutes each")
    try:
        gpu_check.Budget(total=480, build_cap=400)
        check(False, "a budget that does not add up is refused")
    except ValueError:
        check(True, "a budget that does not add up is refused")

    c = FakeClock()
    b = gpu_check.Budget(clock=c)
    t0 = c.t
    # worst case: every step runs to its deadline
    env_end = b.deadline("env")
    check(env_end - t0 == 20, "env: 20 s")
    c.t = env_end
    build_end = b.deadline("build")
    check(build_end - c.t == 210, "build after a slow env: 210 s")
    c.t = build_end
    tests_end = b.deadline("tests")
    check(tests_end - c.t == 150, "tests after a build that used its cap: 150 s")
    c.t = tests_end
    bench_end = b.deadline("benches")
    check(bench_end - c.t == 80, "benches in the worst case: 80 s")
    check(bench_end + b.margin - t0 == 480, "worst case end, margin included: 480 s")

    # typical case: time not used by env and build moves on to the tests
    c = FakeClock()
    b = gpu_check.Budget(clock=c)
    c.t += 3
    c.t += 90  # a 90 s build
    check(b.deadline("tests") - c.t == 460 - 93 - 80, "tests get what env and build left (287 s)")
    c.t += 60  # tests done in 60 s
    left = b.end - c.t
    check(abs(b.bench_slice(5) - left / 5) < 1e-9, "first of 5 benchmark families: a fifth of what is left")
    c.t += 2
    check(abs(b.bench_slice(4) - (left - 2) / 4) < 1e-9, "a quick family leaves its time to the next ones")
    c.t = b.end + 30
    check(b.bench_slice(1) == 0 and b.deadline("benches") == c.t, "past the end: no time")
    check(gpu_check.arch_for((9, 0)) == "9.0a" and gpu_check.arch_for((8, 6)) == "8.6"
          and gpu_check.arch_for((10, 0)) == "10.0a", "architecture from the compute capability")


def run_check(out: str, *args: str, timeout: float = 300) -> tuple[int, float, str]:
    t = time.monotonic()
    p = subprocess.run([PY, os.path.join(HERE, "gpu_check.py"), "--out", out, *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
    secs = time.monotonic() - t
    with open(os.path.join(os.path.dirname(out), os.path.basename(out) + ".stdout"), "w") as f:
        f.write(p.stdout + p.stderr)
    return p.returncode, secs, p.stdout + p.stderr


def load(out: str) -> dict:
    with open(os.path.join(out, "report.json")) as f:
        return json.load(f)


def check_dry_run(tmp: str) -> None:
    print("== 2. dry run of the check (tests collected, bench entry points imported)", flush=True)
    out = os.path.join(tmp, "dry")
    rc, secs, text = run_check(out, "--dry-run")
    check(rc == 0, f"exit status 0 (got {rc}; output in {out}.stdout)")
    for name in ("env.txt", "build.log", "tests.log", "junit.xml", "report.md", "report.json", "bench.log"):
        check(os.path.exists(os.path.join(out, name)), f"{name} written")
    if not os.path.exists(os.path.join(out, "report.json")):
        return
    r = load(out)
    check(r["budget"]["worst_case_s"] <= 480, f"budget accounting: {r['budget']['formula']}")
    with open(os.path.join(out, "env.txt")) as f:
        env = f.read()
    check("worst case allowed" in env and "build architecture:" in env, "env.txt holds the budget and the arch")
    check("worst case" in text, "budget accounting printed")
    n = r["tests"]["collected"]
    check(n > 100, f"pytest --collect-only -m cuda collected the CUDA tests ({n})")
    check(not r["tests"]["collect_errors"], "no collection errors")
    ops = {row["name"]: row for row in r["ops"]}
    sources = gpu_check.cuda_coverage.registered_cuda_ops(ROOT)
    check(set(sources) <= set(ops), f"every op registered for CUDA in csrc/ has a row ({len(sources)})")
    bad = [k for k, row in ops.items() if row["status"] != "COLLECTED" or row["tests"] == 0]
    check(not bad, "every op and module path has collected CUDA tests" + (f" (not: {bad})" if bad else ""))
    families = {b["family"]: b["status"] for b in r["benches"]}
    check(set(families) == set(gpu_check.BENCHES) and all(s == "ok" for s in families.values()),
          f"bench entry points imported: {families}")
    check(r["steps"]["build"]["status"] == "dry", "the build step is walked (not built)")
    check(r["elapsed_s"] <= 480, f"within the budget ({r['elapsed_s']:.0f} s)")


def check_build_cut_off(tmp: str) -> None:
    print("== 3. a build that outlives its cap", flush=True)
    out = os.path.join(tmp, "build-cut")
    budget = ["--budget", "50", "--margin", "5", "--env-cap", "12", "--build-cap", "3", "--tests-cap", "20",
              "--bench-min", "10"]
    slow = f"{PY} -c 'import time; time.sleep(120)'"
    rc, secs, text = run_check(out, "--dry-run", *budget, "--build-cmd", slow, "--tests", "tests/test_cuda_ops.py")
    check(rc != 0, "non-zero exit status")
    check("BUILD CUT OFF" in text, "BUILD CUT OFF printed")
    if not os.path.exists(os.path.join(out, "report.json")):
        check(False, "report.json written")
        return
    r = load(out)
    s = r["steps"]
    check(s["build"]["status"] == "CUT OFF" and s["build"]["used_s"] < 10,
          f"build cut off at its cap ({s['build']['used_s']} s used of 3)")
    check(s["tests"]["status"] == "not run" and s["benches"]["status"] == "not run", "tests and benches report 'not run'")
    check(r["ops"] and all(row["status"] in ("NOT RUN", "NO TEST") for row in r["ops"]), "per-op table: NOT RUN")
    check(any(row["tests"] for row in r["ops"]), "the table still counts the tests that did not run")
    check(secs <= 50, f"whole run within its 50 s budget ({secs:.0f} s)")
    with open(os.path.join(out, "build.log")) as f:
        check("killed after" in f.read(), "build.log says the build was killed")


FAKE_TESTS = '''
import os
import signal
import time

import pytest

pytestmark = pytest.mark.cuda


def test_a_pass():
    assert "int8_gemm"


def test_b_fail():
    assert "int8_linear" == "something else"


def test_c_slow():
    time.sleep(30)  # stopped by the per-test timeout


def test_d_hang():
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])  # ignores the per-test timeout
    time.sleep(30)


def test_e_after_hang():
    pass


def test_f_context():
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_g_after_context():
    pass


def test_h_crash():
    os._exit(3)


def test_i_after_crash():
    pass


@pytest.mark.parametrize("i", range(80))
def test_j_sleepy(i):
    time.sleep(1)
'''

FAKE_UNMARKED = '''
def test_not_cuda():
    raise AssertionError("selected without the cuda marker")
'''


def check_tests_cut_off(tmp: str) -> None:
    print("== 4. tests and benchmarks cut off (a made-up CUDA suite, run for real)", flush=True)
    fake = os.path.join(tmp, "fake")
    os.makedirs(fake)
    with open(os.path.join(fake, "pytest.ini"), "w") as f:
        f.write("[pytest]\nmarkers =\n    cuda: needs a GPU\n")
    with open(os.path.join(fake, "test_fake.py"), "w") as f:
        f.write(textwrap.dedent(FAKE_TESTS))
    with open(os.path.join(fake, "test_unmarked.py"), "w") as f:
        f.write(textwrap.dedent(FAKE_UNMARKED))
    out = os.path.join(tmp, "tests-cut")
    budget = ["--budget", "94", "--margin", "5", "--env-cap", "15", "--build-cap", "15", "--tests-cap", "35",
              "--bench-min", "24", "--per-test-timeout", "2", "--hang-grace", "2"]
    bench = f"{PY} -c 'import sys, time; time.sleep(60 if sys.argv[1] == \"slow\" else 0)' {{family}}"
    rc, secs, text = run_check(out, "--dry-run", "--run-tests", *budget, "--build-cmd", f"{PY} -c pass",
                               "--tests", fake, f"--pytest-arg=--rootdir={fake}", "--pytest-arg=-c",
                               f"--pytest-arg={os.path.join(fake, 'pytest.ini')}",
                               "--benches", "slow,fast", "--bench-cmd", bench)
    check(rc != 0, "non-zero exit status (failures)")
    if not os.path.exists(os.path.join(out, "report.json")):
        check(False, "report.json written")
        return
    r = load(out)
    outcome = {}
    for f in r["failures"]:
        outcome[f["nodeid"].split("::")[-1]] = f["outcome"]
    with open(os.path.join(out, "junit.xml")) as f:
        junit = ET.parse(f).getroot()
    cases = {tc.get("name"): tc for tc in junit.iter("testcase")}

    def passed(name):
        tc = cases.get(name)
        return tc is not None and not list(tc)

    check(passed("test_a_pass"), "a passing test passes")
    check(outcome.get("test_b_fail") == "failed", "a failing test fails ...")
    check(outcome.get("test_c_slow") == "timeout", "... and the run goes on (no -x): a slow test fails at its per-test timeout")
    check(outcome.get("test_d_hang") == "hung", "a test that ignores the timeout is killed as hung")
    check(passed("test_e_after_hang"), "the tests after a hung one run in a new process")
    check(outcome.get("test_f_context") == "failed" and any("test_f_context" in n for n in r["tests"]["context_lost_after"]),
          "a CUDA error that leaves the context unusable stops that process ...")
    check(passed("test_g_after_context"), "... and the rest resume in a new one")
    check(outcome.get("test_h_crash") == "crashed", "a test whose process dies is reported as crashed")
    check(passed("test_i_after_crash"), "the tests after a crash still run")
    check("test_not_cuda" not in cases and r["tests"]["collected"] == 89, "only tests marked cuda are selected")
    o = r["tests"]["outcomes"]
    check(o.get("passed", 0) >= 5 and o.get("not run", 0) + o.get("cut off", 0) >= 1,
          f"the tests step stops at its deadline and counts what did not run ({o})")
    check(r["steps"]["tests"]["status"] == "FAILED", "tests step: FAILED")
    check(sum(1 for tc in cases.values() if tc.find("skipped") is not None) >= 1, "junit.xml lists what did not run")
    ops = {row["name"]: row for row in r["ops"]}
    check(ops.get("int8_gemm", {}).get("status") == "PASS" and ops.get("int8_linear", {}).get("status") == "FAIL",
          "per-op table from the tests that name each op")
    benches = {b["family"]: b for b in r["benches"]}
    check(benches.get("slow", {}).get("status") == "CUT OFF", "a benchmark that outlives its slice is cut off ...")
    check(benches.get("fast", {}).get("status") == "ok", "... and the next one still runs")
    check(benches.get("slow", {}).get("used_s", 99) <= benches.get("slow", {}).get("slice_s", 0) + 5,
          "the slow benchmark stopped at its slice")
    check(secs <= 94, f"whole run within its 94 s budget ({secs:.0f} s)")


def main() -> int:
    tmp = tempfile.mkdtemp(prefix="gpu-check-dry-")
    t = time.monotonic()
    check_budget()
    check_dry_run(tmp)
    check_build_cut_off(tmp)
    check_tests_cut_off(tmp)
    if failures:
        print(f"gpu-check-dry: {len(failures)} check(s) FAILED (outputs kept in {tmp}):")
        for f in failures:
            print(f"  - {f}")
        return 1
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"gpu-check-dry: all checks passed ({time.monotonic() - t:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
