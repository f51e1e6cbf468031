#!/usr/bin/env python3
"""GPU check: one call on a CUDA machine that builds, tests every CUDA op and benchmarks, within
a time budget it enforces itself, writing what it has finished to --out as it goes.

    python3 .ci/gpu_check.py --out DIR            (make gpu-check; OUT=DIR)
    python3 .ci/gpu_check.py --dry-run --out DIR  (make gpu-check-dry, through .ci/gpu_check_dry.py)

Steps, each with its own deadline (see Budget):

1. env      nvidia-smi, torch and the GPU's compute capability -> env.txt
2. build    the extension with its CUDA kernels for the one architecture present (e.g. 9.0a on
            Hopper), MAX_JOBS = --jobs (all cores) -> build.log; a build still running at its cap
            is killed and reported as cut off
3. tests    pytest -m cuda over tests/ without -x: every test runs, each under a per-test
            timeout (.ci/gpu_check_plugin.py); a hung or crashed test, or a CUDA error that
            leaves the context unusable, ends that pytest process and the remaining tests go on
            in a fresh one -> tests.log, junit.xml, and the per-op pass/fail table
4. benches  bench/run.py --quick per benchmark family (peers included where installed), each
            with its own slice of the time left: remaining / families left -> bench.json,
            bench.log

Files in --out (8 at most: what a device call brings back): env.txt, build.log, tests.log,
junit.xml, report.md, report.json (budget accounting, steps, per-op table, failures), bench.json,
bench.log. report.md/report.json are rewritten after every step and every few seconds during the
tests, so a run cut off from outside still leaves what it finished.

--dry-run walks the same steps without CUDA: the build command is not run (the already built
CPU extension is inspected), the tests are only collected (pytest --collect-only -m cuda), and
each benchmark family's entry points are imported (bench/run.py --check). The options for
another budget, build command, test paths or bench command let .ci/gpu_check_dry.py prove the
cut-offs on the CPU.

Standard library only: nothing is imported from torch in this process, so a hung CUDA call in a
child can never stop the clock.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from xml.etree import ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CI = os.path.join(ROOT, ".ci")
sys.path.insert(0, os.path.join(ROOT, "tests"))

import cuda_coverage  # noqa: E402

# Benchmark families with CUDA kernels, the quick ones first: each gets an equal share of the time
# left, so what a quick one does not use goes to the slower ones after it (kd compiles a peer).
BENCHES = ("quant", "sparse", "semi24", "int8", "kd")
OUT_FILES = ("env.txt", "build.log", "tests.log", "junit.xml", "report.md", "report.json",
             "bench.json", "bench.log")

# Default budget (seconds). The device call allows 600 s; this check keeps to 480 s in all.
TOTAL, MARGIN = 480, 20
ENV_CAP, BUILD_CAP, TESTS_CAP, BENCH_MIN = 20, 210, 150, 80
PER_TEST_TIMEOUT, HANG_GRACE = 60, 10
MIN_BENCH_SLICE = 10

FAILING = ("failed", "error", "timeout", "hung", "crashed")


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- budget
class Budget:
    """Deadlines of the steps inside one total budget.

    env and build have hard caps. The tests are guaranteed ``tests_cap`` and also get whatever
    env and build left unused, up to the time reserved for the benchmarks (``bench_min``). The
    benchmarks get the rest, up to ``total - margin``; ``margin`` is kept for stopping processes
    and writing the report. Worst case: env_cap + build_cap + tests_cap + bench_min + margin,
    which must not exceed ``total``.
    """

    def __init__(self, total=TOTAL, margin=MARGIN, env_cap=ENV_CAP, build_cap=BUILD_CAP,
                 tests_cap=TESTS_CAP, bench_min=BENCH_MIN, clock=time.monotonic):
        self.total, self.margin = float(total), float(margin)
        self.caps = {"env": float(env_cap), "build": float(build_cap), "tests": float(tests_cap),
                     "benches": float(bench_min)}
        if min(list(self.caps.values()) + [self.total, self.margin]) < 0:
            raise ValueError("budget values must be >= 0")
        if self.worst_case() > self.total + 1e-9:
            raise ValueError(f"budget does not add up: worst case {self.worst_case():g} s > total "
                             f"{self.total:g} s ({self.formula()})")
        self.clock = clock
        self.t0 = clock()

    def worst_case(self) -> float:
        return sum(self.caps.values()) + self.margin

    def formula(self) -> str:
        c = self.caps
        return (f"env {c['env']:g} + build {c['build']:g} + tests {c['tests']:g} + benches "
                f"{c['benches']:g} + margin {self.margin:g} = {self.worst_case():g} s")

    @property
    def end(self) -> float:
        """When the last step must have stopped (the margin follows)."""
        return self.t0 + self.total - self.margin

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def deadline(self, step: str) -> float:
        now, c = self.clock(), self.caps
        if step == "env":
            return min(now + c["env"], self.end - c["build"] - c["tests"] - c["benches"])
        if step == "build":
            return min(now + c["build"], self.end - c["tests"] - c["benches"])
        if step == "tests":
            return max(now, self.end - c["benches"])
        if step == "benches":
            return max(now, self.end)
        raise ValueError(step)

    def bench_slice(self, families_left: int) -> float:
        """Seconds for the next benchmark family: an equal share of what is left."""
        return max(0.0, self.end - self.clock()) / max(1, families_left)

    def plan_lines(self) -> list[str]:
        c = self.caps
        return [
            f"budget: {self.total:g} s in all, enforced by this script",
            f"  env      at most {c['env']:g} s",
            f"  build    at most {c['build']:g} s (a build still running then is killed: BUILD CUT OFF)",
            f"  tests    at least {c['tests']:g} s, plus what env and build left unused; "
            f"per-test timeout applies",
            f"  benches  at least {c['benches']:g} s, up to the end; each family gets "
            f"remaining / families left",
            f"  margin   {self.margin:g} s (stopping processes, final report)",
            f"  worst case allowed: {self.formula()} <= {self.total:g} s",
        ]

    def plan(self) -> dict:
        return {"total_s": self.total, "margin_s": self.margin,
                "caps_s": dict(self.caps), "worst_case_s": self.worst_case(),
                "formula": self.formula()}


# ----------------------------------------------------------------------------- processes
def kill_group(proc: subprocess.Popen) -> None:
    """Stops a child started in its own session, with everything it started."""
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_proc(cmd, *, deadline: float, log: str, env=None, watch=None, clock=time.monotonic,
             header: str = "") -> tuple[int | None, str, float]:
    """Runs ``cmd`` (output appended to ``log``) until it ends or ``deadline``.

    ``watch()`` is called about twice a second; when it returns a reason, the process is killed.
    Returns ``(returncode or None when killed, reason: "exit" | "deadline" | reason, seconds)``.
    """
    t = clock()
    with open(log, "a", encoding="utf-8") as f:
        if header:
            f.write(header.rstrip("\n") + "\n")
        f.write("$ " + " ".join(shlex.quote(str(c)) for c in cmd) + "\n")
        f.flush()
        if clock() >= deadline:
            f.write("[gpu-check] not started: no time left\n")
            return None, "deadline", 0.0
        try:
            proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env, stdout=f,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        except OSError as e:
            f.write(f"[gpu-check] could not start: {e}\n")
            return 127, "exit", 0.0
        reason = "exit"
        while True:
            try:
                proc.wait(timeout=max(0.05, min(0.5, deadline - clock())))
                break
            except subprocess.TimeoutExpired:
                pass
            if clock() >= deadline:
                reason = "deadline"
            elif watch is not None:
                reason = watch() or "exit"
            if reason != "exit":
                kill_group(proc)
                f.write(f"\n[gpu-check] killed after {clock() - t:.1f} s: {reason}\n")
                break
        if reason == "exit":
            f.write(f"[gpu-check] exit status {proc.returncode} after {clock() - t:.1f} s\n")
        return (proc.returncode if reason == "exit" else None), reason, clock() - t


def capture(cmd, timeout: float, env=None) -> tuple[int | None, str]:
    """Output of a short command, or (None, why) when it fails to start or times out."""
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=max(1.0, timeout), stdin=subprocess.DEVNULL,
                           start_new_session=True)
        return p.returncode, (p.stdout + p.stderr).strip()
    except FileNotFoundError:
        return None, f"{cmd[0]}: not found"
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"


def child_env(**extra) -> dict:
    env = dict(os.environ)
    paths = [ROOT, CI] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def arch_for(capability) -> str:
    """TORCH_CUDA_ARCH_LIST entry for a compute capability: the arch-specific variant ('a',
    e.g. 9.0a for Hopper's wgmma/TMA) from 9.0 on, the plain one before."""
    major, minor = int(capability[0]), int(capability[1])
    return f"{major}.{minor}a" if major >= 9 else f"{major}.{minor}"


# ----------------------------------------------------------------------------- test results
class TestState:
    """Per-test outcomes, fed from the plugin's event lines."""

    def __init__(self):
        self.collected: list[str] | None = None
        self.rootdir: str | None = None
        self.results: dict[str, dict] = {}
        self.started: dict[str, float] = {}
        self.finished: set[str] = set()
        self.collect_errors: list[dict] = []
        self.context_lost: list[str] = []
        self._pos = 0

    def start_file(self) -> None:
        """The next read() starts at the beginning of a new events file."""
        self._pos = 0

    def read(self, path: str) -> int:
        """Reads the events appended since the last call; returns how many."""
        if not os.path.exists(path):
            return 0
        n = 0
        with open(path, encoding="utf-8") as f:
            f.seek(self._pos)
            while True:
                line = f.readline()
                if not line or not line.endswith("\n"):
                    break
                self._pos = f.tell()
                try:
                    self.feed(json.loads(line))
                    n += 1
                except ValueError:
                    continue
        return n

    def feed(self, ev: dict) -> None:
        kind = ev.get("event")
        if kind == "collected":
            if self.collected is None:
                self.collected = list(ev["nodeids"])
                self.rootdir = ev.get("rootdir")
        elif kind == "collect_error":
            self.collect_errors.append({"nodeid": ev.get("nodeid"), "message": ev.get("message", "")})
        elif kind == "start":
            self.started[ev["nodeid"]] = ev["t"]
        elif kind == "report":
            r = self.results.setdefault(ev["nodeid"], {"outcome": "passed", "duration": 0.0, "message": ""})
            r["duration"] = round(r["duration"] + float(ev.get("duration", 0)), 4)
            outcome, when = ev.get("outcome"), ev.get("when")
            if outcome == "failed":
                msg = ev.get("message", "")
                if "per-test timeout" in msg:
                    new = "timeout"
                else:
                    new = "failed" if when == "call" else "error"
                if r["outcome"] not in FAILING:
                    r["outcome"], r["message"] = new, msg
            elif outcome == "skipped" and r["outcome"] == "passed":
                r["outcome"], r["message"] = "skipped", ev.get("message", "")
        elif kind == "finish":
            self.finished.add(ev["nodeid"])
            self.started.pop(ev["nodeid"], None)
        elif kind == "context_lost":
            self.context_lost.append(ev["nodeid"])

    def in_flight(self) -> tuple[str, float] | None:
        live = [(n, t) for n, t in self.started.items() if n not in self.finished]
        return max(live, key=lambda x: x[1]) if live else None

    def mark(self, nodeid: str, outcome: str, message: str) -> None:
        self.results[nodeid] = {"outcome": outcome, "duration": 0.0, "message": message}
        self.finished.add(nodeid)
        self.started.pop(nodeid, None)

    def outcome(self, nodeid: str, dry: bool) -> str:
        if nodeid in self.results and (nodeid in self.finished or self.results[nodeid]["outcome"] in FAILING):
            return self.results[nodeid]["outcome"]
        return "collected" if dry else "not run"

    def done(self) -> set[str]:
        return set(self.finished)


def op_table(state: TestState, ops: dict[str, dict], dry: bool, groups: dict[str, list[str]]
             ) -> tuple[list[dict], list[str]]:
    """Rows per CUDA op and module path (``groups``: the tests that count for each), and the
    collected tests that count for none of them. ``dry``: the tests were collected, not run."""
    nodeids = state.collected or []
    counted = set()
    rows = []
    for key, ids in groups.items():
        counted.update(ids)
        counts: dict[str, int] = {}
        for n in ids:
            o = state.outcome(n, dry)
            counts[o] = counts.get(o, 0) + 1
        failing = sum(counts.get(o, 0) for o in FAILING)
        passed, not_run = counts.get("passed", 0), counts.get("not run", 0) + counts.get("cut off", 0)
        if not ids:
            status = "NO TEST"
        elif failing:
            status = "FAIL"
        elif dry:
            status = "COLLECTED" if counts.get("collected") else "NOT RUN"
        elif passed and not_run:
            status = "PARTIAL"
        elif passed:
            status = "PASS"
        elif counts.get("skipped") and not not_run:
            status = "SKIPPED"
        else:
            status = "NOT RUN"
        info = ops.get(key, {"kind": "module path"})
        rows.append({"name": key, "kind": info.get("kind", "op"), "source": info.get("source", ""),
                     "kernel_in_build": info.get("kernel_in_build"), "tests": len(ids),
                     "passed": passed, "failed": failing, "skipped": counts.get("skipped", 0),
                     "not_run": not_run + counts.get("collected", 0), "status": status})
    return rows, [n for n in nodeids if n not in counted]


# ----------------------------------------------------------------------------- the check
class Check:
    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run
        self.out = os.path.abspath(args.out)
        os.makedirs(self.out, exist_ok=True)
        for name in OUT_FILES:
            p = os.path.join(self.out, name)
            if os.path.exists(p):
                os.remove(p)
        self.work = tempfile.mkdtemp(prefix="gpu-check-")
        self.budget = Budget(args.budget, args.margin, args.env_cap, args.build_cap, args.tests_cap,
                             args.bench_min)
        self.py = sys.executable
        self.steps: dict[str, dict] = {}
        self.env: dict = {}
        self.ext: dict = {}
        self.state = TestState()
        self._groups: tuple | None = None
        self.build_ok = False
        self.source_ops = cuda_coverage.registered_cuda_ops(ROOT)
        self.benches: list[dict] = []
        self.started = now_iso()

    # ------------------------------------------------------------------ output
    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def say(self, msg: str) -> None:
        print(f"[gpu-check {self.budget.elapsed():5.0f}s] {msg}", flush=True)

    def begin(self, step: str) -> float:
        deadline = self.budget.deadline(step)
        now = self.budget.clock()
        self.steps[step] = {"allowed_s": round(deadline - now, 1), "started_at_s": round(now - self.budget.t0, 1),
                            "used_s": None, "status": "running", "note": ""}
        self.say(f"== {step} (allowed {deadline - now:.0f} s)")
        self.write_report()
        return deadline

    def end(self, step: str, status: str, note: str = "") -> None:
        s = self.steps[step]
        s["used_s"] = round(self.budget.clock() - self.budget.t0 - s["started_at_s"], 1)
        s["status"], s["note"] = status, note
        self.say(f"{step}: {status}{' - ' + note if note else ''} ({s['used_s']:.0f} s)")
        self.write_report()

    def ops(self) -> dict[str, dict]:
        ops = {op: {"kind": "op", "source": src, "kernel_in_build": None}
               for op, src in self.source_ops.items()}
        if self.ext.get("with_cuda") and self.ext.get("cuda_ops") is not None:
            built = set(self.ext["cuda_ops"])
            for op in ops:
                ops[op]["kernel_in_build"] = op in built
            for op in sorted(built - set(ops)):
                ops[op] = {"kind": "op", "source": "(build only)", "kernel_in_build": True}
        return ops

    def collect_only(self) -> bool:
        """The tests are collected, not run (dry run), once the (walked) build step passed."""
        return self.dry and not self.args.run_tests and self.build_ok

    def groups(self, ops: dict) -> dict[str, list[str]]:
        key = (self.state.rootdir, len(self.state.collected or []), tuple(ops))
        if self._groups is None or self._groups[0] != key:
            sources = cuda_coverage.SourceIndex(self.state.rootdir or ROOT)
            self._groups = (key, cuda_coverage.attribute(self.state.collected or [], list(ops), sources=sources))
        return self._groups[1]

    def report(self) -> dict:
        ops = self.ops()
        dry_collect = self.collect_only()
        rows, unattributed = op_table(self.state, ops, dry_collect, self.groups(ops))
        tests = {}
        for n in self.state.collected or []:
            o = self.state.outcome(n, dry_collect)
            tests[o] = tests.get(o, 0) + 1
        failures = [{"nodeid": n, "outcome": r["outcome"], "message": r["message"]}
                    for n, r in self.state.results.items() if r["outcome"] in FAILING]
        skips: dict[str, int] = {}
        for r in self.state.results.values():
            if r["outcome"] == "skipped":
                why = first_line(r["message"]) or "(no reason given)"
                skips[why] = skips.get(why, 0) + 1
        return {
            "mode": "dry-run" if self.dry else "device", "started": self.started, "updated": now_iso(),
            "elapsed_s": round(self.budget.elapsed(), 1), "budget": self.budget.plan(),
            "steps": self.steps, "env": self.env, "extension": self.ext,
            "tests": {"collected": len(self.state.collected or []), "outcomes": tests,
                      "collect_errors": self.state.collect_errors,
                      "context_lost_after": self.state.context_lost, "unattributed": len(unattributed),
                      "skip_reasons": dict(sorted(skips.items(), key=lambda kv: -kv[1])[:10])},
            "ops": rows, "failures": failures, "benches": self.benches,
            "status": self.overall()[0],
        }

    def overall(self) -> tuple[str, list[str]]:
        problems = []
        for name, s in self.steps.items():
            if s["status"] not in ("ok", "dry"):
                problems.append(f"{name}: {s['status']}")
        for b in self.benches:
            if b["status"] != "ok":
                problems.append(f"bench {b['family']}: {b['status']}")
        return ("OK" if not problems else "PROBLEMS"), problems

    def write_report(self) -> None:
        data = self.report()
        write_atomic(self.path("report.json"), json.dumps(data, indent=1) + "\n")
        write_atomic(self.path("report.md"), render_md(data))

    # ------------------------------------------------------------------ steps
    def step_env(self) -> None:
        deadline = self.begin("env")
        lines = [f"gpu-check {'dry run' if self.dry else 'on the device'}, started {self.started}",
                 f"host: {platform.node()}  python: {sys.version.split()[0]} ({self.py})",
                 f"cpu: {cpu_model()}  cores: {os.cpu_count()}  build jobs: {self.args.jobs}"]
        rc, commit = capture(["git", "rev-parse", "--short", "HEAD"], 5)
        commit = commit if rc == 0 and commit else "unknown (no git metadata)"
        lines.append(f"commit: {commit}")
        left = lambda: deadline - self.budget.clock()  # noqa: E731
        rc_smi, smi = capture(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                               "--format=csv,noheader"], min(10, left()))
        smi = smi if rc_smi == 0 else f"unavailable ({first_line(smi) or 'no output'})"
        lines.append(f"nvidia-smi: {smi}")
        nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
        if nvcc:
            rc, v = capture([nvcc, "--version"], min(10, left()))
            lines.append(f"nvcc: {v.splitlines()[-1] if v else 'no output'}")
        else:
            lines.append("nvcc: not found")
        probe = ("import glob, json, os, site, torch\n"
                 "from torch.utils import cpp_extension\n"
                 "d = {'torch': torch.__version__, 'cuda': torch.version.cuda, 'available': torch.cuda.is_available()}\n"
                 "d['cuda_home'] = cpp_extension.CUDA_HOME\n"
                 "sps = site.getsitepackages() + [site.getusersitepackages()]\n"
                 "d['nvidia_include'] = sorted({p for sp in sps for p in glob.glob(os.path.join(sp, 'nvidia', '*', 'include'))})\n"
                 "if d['available']:\n"
                 "    p = torch.cuda.get_device_properties(0)\n"
                 "    d.update(name=p.name, capability=list(torch.cuda.get_device_capability(0)),\n"
                 "             sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))\n"
                 "print(json.dumps(d))\n")
        rc, out = capture([self.py, "-c", probe], max(1.0, left()), env=child_env())
        try:
            self.env = json.loads(out.strip().splitlines()[-1]) if rc == 0 else {"error": out[-500:]}
        except (ValueError, IndexError):
            self.env = {"error": out[-500:]}
        status = "ok"
        if "error" in self.env:
            status = "failed"
            lines.append(f"torch probe failed: {self.env['error']}")
        else:
            lines.append(f"torch {self.env['torch']} (CUDA {self.env.get('cuda')}), GPU visible: {self.env['available']}")
        if self.env.get("available"):
            cap = self.env["capability"]
            arch, why = arch_for(cap), f"compute capability {cap[0]}.{cap[1]}"
            lines.append(f"GPU: {self.env['name']}, {self.env['sms']} SMs, {self.env['memory_gib']} GiB")
        else:
            arch, why = "9.0a", "no GPU visible: Hopper assumed"
            if not self.dry:
                status = "no GPU"
        if self.args.arch:
            arch, why = self.args.arch, "--arch"
        elif os.environ.get("TORCH_CUDA_ARCH_LIST"):
            why += f"; TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} in the environment is not used"
        self.env.update(arch=arch, arch_reason=why, nvidia_smi=smi, commit=commit)
        lines.append(f"build architecture: {arch} ({why})")
        lines += [""] + self.budget.plan_lines()
        write_atomic(self.path("env.txt"), "\n".join(lines) + "\n")
        for line in lines:
            print("  " + line)
        self.end("env", "dry" if self.dry and status == "ok" else status)

    def step_build(self) -> bool:
        deadline = self.begin("build")
        log = self.path("build.log")
        arch = self.env.get("arch", "9.0a")
        env = child_env(PYCOMPRESS_CUDA="1", MAX_JOBS=self.args.jobs, TORCH_CUDA_ARCH_LIST=arch)
        cpath_note = ""
        extra = self.library_headers()
        if extra:
            env["CPATH"] = os.pathsep.join(extra + [p for p in env.get("CPATH", "").split(os.pathsep) if p])
            cpath_note = "\n# the toolkit lacks CUDA library headers torch includes; CPATH += " + ":".join(extra)
        if self.args.build_cmd:
            cmd = shlex.split(self.args.build_cmd)
        elif self.dry:
            cmd = [self.py, "-c", "print('dry run: the CUDA build is not run here')"]
        else:
            cmd = [self.py, "setup.py", "-q", "build_ext", "--inplace"]
        header = (f"# build: PYCOMPRESS_CUDA=1 MAX_JOBS={self.args.jobs} TORCH_CUDA_ARCH_LIST={arch}"
                  f"{'  (dry run: this command instead of setup.py)' if self.dry else ''}{cpath_note}")
        rc, reason, secs = run_proc(cmd, deadline=deadline, log=log, env=env, header=header)
        if reason == "deadline":
            cap = self.steps["build"]["allowed_s"]
            print(f"gpu-check: BUILD CUT OFF: still running at its cap of {cap:.0f} s (see build.log)", flush=True)
            self.end("build", "CUT OFF", f"still running at its cap of {cap:.0f} s; killed")
            return False
        if rc != 0:
            tail = read_tail(log, 40)
            print(tail, flush=True)
            print("gpu-check: BUILD FAILED", flush=True)
            self.end("build", "FAILED", f"exit status {rc}")
            return False
        self.ninja_times()
        check = (
            "import json, torch\n"
            "from pycompress import _ext\n"
            "names = sorted(n.split('::', 1)[1] for n in torch._C._dispatch_get_all_op_names()\n"
            "               if n.startswith('pycompress::'))\n"
            "cuda = [n for n in names if torch._C._dispatch_has_kernel_for_dispatch_key('pycompress::' + n, 'CUDA')]\n"
            "mod = getattr(_ext, '_C', None)\n"
            "print(json.dumps({'file': getattr(mod, '__file__', None), 'with_cuda': _ext.has_cuda_kernels(),\n"
            "                  'ops': names, 'cuda_ops': cuda}))\n")
        rc, out = capture([self.py, "-c", check], max(1.0, deadline - self.budget.clock()), env=child_env())
        with open(log, "a", encoding="utf-8") as f:
            f.write("# extension check\n" + out + "\n")
        try:
            self.ext = json.loads(out.strip().splitlines()[-1]) if rc == 0 else {"error": out[-800:]}
        except (ValueError, IndexError):
            self.ext = {"error": out[-800:]}
        if "error" in self.ext:
            self.end("build", "FAILED", "the built extension does not load (see build.log)")
            return False
        n_cuda = len(self.ext["cuda_ops"])
        if self.dry:
            self.end("build", "dry", f"not built; the CPU extension loads ({len(self.ext['ops'])} ops, "
                                     f"{n_cuda} with a CUDA kernel)")
            return True
        if not self.ext["with_cuda"] or not n_cuda:
            self.end("build", "FAILED", "the extension was built without its CUDA kernels")
            return False
        missing = sorted(set(self.source_ops) - set(self.ext["cuda_ops"]))
        if missing:
            self.end("build", "FAILED", "no CUDA kernel in the build for: " + ", ".join(missing))
            return True  # the tests still show what works
        self.end("build", "ok", f"{n_cuda} ops with a CUDA kernel, arch {self.env.get('arch')}")
        return True

    def library_headers(self) -> list[str]:
        """Include folders of pip's NVIDIA packages, when the CUDA toolkit lacks the headers of the
        CUDA libraries that torch's ATen/cuda headers include (a toolkit with nvcc alone)."""
        home = self.env.get("cuda_home")
        if not home:
            return []
        wanted = ("cublas_v2.h", "cublasLt.h", "cusparse.h", "cusolverDn.h")
        dirs = [os.path.join(home, "include"), os.path.join(home, "targets", "x86_64-linux", "include")]
        missing = [h for h in wanted if not any(os.path.exists(os.path.join(d, h)) for d in dirs)]
        if not missing:
            return []
        return [d for d in self.env.get("nvidia_include", [])
                if any(os.path.exists(os.path.join(d, h)) for h in missing)]

    def ninja_times(self) -> None:
        logs = glob.glob(os.path.join(ROOT, "build", "temp*", ".ninja_log"))
        if not logs:
            return
        rows = []
        with open(max(logs, key=os.path.getmtime), encoding="utf-8") as f:
            for line in f:
                p = line.rstrip("\n").split("\t")
                if len(p) >= 4 and p[0].isdigit():
                    rows.append(((int(p[1]) - int(p[0])) / 1000, os.path.basename(p[3])))
        rows.sort(reverse=True)
        with open(self.path("build.log"), "a", encoding="utf-8") as f:
            f.write("# slowest compile steps (ninja): " +
                    ", ".join(f"{n} {s:.0f}s" for s, n in rows[:8]) + "\n")

    def step_tests(self, build_ok: bool) -> None:
        deadline = self.begin("tests")
        if not build_ok:
            self.state.collected = self.collect_quietly(deadline)
            self.end("tests", "not run", "the build did not finish")
            return
        log = self.path("tests.log")
        skip = os.path.join(self.work, "skip.txt")
        collect_only = self.collect_only()
        paths = self.args.tests or ["tests"]
        rounds, reason, last_refresh, last_note = 0, "", 0.0, 0.0
        while True:
            if deadline - self.budget.clock() < 3:
                reason = "tests cap reached"
                break
            rounds += 1
            done_before = len(self.state.finished)
            # one events file per round: a process killed mid-line cannot garble the next round's
            events = os.path.join(self.work, f"events-{rounds}.jsonl")
            self.state.start_file()
            with open(skip, "w", encoding="utf-8") as f:
                f.write("\n".join(sorted(self.state.done())) + "\n")
            cmd = [self.py, "-m", "pytest", "-m", "cuda", "-p", "gpu_check_plugin", "-p", "no:cacheprovider",
                   "--continue-on-collection-errors", "-q", "-rfE"]
            cmd += list(self.args.pytest_arg or []) + (["--collect-only"] if collect_only else []) + paths
            env = child_env(GPU_CHECK_EVENTS=events, GPU_CHECK_SKIP=skip, GPU_CHECK_ONE_ISA="1",
                            GPU_CHECK_TEST_TIMEOUT=self.args.per_test_timeout)
            if not self.dry:
                env["CUDA_LAUNCH_BLOCKING"] = "1"  # a kernel error is reported by the test that caused it
            hang_after = self.args.per_test_timeout + self.args.hang_grace

            def watch():
                nonlocal last_refresh, last_note
                self.state.read(events)
                fl = self.state.in_flight()
                if fl and time.time() - fl[1] > hang_after:
                    return "hung"
                t = self.budget.clock()
                if t - last_refresh > 5:
                    last_refresh = t
                    self.write_report()
                if t - last_note > 20:
                    last_note = t
                    self.progress(deadline)
                return None

            rc, why, _ = run_proc(cmd, deadline=deadline, log=log, env=env, watch=watch,
                                  header=f"# round {rounds}")
            self.state.read(events)
            fl = self.state.in_flight()
            if fl:
                nodeid, t0 = fl
                secs = time.time() - t0
                if why == "hung":
                    self.state.mark(nodeid, "hung", f"no result after {secs:.0f} s (per-test timeout "
                                    f"{self.args.per_test_timeout:g} s did not stop it); process killed")
                elif why == "deadline":
                    self.state.mark(nodeid, "cut off", f"running when the tests step reached its deadline ({secs:.0f} s in)")
                else:
                    self.state.mark(nodeid, "crashed", f"the test process ended while it ran (exit status {rc})")
                self.say(f"tests: {nodeid}: {self.state.results[nodeid]['outcome']}")
            self.write_junit()
            if why == "deadline":
                reason = "tests cap reached"
                break
            if self.state.collected is None:
                reason = "collection did not finish"
                break
            left = [n for n in self.state.collected if n not in self.state.finished]
            if collect_only or not left:
                break
            if len(self.state.finished) == done_before:
                reason = "no progress in the last round"
                break
            if rounds >= 50:
                reason = "too many rounds"
                break
            self.say(f"tests: {len(left)} left after round {rounds} ({why}); resuming in a new process")
        self.write_junit()
        n = len(self.state.collected or [])
        if collect_only:
            status = "dry" if n and not self.state.collect_errors else "FAILED"
            note = f"{n} CUDA tests collected" + (f", {len(self.state.collect_errors)} collection errors"
                                                   if self.state.collect_errors else "")
        else:
            outcomes = self.report()["tests"]["outcomes"]
            bad = sum(outcomes.get(o, 0) for o in FAILING)
            notrun = outcomes.get("not run", 0) + outcomes.get("cut off", 0)
            note = ", ".join(f"{v} {k}" for k, v in sorted(outcomes.items())) + f" of {n}; {rounds} round(s)"
            if reason:
                note += f"; stopped: {reason}"
            if not n:
                status = "FAILED"
                note = "no CUDA test collected" + (f"; stopped: {reason}" if reason else "")
            elif bad or self.state.collect_errors:
                status = "FAILED"
            elif not outcomes.get("passed") and not notrun:
                status = "FAILED"
                note = "no CUDA test passed: " + note
            elif notrun:
                status = "CUT OFF" if reason == "tests cap reached" else "INCOMPLETE"
            else:
                status = "ok"
        self.end("tests", status, note)

    def collect_quietly(self, deadline) -> list[str] | None:
        """Node ids of the CUDA tests (for the table's 'not run' counts) when they cannot run."""
        events = os.path.join(self.work, "collect.jsonl")
        cmd = [self.py, "-m", "pytest", "-m", "cuda", "-p", "gpu_check_plugin", "-p", "no:cacheprovider",
               "--continue-on-collection-errors", "-q", "--collect-only"] + list(self.args.pytest_arg or []) + \
              (self.args.tests or ["tests"])
        env = child_env(GPU_CHECK_EVENTS=events, GPU_CHECK_ONE_ISA="1")
        run_proc(cmd, deadline=min(deadline, self.budget.clock() + 60), log=os.path.join(self.work, "collect.log"),
                 env=env)
        st = TestState()
        st.read(events)
        self.state.rootdir = st.rootdir
        return st.collected

    def progress(self, deadline) -> None:
        n = len(self.state.collected or [])
        done = len(self.state.finished)
        bad = sum(1 for r in self.state.results.values() if r["outcome"] in FAILING)
        self.say(f"tests: {done}/{n} done, {bad} failing, {max(0, deadline - self.budget.clock()):.0f} s left")

    def write_junit(self) -> None:
        """junit.xml from the plugin's events: complete for every round, also one killed before
        pytest could write its own report, with the hung, crashed and never-run tests in it."""
        suite = ET.Element("testsuite", name="gpu-check")
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        collect_only = self.collect_only()
        nodeids = list(self.state.collected or [])
        nodeids += [n for n in self.state.results if n not in set(nodeids)]
        for nodeid in nodeids:
            outcome = self.state.outcome(nodeid, collect_only)
            r = self.state.results.get(nodeid, {})
            tc = ET.SubElement(suite, "testcase", classname=junit_classname(nodeid),
                               name=nodeid.split("::")[-1], time=f"{r.get('duration', 0.0):.3f}")
            counts["tests"] += 1
            msg = r.get("message", "")
            if outcome in ("failed", "timeout"):
                ET.SubElement(tc, "failure", message=first_line(msg)).text = msg
                counts["failures"] += 1
            elif outcome in ("error", "hung", "crashed", "cut off"):
                ET.SubElement(tc, "error", message=f"{outcome}: {first_line(msg)}").text = msg
                counts["errors"] += 1
            elif outcome == "skipped":
                ET.SubElement(tc, "skipped", message=first_line(msg))
                counts["skipped"] += 1
            elif outcome in ("not run", "collected"):
                ET.SubElement(tc, "skipped", message="collected only (dry run)" if outcome == "collected"
                              else "not run: the tests step ended first")
                counts["skipped"] += 1
        for e in self.state.collect_errors:
            tc = ET.SubElement(suite, "testcase", classname=junit_classname(e["nodeid"] or "collection"),
                               name="collection", time="0")
            ET.SubElement(tc, "error", message=first_line(e["message"])).text = e["message"]
            counts["tests"] += 1
            counts["errors"] += 1
        for k, v in counts.items():
            suite.set(k, str(v))
        root = ET.Element("testsuites")
        root.append(suite)
        write_atomic(self.path("junit.xml"), ET.tostring(root, encoding="unicode") + "\n")

    def step_benches(self, build_ok: bool) -> None:
        self.begin("benches")
        families = [f.strip() for f in (self.args.benches or ",".join(BENCHES)).split(",") if f.strip()]
        log = self.path("bench.log")
        statuses = []
        for i, fam in enumerate(families):
            entry = {"family": fam, "slice_s": 0.0, "used_s": 0.0, "status": "", "note": ""}
            self.benches.append(entry)
            if not build_ok:
                entry["status"] = "not run"
                entry["note"] = "the build did not finish"
                statuses.append("not run")
                continue
            share = self.budget.bench_slice(len(families) - i)
            entry["slice_s"] = round(share, 1)
            if share < min(MIN_BENCH_SLICE, self.args.bench_min / len(families)):
                entry["status"], entry["note"] = "not run", f"no time left ({share:.0f} s)"
                statuses.append("not run")
                continue
            if self.args.bench_cmd:
                cmd = [c.replace("{family}", fam) for c in shlex.split(self.args.bench_cmd)]
            elif self.dry:
                cmd = [self.py, "bench/run.py", "--kernels", fam, "--device", "cpu", "--check"]
            else:
                cmd = [self.py, "bench/run.py", "--kernels", fam, "--device", "cuda", "--quick",
                       "--json", self.path("bench.json")]
            self.say(f"bench {fam}: slice {share:.0f} s")
            rc, why, secs = run_proc(cmd, deadline=self.budget.clock() + share, log=log, env=child_env(),
                                     header=f"# bench {fam}: slice {share:.0f} s")
            entry["used_s"] = round(secs, 1)
            if why == "deadline":
                entry["status"], entry["note"] = "CUT OFF", f"still running at its slice of {share:.0f} s; killed"
            elif rc != 0:
                entry["status"], entry["note"] = "FAILED", f"exit status {rc} (see bench.log)"
            else:
                entry["status"] = "ok"
            self.say(f"bench {fam}: {entry['status']}{' - ' + entry['note'] if entry['note'] else ''} ({secs:.0f} s)")
            statuses.append(entry["status"])
            self.write_report()
        ok = all(s == "ok" for s in statuses)
        summary = ", ".join(f"{b['family']} {b['status']}" for b in self.benches)
        status = ("dry" if self.dry else "ok") if ok else ("not run" if not build_ok else "PROBLEMS")
        self.end("benches", status, summary)

    def run(self) -> int:
        for line in self.budget.plan_lines():
            print(line, flush=True)
        self.step_env()
        build_ok = self.build_ok = self.step_build()
        self.step_tests(build_ok)
        self.step_benches(build_ok)
        self.write_report()
        data = self.report()
        print()
        print(render_md(data, brief=True), flush=True)
        status, problems = self.overall()
        if self.collect_only():
            missing = [r["name"] for r in data["ops"] if r["status"] != "COLLECTED"]
            if missing:
                problems.append("no collected CUDA test for: " + ", ".join(missing))
        shutil.rmtree(self.work, ignore_errors=True)
        print(f"gpu-check: {'OK' if not problems else 'PROBLEMS: ' + '; '.join(problems)} "
              f"({self.budget.elapsed():.0f} s of {self.budget.total:g} s; results in {self.out})", flush=True)
        return 0 if not problems else 1


def junit_classname(nodeid: str) -> str:
    path, _, rest = nodeid.partition("::")
    cls = path[:-3].replace("/", ".") if path.endswith(".py") else path
    parts = rest.split("::")[:-1]
    return ".".join([cls] + parts)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def read_tail(path: str, n: int) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def render_md(data: dict, brief: bool = False) -> str:
    """report.md (and, with ``brief``, the summary printed at the end)."""
    L = []
    env = data.get("env") or {}
    if not brief:
        L.append(f"# gpu-check report ({data['mode']})")
        L.append("")
        L.append(f"started {data['started']}, updated {data['updated']}, {data['elapsed_s']:.0f} s elapsed; "
                 f"status: {data['status']}")
        if env:
            L.append(f"GPU: {env.get('name', 'none visible')}; torch {env.get('torch', '?')} (CUDA {env.get('cuda')}); "
                     f"build arch {env.get('arch', '?')}; commit {env.get('commit', '?')}")
        L.append("")
    b = data["budget"]
    L.append(f"## Budget: {b['total_s']:g} s (worst case allowed: {b['formula']})")
    L.append("")
    L.append("| step | allowed (s) | used (s) | status | note |")
    L.append("| --- | ---: | ---: | --- | --- |")
    for name, s in data["steps"].items():
        used = "" if s["used_s"] is None else f"{s['used_s']:.0f}"
        L.append(f"| {name} | {s['allowed_s']:.0f} | {used} | {s['status']} | {s['note']} |")
    L.append("")
    t = data["tests"]
    L.append(f"## CUDA ops and module paths ({t['collected']} CUDA tests collected: " +
             (", ".join(f"{v} {k}" for k, v in sorted(t["outcomes"].items())) or "none") + ")")
    L.append("")
    L.append("| op / path | kernel in build | tests | passed | failed | skipped | not run | status |")
    L.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in data["ops"]:
        kib = {True: "yes", False: "NO", None: "-"}[r["kernel_in_build"]] if r["kind"] == "op" else "(module)"
        L.append(f"| {r['name']} | {kib} | {r['tests']} | {r['passed']} | {r['failed']} | {r['skipped']} | "
                 f"{r['not_run']} | {r['status']} |")
    if t["unattributed"]:
        L.append(f"| (tests naming none of these) | | {t['unattributed']} | | | | | |")
    L.append("")
    if t["collect_errors"]:
        L.append("## Collection errors")
        L.append("")
        for e in t["collect_errors"]:
            L.append(f"- {e['nodeid']}: {first_line(e['message'])}")
        L.append("")
    if t.get("skip_reasons"):
        L.append("Skipped CUDA tests, by reason: " + "; ".join(f"{n} x {why}" for why, n in t["skip_reasons"].items()))
        L.append("")
    if t["context_lost_after"]:
        L.append("CUDA context lost (run resumed in a new process) after: " + ", ".join(t["context_lost_after"]))
        L.append("")
    fails = data["failures"]
    if fails:
        limit = 25 if brief else 200
        L.append(f"## Failing tests ({len(fails)})")
        L.append("")
        for f in fails[:limit]:
            L.append(f"- {f['nodeid']}: {f['outcome']}: {first_line(f['message'])}")
        if len(fails) > limit:
            L.append(f"- ... {len(fails) - limit} more in report.json / junit.xml")
        L.append("")
    if data["benches"]:
        L.append("## Benchmarks (--quick)")
        L.append("")
        L.append("| family | slice (s) | used (s) | status | note |")
        L.append("| --- | ---: | ---: | --- | --- |")
        for e in data["benches"]:
            L.append(f"| {e['family']} | {e['slice_s']:.0f} | {e['used_s']:.0f} | {e['status']} | {e['note']} |")
        L.append("")
    return "\n".join(L)


def first_line(text: str) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()[:300]
    return ""


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "gpu-out"),
                    help="results folder (default $OUT, else ./gpu-out)")
    ap.add_argument("--dry-run", action="store_true", help="walk the steps without CUDA (see above)")
    ap.add_argument("--run-tests", action="store_true",
                    help="with --dry-run: run the selected tests instead of collecting them")
    ap.add_argument("--arch", help="TORCH_CUDA_ARCH_LIST for the build (default: the GPU's, e.g. 9.0a)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile jobs (MAX_JOBS)")
    ap.add_argument("--budget", type=float, default=TOTAL, help="seconds in all")
    ap.add_argument("--margin", type=float, default=MARGIN)
    ap.add_argument("--env-cap", type=float, default=ENV_CAP)
    ap.add_argument("--build-cap", type=float, default=BUILD_CAP)
    ap.add_argument("--tests-cap", type=float, default=TESTS_CAP)
    ap.add_argument("--bench-min", type=float, default=BENCH_MIN)
    ap.add_argument("--per-test-timeout", type=float, default=PER_TEST_TIMEOUT)
    ap.add_argument("--hang-grace", type=float, default=HANG_GRACE,
                    help="seconds past the per-test timeout before a test counts as hung and is killed")
    ap.add_argument("--build-cmd", help="run this instead of the build (checks of the budget logic)")
    ap.add_argument("--tests", action="append", help="test paths (default: tests)")
    ap.add_argument("--pytest-arg", action="append", help="extra pytest argument (repeatable)")
    ap.add_argument("--benches", help=f"benchmark families, comma-separated (default: {','.join(BENCHES)})")
    ap.add_argument("--bench-cmd", help="run this per family instead of bench/run.py ({family} is replaced)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check = Check(args)
    except ValueError as e:
        print(f"gpu-check: {e}", file=sys.stderr)
        return 2
    return check.run()


if __name__ == "__main__":
    sys.exit(main())
