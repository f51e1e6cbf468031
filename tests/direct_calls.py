"""Shared checks of the modules' forward calls (Int8Linear, Int8Conv2d, SparseLinear,
SemiSparseLinear): their hot path calls the op itself (through torch.ops.pycompress.<op> or the
op's typed entry point in pycompress._C.direct), so every call must stay visible to whatever
watches the dispatcher or overrides torch functions, and any input the op rejects must end in the
validated wrapper's clear error with the module unchanged."""

from __future__ import annotations

import warnings

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import pycompress


class _RecordDispatch(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


class _RecordFunction(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


class _Sub(torch.Tensor):
    pass


def _state(module):
    return {k: v.clone() for k, v in module.state_dict(keep_vars=True).items()}


def check_module_calls(module, reference, op_name: str, *, atol: float = 1e-5) -> None:
    """``module(x)`` equals ``reference(x)`` for every input layout and float dtype, with and
    without grad mode, in inference mode, under dispatch and torch-function modes, vmap, the
    profiler and the tracer, which all see ``op_name`` (e.g. "pycompress::sparse_linear"); bad
    inputs raise the wrapper's TypeError / ValueError and leave the module's buffers unchanged."""
    K = module.in_features
    x = torch.randn(2, 3, K)

    def close(y, ref, tol=atol):
        assert y.shape == ref.shape and y.dtype == ref.dtype, (y.shape, ref.shape, y.dtype, ref.dtype)
        torch.testing.assert_close(y.float(), ref.float(), atol=tol, rtol=tol)

    close(module(x), reference(x))  # grad mode on, nothing needs grad
    assert not module(x).requires_grad
    with torch.no_grad():
        for inp in (x[1], x[1, 2], x[:, 1], x[:, :0], x[1].t().contiguous().t(), x.as_subclass(_Sub)):
            close(module(inp), reference(inp))
        for dt in (torch.float16, torch.bfloat16):
            close(module(x.to(dt)), reference(x.to(dt)), 5e-2)
    with torch.inference_mode():
        close(module(x), reference(x))
    close(module(x[0]), reference(x[0]))
    check_calls_visible(module, (x[0],), op_name)  # the same bits under modes, profiler, tracer
    ys = torch.func.vmap(module)(x)
    close(ys, reference(x))

    before = _state(module)
    bad = [(x.double(), TypeError, "x"), (x.int(), TypeError, "x"), (x.tolist(), TypeError, "x"),
           (x[..., :-1], ValueError, str(K)), (torch.tensor(1.0), ValueError, "")]
    for inp, exc, words in bad:
        try:
            module(inp)
        except exc as e:
            assert words in str(e), (words, str(e))
        else:
            raise AssertionError(f"{type(inp).__name__} input was accepted")
    with torch.no_grad():
        try:
            module(x.to("meta"))
        except ValueError as e:
            assert "same device" in str(e)
        else:
            raise AssertionError("a meta input with CPU buffers was accepted")
    after = _state(module)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def check_calls_visible(module, args, op_name: str) -> None:
    """``module(*args)`` gives the same result (bits and dtype) as under ``no_grad`` in grad mode,
    inference mode, for tensor-subclass inputs, under dispatch and torch-function modes, the
    profiler and the tracer, which all see ``op_name`` (e.g. "pycompress::int8_conv2d")."""
    short = op_name.split("::")[1]
    with torch.no_grad():
        want = module(*args)

    def same(y):
        assert y.dtype == want.dtype and torch.equal(y, want), (y.dtype, want.dtype)

    same(module(*args))
    with torch.inference_mode():
        same(module(*args))
    with torch.no_grad():
        same(module(*(a.as_subclass(_Sub) for a in args)).as_subclass(torch.Tensor))
    for mode_cls in (_RecordDispatch, _RecordFunction):
        with mode_cls() as mode:
            same(module(*args))
        assert any(short in f for f in mode.seen), (mode_cls.__name__, mode.seen)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        module(*args)
    assert any(e.name == op_name for e in prof.events())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the layer's Python checks
        traced = torch.jit.trace(module, args)
    assert op_name in str(traced.graph)
    same(traced(*args))


def check_every_isa(module, reference, *, atol: float = 1e-5) -> None:
    """The module's result for single rows and batches under every CPU ISA this machine has."""
    previous = pycompress.active_cpu_isa()
    try:
        for isa in pycompress._ext.cpu_isas():
            pycompress.set_cpu_isa(isa)
            for m in (1, 5):
                x = torch.randn(m, module.in_features)
                torch.testing.assert_close(module(x), reference(x), atol=atol, rtol=atol)
    finally:
        pycompress.set_cpu_isa(previous)
