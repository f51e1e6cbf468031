"""pytest plugin of the GPU check (.ci/gpu_check.py): loaded with ``-p gpu_check_plugin``.

Everything is driven by environment variables, so that a plain pytest run is unaffected:

GPU_CHECK_EVENTS        file that gets one JSON line per event (collected, start, report, finish,
                        collect_error, context_lost, session_finish), flushed as it happens, so
                        that a run killed from outside still leaves what it finished
GPU_CHECK_SKIP          file of node ids (one per line) to deselect: the tests an earlier run of
                        the same check already finished, or left hanging
GPU_CHECK_TEST_TIMEOUT  seconds one test (setup, call and teardown) may take; past it SIGALRM
                        raises inside the test, which then fails and the run goes on. A test
                        stuck where Python cannot interrupt it (a CUDA call that never returns)
                        is killed by the driver instead
GPU_CHECK_ONE_ISA=1     CUDA tests parametrized over the CPU code paths (fixture cpu_isa) run for
                        one path only, the best this CPU has: on a GPU the code path only changes
                        the CPU side, which the CPU suite covers

After a CUDA error that leaves the context unusable (illegal address, launch failure, ...) the
session stops after that test, so that the driver resumes the rest in a fresh process instead of
reporting every later CUDA test as failed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest

_EVENTS = os.environ.get("GPU_CHECK_EVENTS")
_SKIP = os.environ.get("GPU_CHECK_SKIP")
_TIMEOUT = float(os.environ.get("GPU_CHECK_TEST_TIMEOUT") or 0)
_ONE_ISA = os.environ.get("GPU_CHECK_ONE_ISA") == "1"

_STICKY = re.compile(
    r"illegal memory access|unspecified launch failure|misaligned address|device-side assert|"
    r"illegal instruction|CUDA error: (an )?unknown error|context is destroyed|"
    r"CUBLAS_STATUS_EXECUTION_FAILED|operation not permitted when stream is capturing",
    re.IGNORECASE,
)

_out = None
_session = None


class PerTestTimeout(Exception):
    """Raised inside a test that ran past GPU_CHECK_TEST_TIMEOUT."""


def _emit(event: str, **fields) -> None:
    global _out
    if not _EVENTS:
        return
    if _out is None:
        _out = open(_EVENTS, "a", buffering=1, encoding="utf-8")
    fields["event"] = event
    fields["t"] = time.time()
    _out.write(json.dumps(fields) + "\n")


def _message(report) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None and getattr(crash, "message", None):
        text = crash.message
    elif isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:  # skip: (file, line, reason)
        text = str(report.longrepr[2])
    else:
        text = str(report.longrepr or "")
    return text.strip()[:1000]


def pytest_sessionstart(session):
    global _session
    _session = session


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    skip = set()
    if _SKIP and os.path.exists(_SKIP):
        with open(_SKIP, encoding="utf-8") as f:
            skip = {line.strip() for line in f if line.strip()}
    best_isa = None
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        extra_isa = False
        if _ONE_ISA and "cuda" in item.keywords and "cpu_isa" in params:
            if best_isa is None:
                best_isa = _best_isa()
            extra_isa = best_isa != "" and params["cpu_isa"] != best_isa
        (drop if item.nodeid in skip or extra_isa else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def _best_isa() -> str:
    try:
        from pycompress import _ext

        return _ext.max_cpu_isa()
    except Exception:  # noqa: BLE001 - without the extension nothing is trimmed
        return ""


def pytest_collection_finish(session):
    _emit("collected", nodeids=[item.nodeid for item in session.items], rootdir=str(session.config.rootpath))


def pytest_collectreport(report):
    if report.failed:
        _emit("collect_error", nodeid=report.nodeid, message=_message(report))


def pytest_runtest_logstart(nodeid, location):
    _emit("start", nodeid=nodeid)


def pytest_runtest_logreport(report):
    msg = _message(report) if report.outcome != "passed" else ""
    _emit("report", nodeid=report.nodeid, when=report.when, outcome=report.outcome,
          duration=round(report.duration, 4), message=msg)
    if report.failed and _session is not None and _STICKY.search(str(report.longrepr or "")):
        _emit("context_lost", nodeid=report.nodeid)
        _session.shouldstop = f"CUDA context unusable after {report.nodeid}"


def pytest_runtest_logfinish(nodeid, location):
    _emit("finish", nodeid=nodeid)


def _on_alarm(signum, frame):
    raise PerTestTimeout(f"per-test timeout: ran longer than {_TIMEOUT:g} s")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    armed = _TIMEOUT > 0 and hasattr(signal, "setitimer")
    if armed:
        previous = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, _TIMEOUT)
    try:
        yield
    finally:
        if armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def pytest_sessionfinish(session, exitstatus):
    _emit("session_finish", exitstatus=int(exitstatus))
    if _out is not None:
        _out.flush()
