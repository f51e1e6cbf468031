"""The pycompress C++ (and, where possible, CUDA) extension. Metadata, dependencies, extras and
the console script live in pyproject.toml.

Build with an already installed torch and without build isolation:

    pip install torch==2.13.0 setuptools wheel ninja   # or any torch >= 2.4 (CUDA builds too)
    pip install --no-build-isolation -e .

Environment:
    PYCOMPRESS_CUDA=0|1   force the CUDA kernels off / on (default: on when torch is a
                          CUDA build and nvcc is found)
    MAX_JOBS=N            parallel compile jobs
    TORCH_CUDA_ARCH_LIST  CUDA architectures (e.g. "8.0;9.0a")
    PYCOMPRESS_SKIP_EXT=1 install the Python package only (the extension was built in
                          place already, e.g. by `make build`)
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def fail(msg):
    sys.stderr.write("\nerror: " + msg.strip() + "\n\n")
    sys.exit(1)


def extension_modules():
    if os.environ.get("PYCOMPRESS_SKIP_EXT") == "1":
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension
    except ImportError:
        fail(
            "PyTorch is not installed in this environment. pycompress builds against the torch you "
            "already have: install it first (CPU machines: `pip install torch==2.13.0`; any "
            "torch >= 2.4 works), then build without isolation: "
            "`pip install --no-build-isolation -e .` (or simply `make test`)."
        )
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    if (major, minor) < (2, 4):
        fail(f"pycompress needs torch >= 2.4, found {torch.__version__}.")

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        fail(
            f"no C++ compiler found (looked for '{cxx}'). Install g++ (Debian/Ubuntu: "
            "`apt-get install g++`) or set CXX to a C++17 compiler."
        )

    want = os.environ.get("PYCOMPRESS_CUDA")
    cuda_torch = torch.version.cuda is not None
    nvcc = cpp_extension.CUDA_HOME is not None and os.path.exists(
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    )
    if want == "1":
        if not cuda_torch:
            fail("PYCOMPRESS_CUDA=1 but the installed torch is a CPU-only build.")
        if not nvcc:
            fail("PYCOMPRESS_CUDA=1 but nvcc was not found: set CUDA_HOME to the CUDA toolkit.")
        with_cuda = True
    elif want == "0":
        with_cuda = False
    else:
        with_cuda = cuda_torch and nvcc

    def srcs(pattern):
        return sorted(
            os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)
        )

    cpp = [
        s
        for s in srcs("csrc/**/*.cpp")
        if not s.startswith(os.path.join("csrc", "tests")) and not s.endswith("_cuda.cpp")
    ]
    cxx_flags = ["-O3", "-fvisibility=hidden", "-Wall", "-Wno-unused-function", "-Wno-maybe-uninitialized"]
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-Xcompiler=-fvisibility=hidden"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is a header template: without OpenMP it runs serially inside the
        # extension. libgomp resolves to the copy torch has already loaded.
        cxx_flags.append("-fopenmp")
        nvcc_flags.append("-Xcompiler=-fopenmp")
        link_flags.append("-fopenmp")
    macros = []
    if with_cuda:
        sources = cpp + srcs("csrc/**/*_cuda.cpp") + srcs("csrc/**/*.cu")
        macros.append(("PYCOMPRESS_WITH_CUDA", "1"))
        ext_cls = cpp_extension.CUDAExtension
        extra = {"cxx": cxx_flags, "nvcc": nvcc_flags}
    else:
        sources = cpp
        ext_cls = cpp_extension.CppExtension
        extra = {"cxx": cxx_flags}
    ext = ext_cls(
        name="pycompress._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=macros,
        extra_compile_args=extra,
        extra_link_args=link_flags,
    )
    print(f"pycompress: building {'CPU+CUDA' if with_cuda else 'CPU'} extension "
          f"({len(sources)} sources, torch {torch.__version__})")
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass


ext_modules, cmdclass = extension_modules()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
