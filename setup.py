"""Builds unlearn_fast._C: C++ CPU kernels always, CUDA kernels when torch has CUDA and nvcc exists.

Triton kernels (kernels/) ship inside the package as unlearn_fast.kernels.
"""
import glob
import os
import shutil

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda():
    # CUDA kernels need a CUDA build of torch (headers + libs) and nvcc; otherwise CPU only.
    if os.environ.get("UNLEARN_FAST_NO_CUDA") == "1":
        return False
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and (
        shutil.which("nvcc") or os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    )


def _extension():
    cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp-simd", "-ffp-contract=off"]
    # -march=native: vectorised inner loops for the machine that builds (CI builds where it runs).
    if os.environ.get("UNLEARN_FAST_PORTABLE") != "1":
        cxx.append("-march=native")
    if _want_cuda():
        sources = cpu_sources + sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
        return cpp_extension.CUDAExtension(
            "unlearn_fast._C",
            sources,
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx + ["-DWITH_CUDA"], "nvcc": ["-O3", "-DWITH_CUDA", "-lineinfo"]},
        )
    return cpp_extension.CppExtension("unlearn_fast._C", cpu_sources, extra_compile_args={"cxx": cxx})


setup(
    packages=["unlearn_fast", "unlearn_fast.kernels", "unlearn_fast.methods", "unlearn_fast.lm", "unlearn_fast.integrations"],
    package_dir={"unlearn_fast": "unlearn_fast", "unlearn_fast.kernels": "kernels"},
    # The Makefile installs the package with UNLEARN_FAST_SKIP_EXT=1 once, then builds _C in place
    # with `setup.py build_ext --inplace`, which ninja keeps incremental.
    ext_modules=[] if os.environ.get("UNLEARN_FAST_SKIP_EXT") == "1" else [_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
