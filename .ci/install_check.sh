#!/usr/bin/env bash
# Installs pycompress as a new user would and smoke-tests each result:
#   setup  a fresh Python 3.11 venv with that Python's own pip (pinned to 23.2.1) and a current
#          setuptools (>= 80): the combination in which a setup.py-only project is sent down the
#          legacy `setup.py develop` path, which re-runs the build isolated, without torch.
#          torch is installed pinned (never unpinned: that is a multi-GB CUDA download).
#   (a)    pip install --no-build-isolation -e .        then the smoke test
#   (b)    python -m build --no-isolation               an sdist, then a wheel built from that
#                                                        sdist (so the sdist must be complete)
#          the wheel installed into a second clean venv  then the smoke test, outside the tree
# The source tree is copied first: every build directory, egg-info and venv stays under one
# temporary directory, removed at the end (PYCOMPRESS_KEEP_TMP=1 keeps it).
#
# Environment: PYTHON (default python3.11), TORCH_VERSION (default 2.13.0), MAX_JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3.11}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PIP_VERSION=23.2.1
export MAX_JOBS=${MAX_JOBS:-2}
export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
# The user's environment must not leak into the venvs.
unset PYTHONPATH PYTHONHOME PIP_REQUIRE_VIRTUALENV VIRTUAL_ENV PYCOMPRESS_SKIP_EXT || true

command -v "$PYTHON" >/dev/null || { echo "install-check: error: $PYTHON not found"; exit 1; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/pycompress-install-check.XXXXXX")
if [ "${PYCOMPRESS_KEEP_TMP:-0}" = 1 ]; then
  echo "install-check: keeping $TMP"
else
  trap 'rm -rf "$TMP"' EXIT
fi

t_start=$(date +%s)
t_last=$t_start
TIMES=()
lap() {  # lap NAME: records the seconds since the previous lap
  local now; now=$(date +%s)
  TIMES+=("$(printf '%-44s %5ds' "$1" $((now - t_last)))")
  t_last=$now
}
say() { echo; echo "--- install-check: $*"; }
quiet() {  # runs a command with its output in a log, shown only when it fails
  local log; log=$(mktemp "$TMP/log.XXXXXX")
  if ! "$@" >"$log" 2>&1; then
    grep -v 'is ignored: it is neither a file nor a directory' "$log" | tail -60
    echo "install-check: FAILED: $*"
    exit 1
  fi
}

new_venv() {  # new_venv DIR: Python 3.11 venv, pip 23.2.1, setuptools >= 80, torch pinned
  "$PYTHON" -m venv "$1"
  quiet "$1/bin/python" -m pip install "pip==$PIP_VERSION"
  quiet "$1/bin/python" -m pip install -U "setuptools>=80"
  quiet "$1/bin/python" -m pip install "torch==$TORCH_VERSION"
  "$1/bin/python" - "$PIP_VERSION" <<'EOF'
import sys
from importlib.metadata import version
pip_v, st_v = version("pip"), version("setuptools")
print(f"venv: Python {sys.version.split()[0]}, pip {pip_v}, setuptools {st_v}, torch {version('torch')}")
assert pip_v == sys.argv[1], f"pip {pip_v}, expected {sys.argv[1]}"
assert int(st_v.split(".")[0]) >= 80, f"setuptools {st_v}, expected >= 80"
EOF
}

# smoke VENV EXPECTED_DIR: import, extension loaded from EXPECTED_DIR, an Int8Linear forward
# against a float reference, the console script. Runs from an empty directory.
smoke() {
  mkdir -p "$TMP/cwd"
  (cd "$TMP/cwd" && "$1/bin/python" - "$2" <<'EOF'
import os
import sys

import torch

import pycompress
import pycompress._C as C
from pycompress.nn import Int8Linear

want = os.path.realpath(sys.argv[1])
for mod in (pycompress, C):
    where = os.path.realpath(mod.__file__)
    assert where.startswith(want + os.sep), f"{mod.__name__} imported from {where}, expected under {want}"
print(f"pycompress {pycompress.__version__} from {os.path.dirname(pycompress.__file__)}")
print(f"extension {os.path.basename(C.__file__)}")

torch.manual_seed(0)
lin = torch.nn.Linear(64, 48)
x = torch.randn(5, 64)
q = Int8Linear.from_float(lin)
with torch.no_grad():
    y, y_float = q(x), lin(x)
    # Reference of the w8a8 arithmetic: per-token int8 activations, per-channel int8 weights.
    xs = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
    xq = torch.round(x / xs).clamp(-127, 127)
    y_ref = (xq.double() @ q.weight.double().t()) * xs.double() * q.weight_scale.double() + q.bias.double()
err_ref = ((y.double() - y_ref).norm() / y_ref.norm()).item()
err_float = ((y - y_float).norm() / y_float.norm()).item()
print(f"Int8Linear vs int8 reference: rel. error {err_ref:.2e}; vs float: {err_float:.2e}")
assert err_ref < 1e-4, err_ref
assert err_float < 0.02, err_float
EOF
  )
  local help="$TMP/help.txt"
  (cd "$TMP/cwd" && "$1/bin/pycompress" --help >"$help")
  grep -q demo "$help" || { cat "$help"; echo "install-check: FAILED: pycompress --help"; exit 1; }
  echo "pycompress --help: ok ($(wc -l <"$help") lines)"
}

say "copying the source tree to $TMP/src"
mkdir -p "$TMP/src"
if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
  # Tracked and untracked-but-not-ignored files: what a clone plus local edits would hold.
  git -C "$ROOT" ls-files -z -co --exclude-standard \
    | (cd "$ROOT" && while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done) \
    | tar -C "$ROOT" --null -T - -cf - | tar -C "$TMP/src" -xf -
else
  tar -C "$ROOT" --exclude=./.venv --exclude=./build --exclude=./dist --exclude='*.so' -cf - . \
    | tar -C "$TMP/src" -xf -
fi
lap "copy source tree"

say "build venv ($PYTHON, pip $PIP_VERSION, setuptools >= 80, torch==$TORCH_VERSION)"
new_venv "$TMP/venv-build"
# The build requirements that --no-build-isolation leaves to the user (pyproject's
# [build-system] requires, ninja for parallel compiles) and the `build` frontend.
quiet "$TMP/venv-build/bin/python" -m pip install wheel ninja build
lap "build venv"

# As with an activated venv: the build finds the venv's ninja first.
export PATH="$TMP/venv-build/bin:$PATH"

say "(a) pip install --no-build-isolation -e ."
(cd "$TMP/src" && quiet "$TMP/venv-build/bin/python" -m pip install --no-build-isolation -e .)
lap "(a) editable install (compiles the extension)"
smoke "$TMP/venv-build" "$TMP/src/pycompress"
lap "(a) smoke test"

say "(b) python -m build --no-isolation (sdist, then the wheel from the sdist)"
(cd "$TMP/src" && quiet "$TMP/venv-build/bin/python" -m build --no-isolation --outdir "$TMP/dist" .)
lap "(b) sdist + wheel (compiles the extension)"
ls -l "$TMP/dist"
"$TMP/venv-build/bin/python" - "$TMP/dist" "$TMP/src" <<'EOF'
import glob
import os
import sys
import tarfile
import zipfile

dist, src = sys.argv[1], sys.argv[2]
(sdist,) = glob.glob(os.path.join(dist, "pycompress-*.tar.gz"))
(wheel,) = glob.glob(os.path.join(dist, "pycompress-*.whl"))
with tarfile.open(sdist) as t:
    names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
need = {"pyproject.toml", "setup.py", "README.md", "MANIFEST.in"}
for d in ("csrc", "requirements"):
    for dirpath, _, files in os.walk(os.path.join(src, d)):
        need.update(os.path.relpath(os.path.join(dirpath, f), src) for f in files)
need.update(os.path.relpath(p, src) for p in glob.glob(os.path.join(src, "pycompress", "**", "*.py"), recursive=True))
missing = sorted(need - names)
assert not missing, f"sdist lacks {missing}"
stray = sorted(n for n in names if n.endswith((".so", ".o", ".pyc")))
assert not stray, f"sdist holds build products {stray}"
print(f"sdist: {len(names)} entries, all of csrc/, requirements/ and pycompress/*.py")
with zipfile.ZipFile(wheel) as z:
    wnames = z.namelist()
    (ep,) = [n for n in wnames if n.endswith(".dist-info/entry_points.txt")]
    entry = z.read(ep).decode()
assert any(n.startswith("pycompress/_C") and n.endswith(".so") for n in wnames), "wheel lacks pycompress/_C*.so"
assert "pycompress = pycompress.cli:main" in entry, entry
assert not any(n.startswith(("csrc/", "tests/", "bench/")) for n in wnames), "wheel holds non-package files"
print(f"wheel: {os.path.basename(wheel)}, {len(wnames)} files, extension and console script present")
EOF
lap "(b) sdist and wheel contents"

say "(b) the wheel in a second clean venv"
new_venv "$TMP/venv-wheel"
lap "(b) second venv"
quiet "$TMP/venv-wheel/bin/python" -m pip install "$TMP"/dist/pycompress-*.whl
lap "(b) wheel install"
site=$("$TMP/venv-wheel/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
smoke "$TMP/venv-wheel" "$site/pycompress"
lap "(b) smoke test"

echo
echo "install-check: passed. Timings:"
printf '  %s\n' "${TIMES[@]}"
printf '  %-44s %5ds\n' "total" $(( $(date +%s) - t_start ))
