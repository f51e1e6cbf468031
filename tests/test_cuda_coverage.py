"""Coverage of the CUDA kernels by CUDA tests, checked on the CPU.

The CUDA tests run only on a GPU machine; these checks keep them from silently falling behind
the kernels: every op that csrc/ registers for CUDA, and every module of pycompress.nn, must have
at least one test marked ``cuda`` that names it (see tests/cuda_coverage.py for what counts), and
no test that uses CUDA may lack the marker (``pytest -m cuda`` would never select it).
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import pycompress.nn
from cuda_coverage import MODULE_PATHS, ROOT, SourceIndex, attribute, registered_cuda_ops

_PLUGIN = textwrap.dedent("""
    import json, os

    def pytest_collection_finish(session):
        with open(os.environ["CUDA_COVERAGE_OUT"], "w") as f:
            json.dump({item.nodeid: item.get_closest_marker("cuda") is not None for item in session.items}, f)
""")


@pytest.fixture(scope="module")
def collected(tmp_path_factory) -> dict[str, bool]:
    """``{node id: marked cuda}`` of every test under tests/, as pytest collects them."""
    tmp = tmp_path_factory.mktemp("cuda-coverage")
    (tmp / "cuda_coverage_collect.py").write_text(_PLUGIN)
    out = tmp / "collected.json"
    env = dict(os.environ, CUDA_COVERAGE_OUT=str(out),
               PYTHONPATH=os.pathsep.join([str(tmp), ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "cuda_coverage_collect",
                           "-p", "no:cacheprovider", "tests"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert out.exists(), f"collection failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


def test_registered_cuda_ops_are_read_from_every_cuda_binding():
    ops = registered_cuda_ops()
    bindings = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "**", "*_cuda.cpp"),
                                                                 recursive=True))
    assert bindings, "no CUDA binding files found under csrc/"
    assert set(bindings) <= set(ops.values()), "a CUDA binding file registers no op that the parser found"
    # real ops, not parsing accidents: a schema this build registered, or one defined in csrc/
    # (an op defined only next to its CUDA kernel has no schema in a CPU build)
    schemas = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("pycompress::")}
    text = ""
    for path in glob.glob(os.path.join(ROOT, "csrc", "**", "*.c*"), recursive=True):
        with open(path, encoding="utf-8") as f:
            text += f.read()
    undefined = [op for op in ops if op not in schemas and not re.search(r'def\(\s*"' + op + r"\(", text)]
    assert not undefined, f"registered for CUDA but defined nowhere: {undefined}"


def test_every_cuda_op_and_module_path_has_a_cuda_test(collected):
    ops = registered_cuda_ops()
    cuda_tests = [n for n, marked in collected.items() if marked]
    assert cuda_tests, "no test is marked cuda"
    groups = attribute(cuda_tests, list(ops))
    missing = sorted(k for k, ids in groups.items() if not ids)
    assert not missing, (
        "no test marked cuda names these CUDA ops / module paths (add one to tests/test_cuda_ops.py): "
        + ", ".join(missing))


def test_every_nn_module_has_a_module_path():
    modules = [name for name in pycompress.nn.__all__
               if isinstance(getattr(pycompress.nn, name), type)
               and issubclass(getattr(pycompress.nn, name), torch.nn.Module)]
    assert modules
    unlisted = [m for m in modules if f"nn.{m}" not in MODULE_PATHS]
    assert not unlisted, f"add these pycompress.nn modules to MODULE_PATHS in tests/cuda_coverage.py: {unlisted}"


_USES_CUDA = re.compile(r"\.cuda\(|[\"']cuda(:\d+)?[\"']|\bCUDA_OK\b|torch\.cuda\.(?!is_available)")


def test_tests_that_use_cuda_are_marked(collected):
    marked: dict[str, bool] = {}
    for nodeid, is_cuda in collected.items():
        func = nodeid.split("[", 1)[0]
        marked[func] = marked.get(func, False) or is_cuda
    sources = SourceIndex(ROOT)
    unmarked = []
    for func, is_cuda in sorted(marked.items()):
        if is_cuda:
            continue
        relpath, _, name = func.partition("::")
        module = sources._module(relpath)
        own = module[1].get(name, "") if module else ""
        if _USES_CUDA.search(own):
            unmarked.append(func)
    assert not unmarked, ("these tests use CUDA but carry no cuda marker, so `pytest -m cuda` (the GPU "
                          "check) never runs them: " + ", ".join(unmarked))


def test_attribution_follows_helpers_and_names(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text(textwrap.dedent("""
        def helper(x):
            return ops.int8_gemm(x, x)

        def test_direct():
            P.int8_linear_w8a16(1)

        def test_via_helper():
            helper(2)

        def test_module():
            Int8Linear.from_float(None)

        def test_prefix_only():
            ops.int8_linear_w8a16_extra()
    """))
    ids = [f"tests/test_x.py::{n}" for n in ("test_direct", "test_via_helper[p0]", "test_module", "test_prefix_only")]
    groups = attribute(ids, ["int8_gemm", "int8_linear_w8a16", "int8_linear"], root=str(tmp_path))
    assert groups["int8_gemm"] == ["tests/test_x.py::test_via_helper[p0]"]
    assert groups["int8_linear_w8a16"] == ["tests/test_x.py::test_direct"]
    assert groups["int8_linear"] == []
    assert groups["nn.Int8Linear"] == ["tests/test_x.py::test_module"]
