"""Which CUDA ops the C++ sources register, and which tests exercise each of them.

Shared by the CPU-side coverage test (tests/test_cuda_coverage.py) and the GPU check
(.ci/gpu_check.py), which builds its per-op pass/fail table from it. Standard library only: the
GPU check imports it before anything else works.

An op counts as registered for CUDA when a ``TORCH_LIBRARY_IMPL(pycompress, CUDA, m)`` block of
a C++/CUDA source file under csrc/ (csrc/tests excluded) calls ``m.impl("<op>", ...)``. A test
counts for an op when the op's name appears as a whole word in the test function's source or in
the source of a function of the same test module that it calls (directly or through other such
functions); it counts for a module path when one of that path's names appears there.
"""

from __future__ import annotations

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Module-level paths onto the CUDA kernels: every torch.nn.Module exported by pycompress.nn must
# be listed (tests/test_cuda_coverage.py checks it), with the names that make a test count for it.
MODULE_PATHS: dict[str, tuple[str, ...]] = {
    "nn.Int8Linear": ("Int8Linear",),
    "nn.SparseLinear": ("SparseLinear",),
    "nn.SemiSparseLinear": ("SemiSparseLinear",),
    "nn.MaskedLinear": ("MaskedLinear",),
    "nn.MaskedConv2d": ("MaskedConv2d",),
    "nn.Int8Conv2d": ("Int8Conv2d",),
    "nn.Int8MaxPool2d": ("Int8MaxPool2d",),
    "nn.Int8MultiheadAttention": ("Int8MultiheadAttention",),
    "nn.KDLoss": ("KDLoss",),
    "ops.kd_kl_div": ("kd_kl_div",),
}

_IMPL_BLOCK = re.compile(r"TORCH_LIBRARY_IMPL\s*\(\s*pycompress\s*,\s*CUDA\s*,\s*(\w+)\s*\)\s*\{")


def _block_body(text: str, open_brace: int) -> str:
    depth = 0
    for i in range(open_brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_brace + 1:i]
    raise ValueError("unbalanced braces after TORCH_LIBRARY_IMPL")


def registered_cuda_ops(root: str = ROOT) -> dict[str, str]:
    """``{op name: source file (relative to root)}`` of every op with a CUDA kernel in csrc/."""
    found: dict[str, str] = {}
    csrc = os.path.join(root, "csrc")
    for dirpath, dirnames, filenames in os.walk(csrc):
        dirnames[:] = sorted(d for d in dirnames if os.path.join(dirpath, d) != os.path.join(csrc, "tests"))
        for name in sorted(filenames):
            if not name.endswith((".cpp", ".cu", ".cc")):
                continue
            path = os.path.join(dirpath, name)
            with open(path, encoding="utf-8") as f:
                text = f.read()
            text = re.sub(r"//[^\n]*", "", text)
            for m in _IMPL_BLOCK.finditer(text):
                body = _block_body(text, m.end() - 1)
                for op in re.findall(re.escape(m.group(1)) + r"\s*\.\s*impl\s*\(\s*\"([\w.]+)\"", body):
                    found.setdefault(op.split(".")[0], os.path.relpath(path, root))
    return dict(sorted(found.items()))


def _word(name: str) -> re.Pattern:
    return re.compile(r"(?<![\w])" + re.escape(name) + r"(?![\w])")


class SourceIndex:
    """Source text of test functions (with the same-module functions they call), by node id."""

    def __init__(self, root: str = ROOT):
        self.root = root
        self._modules: dict[str, tuple[dict[str, ast.AST], dict[str, str]] | None] = {}
        self._cache: dict[tuple[str, str], str] = {}

    def _module(self, relpath: str):
        if relpath not in self._modules:
            try:
                with open(os.path.join(self.root, relpath), encoding="utf-8") as f:
                    text = f.read()
                tree = ast.parse(text)
            except (OSError, SyntaxError, ValueError):
                self._modules[relpath] = None
                return None
            defs: dict[str, ast.AST] = {}
            for node in tree.body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    defs[node.name] = node
                elif isinstance(node, ast.ClassDef):
                    for sub in node.body:
                        if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                            defs[f"{node.name}::{sub.name}"] = sub
            srcs = {k: ast.get_source_segment(text, v) or "" for k, v in defs.items()}
            self._modules[relpath] = (defs, srcs)
        return self._modules[relpath]

    def source(self, nodeid: str) -> str:
        """The source that counts for ``nodeid`` ('' when the function is not found)."""
        relpath, _, rest = nodeid.partition("::")
        func = rest.split("[", 1)[0]
        key = (relpath, func)
        if key in self._cache:
            return self._cache[key]
        mod = self._module(relpath)
        if mod is None or func not in mod[0]:
            self._cache[key] = ""
            return ""
        defs, srcs = mod
        seen, todo, parts = set(), [func], []
        while todo:
            name = todo.pop()
            if name in seen or name not in defs:
                continue
            seen.add(name)
            parts.append(srcs[name])
            for node in ast.walk(defs[name]):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in defs:
                    todo.append(node.func.id)
        self._cache[key] = "\n".join(parts)
        return self._cache[key]


def attribute(nodeids, ops, root: str = ROOT, sources: SourceIndex | None = None) -> dict[str, list[str]]:
    """``{op or module path: [node ids that count for it]}`` for the given ops and MODULE_PATHS."""
    sources = sources or SourceIndex(root)
    patterns = {op: [_word(op)] for op in ops}
    patterns.update({path: [_word(n) for n in names] for path, names in MODULE_PATHS.items()})
    out: dict[str, list[str]] = {key: [] for key in patterns}
    for nodeid in nodeids:
        src = sources.source(nodeid)
        if not src:
            continue
        for key, pats in patterns.items():
            if any(p.search(src) for p in pats):
                out[key].append(nodeid)
    return out
