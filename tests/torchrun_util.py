"""Launches ``torchrun`` from a test and never leaves a process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env(extra: dict | None = None) -> dict:
    """The test's environment minus any launcher variables, with the source tree importable."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                        "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID")}
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra or {})
    return env


_PORT_RACE = ("address already in use", "eaddrinuse", "distnetworkerror",
              "rendezvousconnectionerror")


def run(args: list[str], timeout: float, nproc: int | None = 2, env: dict | None = None,
        cwd: str = REPO) -> subprocess.CompletedProcess:
    """:func:`run_once`, tried a second time only when the launch lost a race for a free port
    (another program took the port the launcher had picked)."""
    res = run_once(args, timeout, nproc, env, cwd)
    if res.returncode != 0 and any(k in res.stdout.lower() for k in _PORT_RACE):
        res = run_once(args, timeout, nproc, env, cwd)
    return res


def run_once(args: list[str], timeout: float, nproc: int | None = 2, env: dict | None = None,
             cwd: str = REPO) -> subprocess.CompletedProcess:
    """Runs ``torchrun --standalone --nproc_per_node=<nproc> <args>`` (a free port is picked by
    the standalone rendezvous), or ``python <args>`` when ``nproc`` is None. On a timeout or any
    error the whole process group of the launch is killed before returning/raising."""
    if nproc is None:
        cmd = [sys.executable] + args
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}"] + args
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=cwd, env=env if env is not None else child_env(),
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s: {' '.join(cmd)}\n{out[-4000:]}")
    finally:
        _kill(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def _kill(proc: subprocess.Popen) -> None:
    # the launch runs in its own session: its group id is the launcher's pid
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass
