"""Shared fixtures: every op test runs on every available device and CPU code path."""

from __future__ import annotations

import pytest
import torch

import pycompress
from pycompress import _ext


def _cuda_ready() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA GPU on this machine"
    if not _ext.has_cuda_kernels():
        return False, "pycompress was built without CUDA kernels"
    return True, ""


CUDA_OK, CUDA_WHY = _cuda_ready()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason=CUDA_WHY)
    for item in items:
        if "cuda" in item.keywords and not CUDA_OK:
            item.add_marker(skip)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Runs the test once per device: 'cpu' always, 'cuda' where a GPU and the kernels exist."""
    return request.param


ALL_ISAS = ["scalar", "avx2", "avx512", "amx"]


@pytest.fixture(params=ALL_ISAS)
def cpu_isa(request):
    """Runs the test once per CPU code path; paths this CPU lacks are skipped with a reason."""
    isa = request.param
    if isa not in _ext.cpu_isas():
        pytest.skip(f"this CPU does not support the {isa} code path (max: {_ext.max_cpu_isa()})")
    previous = pycompress.active_cpu_isa()
    pycompress.set_cpu_isa(isa)
    try:
        yield isa
    finally:
        pycompress.set_cpu_isa(previous)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests: their models are small, and many small ops run
    faster on one thread of a busy machine (the kernels' multi-threaded paths are tested with the
    ops). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
