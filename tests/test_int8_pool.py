"""Max pooling of quantized maps: the op (every CPU code path) against torch's float max pooling,
bad input, tracing, the Int8MaxPool2d module, and quantize() putting it on uint8 chains."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnn_models as cm
import pycompress
import pycompress.ops as ops
from pycompress.nn import Int8Conv2d, Int8MaxPool2d

GEOMETRIES = [
    # kernel, stride, padding, dilation, ceil_mode
    ((3, 3), (2, 2), (1, 1), (1, 1), False),  # the ResNet stem pool
    ((2, 2), (2, 2), (0, 0), (1, 1), False),  # VGG
    ((2, 2), (2, 2), (0, 0), (1, 1), True),
    ((3, 3), (2, 2), (0, 0), (1, 1), True),
    ((3, 2), (1, 2), (1, 0), (1, 1), False),
    ((3, 3), (1, 1), (1, 1), (1, 1), False),
    ((5, 5), (3, 2), (2, 1), (1, 1), True),
    ((3, 3), (2, 1), (1, 1), (2, 1), False),
    ((1, 1), (1, 1), (0, 0), (1, 1), False),
    ((4, 3), (3, 3), (1, 1), (1, 2), True),
]


def _maps(dtype, n, c, h, w, channels_last=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    lo, hi = (0, 256) if dtype == torch.uint8 else (-128, 128)
    x = torch.randint(lo, hi, (n, c, h, w), generator=g, dtype=torch.int16).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8])
def test_max_pool_exact(geom, dtype, cpu_isa):
    k, s, p, d, ceil = geom
    for c, (h, w) in ((1, (7, 9)), (3, (11, 8)), (33, (9, 9)), (64, (12, 10)), (130, (8, 13))):
        x = _maps(dtype, 2, c, h, w, seed=c)
        y = ops.int8_max_pool2d(x, k, s, p, d, ceil)
        want = F.max_pool2d(x.float(), k, s, p, d, ceil_mode=ceil)
        assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
        assert y.shape == want.shape, (c, h, w)
        assert torch.equal(y.float(), want), (c, h, w)


def test_max_pool_layouts_threads_and_extremes(cpu_isa):
    x = _maps(torch.uint8, 3, 70, 15, 17, channels_last=False)
    want = F.max_pool2d(x.float(), 3, 2, 1)
    assert torch.equal(ops.int8_max_pool2d(x, 3, 2, 1).float(), want)           # NCHW input
    assert torch.equal(ops.int8_max_pool2d(x[:, :, 1:, 2:], 3, 2, 1).float(),   # strided view
                       F.max_pool2d(x[:, :, 1:, 2:].float(), 3, 2, 1))
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.int8_max_pool2d(x, 3, 2, 1)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(one, ops.int8_max_pool2d(x, 3, 2, 1))
    for dtype, lo, hi in ((torch.uint8, 0, 255), (torch.int8, -128, 127)):
        for v in (lo, hi):
            z = torch.full((1, 65, 5, 5), v, dtype=dtype).contiguous(memory_format=torch.channels_last)
            assert torch.equal(ops.int8_max_pool2d(z, 2, 2, 0, 1, True), torch.full((1, 65, 3, 3), v, dtype=dtype))
    empty = torch.zeros(0, 4, 6, 6, dtype=torch.uint8)
    assert ops.int8_max_pool2d(empty, 2).shape == (0, 4, 3, 3)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: ops.int8_max_pool2d(torch.zeros(1, 2, 4, 4), 2), TypeError, "uint8"),
    (lambda: ops.int8_max_pool2d(torch.zeros(2, 4, 4, dtype=torch.uint8), 2), ValueError, "4-D"),
    (lambda: ops.int8_max_pool2d(torch.zeros(1, 2, 4, 4, dtype=torch.uint8), 0), ValueError, "kernel_size"),
    (lambda: ops.int8_max_pool2d(torch.zeros(1, 2, 4, 4, dtype=torch.uint8), 2, 0), ValueError, "stride"),
    (lambda: ops.int8_max_pool2d(torch.zeros(1, 2, 4, 4, dtype=torch.uint8), 2, 1, 2), ValueError, "half"),
    (lambda: ops.int8_max_pool2d(torch.zeros(1, 2, 2, 2, dtype=torch.uint8), 3), ValueError, "smaller"),
    (lambda: ops.int8_max_pool2d(torch.zeros(1, 2, 4, 4, dtype=torch.uint8), (2, 2, 2)), TypeError, "pair"),
    (lambda: ops.int8_max_pool2d(torch.zeros(1, 2, 4, 4, dtype=torch.uint8), 2, ceil_mode=1), TypeError, "ceil_mode"),
])
def test_bad_input_wrapper(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_bad_input_binding():
    op = torch.ops.pycompress.int8_max_pool2d.default
    x = torch.zeros(1, 2, 4, 4, dtype=torch.uint8)
    with pytest.raises(TypeError, match="uint8 or int8"):
        op(x.float(), [2, 2], [2, 2], [0, 0], [1, 1], False)
    with pytest.raises(ValueError, match="4-D"):
        op(x[0], [2, 2], [2, 2], [0, 0], [1, 1], False)
    with pytest.raises(ValueError, match="half"):
        op(x, [2, 2], [1, 1], [2, 0], [1, 1], False)
    with pytest.raises(ValueError, match="smaller"):
        op(x, [5, 5], [1, 1], [0, 0], [1, 1], False)


def test_fake_kernel_opcheck_and_compile():
    x = _maps(torch.uint8, 2, 16, 9, 9)
    torch.library.opcheck(torch.ops.pycompress.int8_max_pool2d.default, (x, [3, 3], [2, 2], [1, 1], [1, 1], False))
    torch.library.opcheck(torch.ops.pycompress.int8_max_pool2d.default, (x.to(torch.int8), [2, 2], [2, 2], [0, 0],
                                                                         [1, 1], True))
    pool = Int8MaxPool2d(3, 2, 1)
    torch.testing.assert_close(torch.compile(pool, fullgraph=True)(x), pool(x), rtol=0, atol=0)


def test_module_matches_max_pool_for_every_input_dtype():
    ref = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
    pool = Int8MaxPool2d.from_float(ref)
    assert isinstance(pool, nn.MaxPool2d)
    x = torch.randn(2, 5, 11, 11)
    assert torch.equal(pool(x), ref(x))
    q = _maps(torch.uint8, 2, 5, 11, 11)
    assert torch.equal(pool(q).float(), ref(q.float()))
    again = Int8MaxPool2d.from_config(pool.config())
    assert again.config() == pool.config() and pool.state_dict() == {}
    back = pool.to_float()
    assert type(back) is nn.MaxPool2d and torch.equal(back(x), ref(x))
    with pytest.raises(ValueError, match="return_indices"):
        Int8MaxPool2d.from_float(nn.MaxPool2d(2, return_indices=True))
    with pytest.raises(TypeError, match="nn.MaxPool2d"):
        Int8MaxPool2d.from_float(nn.AvgPool2d(2))
    with pytest.raises(ValueError, match="half"):
        Int8MaxPool2d(2, 1, 2)


CALIB = [cm.images(4, seed=s) for s in range(2)]
TEST = cm.images(6, seed=9)


def test_quantize_pools_uint8_maps_of_the_resnet_stem(tmp_path):
    # (ResNet-50: the pooled stem feeds two convs, layer1.0's conv1 and downsample; in a ResNet-18 it
    # also feeds a residual addition, which needs float)
    model = cm.resnet50(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    calib = [torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    ref = copy.deepcopy(model)
    _, res = pycompress.quantize(model, calibration_data=calib, return_result=True)
    assert res.pools == ["maxpool"] and isinstance(model.maxpool, Int8MaxPool2d)
    assert ("conv1", "layer1.0.conv1") in res.uint8_edges and ("conv1", "layer1.0.downsample.0") in res.uint8_edges
    seen = {}

    def record(m, args, out):
        seen["dtypes"] = (args[0].dtype, out.dtype)

    hook = model.maxpool.register_forward_hook(record)
    with torch.no_grad():
        out = model(x)
    hook.remove()
    assert seen["dtypes"] == (torch.uint8, torch.uint8)
    # requantizing in the stem conv's epilogue and pooling uint8 == the same in float
    # (shortcuts read as residuals are not quantized by their reader: those stay uint8)
    unchained = copy.deepcopy(model)
    for p in {p for p, _ in res.uint8_edges} - {p for p, _ in res.uint8_residual_edges}:
        unchained.get_submodule(p).set_output_quantization(None, None)
    with torch.no_grad():
        assert torch.equal(out, unchained(x))
        cos = F.cosine_similarity(out, ref(x)).min()
    assert cos > 0.99
    pycompress.save(model, tmp_path / "m")
    loaded = pycompress.load(tmp_path / "m", cm.resnet50(num_classes=10).eval())
    assert isinstance(loaded.maxpool, Int8MaxPool2d)
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
    report = pycompress.validate(ref, model, x)
    assert report.passed


def test_quantize_vgg_pools_become_int8_pools():
    model = cm.vgg()
    _, res = pycompress.quantize(model, calibration_data=CALIB, return_result=True)
    pools = [n for n, m in model.named_modules() if isinstance(m, Int8MaxPool2d)]
    assert pools and pools == sorted(res.pools, key=pools.index)
    assert all(isinstance(model.get_submodule(e[0]), Int8Conv2d) for e in res.uint8_edges)
    assert ("features.3", "features.7") in res.uint8_edges  # conv -> relu -> max pool -> conv
