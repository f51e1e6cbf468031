"""The package's structure: no import cycles, imports only go down the layers, missing extras are named."""

from __future__ import annotations

import ast
import builtins
import pathlib

import pytest

import pycompress
from pycompress import _optional

ROOT = pathlib.Path(pycompress.__file__).parent

# Lower layers never import higher ones: base -> ops -> nn -> {quantization, pruning, export}
# -> evaluation -> distillation -> recipe -> the package's public API -> demo -> cli.
RANK = {
    "_version": 0, "_utils": 0, "_optional": 0, "_C": 0, "_ext": 1,
    "ops": 2, "nn": 3, "quantization": 4, "pruning": 4, "export": 4,
    "evaluation": 5, "distillation": 6, "recipe": 7, "": 8, "demo": 9, "cli": 10, "__main__": 11,
}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """Every pycompress module ``name`` imports, at module level or inside functions."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods) | {"pycompress._C"}
    return {n: _imports(n, p, known) for n, p in mods.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                cycle = stack[stack.index(m):] + [m]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_imports_go_down_the_layers():
    bad = []
    for n, deps in _graph().items():
        for d in deps:
            a, b = _layer(n), _layer(d)
            assert a in RANK and b in RANK, f"{n} or {d} belongs to no layer: add it to RANK"
            if a != b and RANK[a] <= RANK[b]:
                bad.append(f"{n} imports {d}")
    assert not bad, "imports that go up or sideways: " + "; ".join(sorted(bad))


def test_cycle_check_can_fail(tmp_path, monkeypatch):
    # the checker sees function-level imports too
    assert "pycompress.export.serialization" in _graph()["pycompress.evaluation.evaluate"]
    src = "def f():\n    import pycompress\n"
    known = {"pycompress", "pycompress.nn"}
    p = tmp_path / "x.py"
    p.write_text(src)
    assert _imports("pycompress.nn.x", p, known) == {"pycompress"}


def test_public_api_names():
    for name in ("quantize", "prune", "GradualPruning", "deploy_pruned", "compact", "CompactionReport",
                 "validate", "ValidationReport", "evaluate", "compare", "EvaluationReport", "compress",
                 "CompressionReport", "save", "load", "finetune", "distill", "precompute_teacher_logits",
                 "TeacherLogitsDataset", "export_onnx", "distributed", "nn", "ops"):
        assert name in pycompress.__all__ and getattr(pycompress, name) is not None, name
    assert callable(pycompress.quantize) and callable(pycompress.prune)


@pytest.mark.parametrize("module,extra", [("onnxruntime", "onnx"), ("sklearn.datasets", "demo"),
                                          ("matplotlib.figure", "plot")])
def test_missing_extra_is_named(module, extra, monkeypatch):
    real_import = builtins.__import__
    top = module.split(".")[0]

    def fake_import(name, *args, **kwargs):
        if name == top or name.startswith(top + "."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=top)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    import importlib

    monkeypatch.setattr(importlib, "import_module", lambda n: fake_import(n))
    with pytest.raises(_optional.MissingDependencyError, match=rf"pip install 'pycompress\[{extra}\]'"):
        _optional.require(module, "something")
    with pytest.raises(ModuleNotFoundError):  # still a ModuleNotFoundError for code that catches that
        _optional.require(module, "something")


def test_demo_names_the_demo_extra(monkeypatch):
    from pycompress import demo

    def missing(module, purpose, extra=None):
        raise _optional.MissingDependencyError(f"{purpose} needs {module}: pip install 'pycompress[{extra}]'")

    monkeypatch.setattr(demo._optional, "require", missing)
    with pytest.raises(_optional.MissingDependencyError, match=r"pycompress\[demo\]"):
        demo.run_demo("unused", quick=True)
