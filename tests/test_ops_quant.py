"""quantize_per_token: bit-exact against the reference on every device and CPU code path."""

from __future__ import annotations

import pytest
import torch

import pycompress.ops as ops
from reference import quantize_per_token_ref

SHAPES = [(1, 1), (1, 7), (3, 16), (5, 17), (33, 129), (64, 4096), (2, 100003), (0, 8)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _assert_same(x):
    q, s = ops.quantize_per_token(x)
    rq, rs = quantize_per_token_ref(x.cpu())
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert q.shape == x.shape and s.shape == x.shape[:-1]
    torch.testing.assert_close(q.cpu(), rq, rtol=0, atol=0)
    torch.testing.assert_close(s.cpu(), rs, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(shape, dtype, device, cpu_isa):
    x = (torch.randn(shape) * 3).to(dtype).to(device)
    _assert_same(x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_rows(dtype, device, cpu_isa):
    x = torch.randn(6, 37).to(dtype)
    x[0] = 0  # zero row -> scale 1, q 0
    x[1, 5] = float("nan")  # non-finite rows -> scale NaN, q 0
    x[2, 36] = float("inf")
    x[3, 0] = -float("inf")
    x[4] = torch.linspace(-1, 1, 37)  # exact halves exercise round-half-even
    x[5] = torch.tensor([-0.0] * 37)
    x = x.to(device)
    _assert_same(x)
    q, s = ops.quantize_per_token(x)
    assert s[0].item() == 1.0 and (q[0] == 0).all()
    assert torch.isnan(s[1:4].cpu()).all() and (q[1:4] == 0).all()


def test_round_half_even_exact(device, cpu_isa):
    # absmax 127 -> multiplier 1: values at .5 must round to even
    row = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49, 126.5]])
    q, s = ops.quantize_per_token(row.to(device))
    assert q.cpu().tolist() == [[127, 0, 2, 2, 0, -2, -2, 3, 126]]
    assert s.item() == 1.0


def test_dequantizes_within_half_step(device):
    x = torch.randn(32, 300, device=device)
    q, s = ops.quantize_per_token(x)
    err = (q.float() * s[:, None] - x).abs()
    assert (err <= s[:, None] / 2 * (1 + 1e-6)).all()


def test_leading_dims_and_noncontiguous(device, cpu_isa):
    x = torch.randn(2, 3, 40, device=device)
    q, s = ops.quantize_per_token(x)
    assert q.shape == (2, 3, 40) and s.shape == (2, 3)
    _assert_same(x)
    xt = torch.randn(40, 9, device=device).t()  # column-major rows
    _assert_same(xt)
    xs = torch.randn(7, 80, device=device)[:, ::2]  # strided rows
    _assert_same(xs)
    xr = torch.randn(12, 50, device=device)[::3]  # row stride > K
    _assert_same(xr)


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        ops.quantize_per_token(torch.randn(8))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        ops.quantize_per_token(torch.tensor(1.0))
    with pytest.raises(TypeError, match="dtype"):
        ops.quantize_per_token(torch.ones(2, 2, dtype=torch.int32))
    with pytest.raises(TypeError, match="dtype"):
        ops.quantize_per_token(torch.ones(2, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        ops.quantize_per_token([[1.0, 2.0]])
    # the raw op keeps its own checks (RuntimeError, never a crash)
    with pytest.raises(RuntimeError, match="2-D"):
        torch.ops.pycompress.quantize_per_token(torch.randn(2, 3, 4))
    with pytest.raises((RuntimeError, TypeError), match="float32, float16 or bfloat16"):
        torch.ops.pycompress.quantize_per_token(torch.ones(2, 2, dtype=torch.float64))


def test_opcheck(device):
    for x in [torch.randn(4, 33), torch.randn(1, 8).half(), torch.randn(3, 5).bfloat16()]:
        torch.library.opcheck(torch.ops.pycompress.quantize_per_token.default, (x.to(device),))


class _QuantModule(torch.nn.Module):
    def forward(self, x):
        q, s = ops.quantize_per_token(x)
        return q.float() * s.unsqueeze(-1)


def test_torch_compile_fullgraph():
    m = _QuantModule()
    x = torch.randn(2, 5, 64)
    compiled = torch.compile(m, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(x), m(x))


def test_torch_export():
    ep = torch.export.export(_QuantModule(), (torch.randn(4, 64),))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("pycompress.quantize_per_token" in t for t in targets), targets
