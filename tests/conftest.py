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


@pytest.fixture
def conv_op_args():
    """The positional arguments of one ``int8_conv2d`` call for the opcheck / fake-kernel tests:
    uint8 channels-last x of 2 images, 2 groups, stride (2, 1), padding (1, 0), dilation (1, 2),
    per-image static quantization, packed weight, ReLU, float output."""
    x = torch.randint(0, 256, (2, 6, 7, 5), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    w = torch.randint(-128, 128, (10, 3, 3, 2), dtype=torch.int8)
    ws, bias = torch.rand(10), torch.randn(10)
    sc, zp = torch.rand(2) + 0.1, torch.randint(0, 256, (2,), dtype=torch.int32)
    packed = torch.ops.pycompress.int8_conv2d_pack_weight(w, 2)
    return (x, sc, zp, w, ws, bias, packed, [2, 1], [1, 0], [1, 2], 2, "relu", None, 1.0, 0)
