"""CUDA max pooling of quantized maps (pycompress::int8_max_pool2d, csrc/int8/cuda/pool.cu) against
the CPU op, which the CPU tests hold to torch's float max pooling (tests/test_int8_pool.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pycompress.ops as ops
from pycompress.nn import Int8MaxPool2d

pytestmark = pytest.mark.cuda
DEV = "cuda"

GEOMETRIES = [
    ((3, 3), (2, 2), (1, 1), (1, 1), False),
    ((2, 2), (2, 2), (0, 0), (1, 1), True),
    ((5, 3), (3, 1), (2, 1), (1, 2), True),
    ((1, 1), (1, 1), (0, 0), (1, 1), False),
]


@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8])
def test_int8_max_pool2d_cuda_matches_cpu(geom, dtype):
    k, s, p, d, ceil = geom
    g = torch.Generator().manual_seed(0)
    for c, (h, w) in ((1, (7, 9)), (33, (9, 9)), (130, (12, 13))):
        lo, hi = (0, 256) if dtype == torch.uint8 else (-128, 128)
        x = torch.randint(lo, hi, (2, c, h, w), generator=g, dtype=torch.int16).to(dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        want = ops.int8_max_pool2d(x, k, s, p, d, ceil)
        got = ops.int8_max_pool2d(x.to(DEV), k, s, p, d, ceil)
        assert got.device.type == "cuda" and got.dtype == dtype
        assert torch.equal(got.cpu(), want)
        assert torch.equal(got.cpu().float(), F.max_pool2d(x.float(), k, s, p, d, ceil_mode=ceil))


def test_int8_max_pool2d_cuda_nchw_input_and_module():
    x = torch.randint(0, 256, (3, 64, 20, 18), dtype=torch.uint8)
    pool = Int8MaxPool2d(3, 2, 1).to(DEV)
    got = pool(x.to(DEV))
    assert torch.equal(got.cpu(), ops.int8_max_pool2d(x, 3, 2, 1))
    xf = torch.randn(2, 8, 9, 9, device=DEV)
    assert torch.equal(pool(xf), F.max_pool2d(xf, 3, 2, 1))
