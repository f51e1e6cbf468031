"""Shared checks of the modules' direct CPU inference calls (pycompress._C.*_module_cpu)."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode


class _PassDispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _PassFunction(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Sub(torch.Tensor):
    pass


def check_direct_call(direct, buffers: dict, in_features: int, reference, op_name: str,
                      grad_buffer: str, *args, atol: float = 1e-5) -> None:
    """``direct(x, buffers, in_features, *args)`` equals ``reference(x)`` for every input layout
    and float dtype, and returns None whenever the call must take the general path: another
    dtype, width, device or type of input, a wrong ``in_features``, a missing buffer, any dispatch
    or torch-function mode, a functorch transform, or an input or buffer ``grad_buffer`` that
    needs grad. The profiler records it as ``op_name``."""
    K = in_features
    x = torch.randn(2, 3, K)

    def close(y, ref, tol=atol):
        assert y is not None and y.shape == ref.shape and y.dtype == ref.dtype
        torch.testing.assert_close(y.float(), ref.float(), atol=tol, rtol=tol)

    close(direct(x, buffers, K, *args), reference(x))  # grad mode on, nothing needs grad
    with torch.no_grad():
        for inp in (x[1], x[1, 2], x[:, 1], x[:, :0]):
            close(direct(inp, buffers, K, *args), reference(inp))
        for dt in (torch.float16, torch.bfloat16):
            close(direct(x.to(dt), buffers, K, *args), reference(x.to(dt)), 5e-2)
        for other in (x.double(), x[..., :-1], x.to("meta"), torch.tensor(1.0), x.as_subclass(_Sub),
                      x.tolist(), None):
            assert direct(other, buffers, K, *args) is None
        assert direct(x, buffers, K + 1, *args) is None
        assert direct(x, {k: v for k, v in buffers.items() if k != grad_buffer}, K, *args) is None
        assert direct(x, {**buffers, grad_buffer: buffers[grad_buffer].to("meta")}, K, *args) is None
        for mode in (_PassDispatch, _PassFunction):
            with mode():
                assert direct(x, buffers, K, *args) is None
        seen = []
        torch.func.vmap(lambda r: seen.append(direct(r, buffers, K, *args)) or r)(x)
        assert seen == [None]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            assert direct(x, buffers, K, *args) is not None
        assert any(e.name == op_name for e in prof.events())
    xg = x.clone().requires_grad_(True)
    assert direct(xg, buffers, K, *args) is None
    with torch.no_grad():
        assert direct(xg, buffers, K, *args) is not None
    grad_buf = buffers[grad_buffer].detach().clone().requires_grad_(True)
    assert direct(x, {**buffers, grad_buffer: grad_buf}, K, *args) is None
    with torch.no_grad():
        assert direct(x, {**buffers, grad_buffer: grad_buf}, K, *args) is not None
