"""The compiled library of jit_unlearn, jit_unlearn/_C (C++ CPU kernels, plus CUDA kernels when a GPU
is visible or FORCE_CUDA=1); everything else about the package is in pyproject.toml.  Compile-only
CUDA builds need CUDA_HOME and TORCH_CUDA_ARCH_LIST; JIT_UNLEARN_NO_EXTENSION=1 builds none."""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("JIT_UNLEARN_NO_EXTENSION") == "1":
        print("jit_unlearn build: JIT_UNLEARN_NO_EXTENSION=1, pure-PyTorch package only")
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    with_cuda = CUDA_HOME is not None and (torch.cuda.is_available() or force_cuda)
    if force_cuda and CUDA_HOME is None:
        sys.exit("jit_unlearn build: FORCE_CUDA=1 but no CUDA toolkit was found; set CUDA_HOME")

    sources = ["csrc/registration.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -fno-math-errno lets sqrtf vectorise; sqrt is correctly rounded with or without it.
    # -fno-trapping-math: no FP exception is ever trapped, so selects whose arms divide may if-convert
    # and vectorise (ssd_dampen_'s dense pass); IEEE results are unchanged (no contraction or reassociation).
    cxx = [
        "-O3",
        "-std=c++20",
        "-fopenmp",
        "-ffp-contract=off",
        "-fno-fast-math",
        "-fno-math-errno",
        "-fno-trapping-math",
    ]
    extra_compile_args = {"cxx": cxx}
    extension = CppExtension
    define_macros = []
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        extension = CUDAExtension
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("WITH_CUDA", None))
        # --fmad=false: no FMA contraction, so the shared float formulas round exactly as on the CPU.
        extra_compile_args["nvcc"] = ["-O3", "-std=c++20", "--fmad=false", "--expt-relaxed-constexpr"]
        # The torch wheel bundles CUDA headers (cusparse.h, ...) a bare toolkit may lack.
        for sp in sys.path:
            bundled = os.path.join(sp, "nvidia", "cu13", "include")
            if os.path.isdir(bundled):
                include_dirs.append(bundled)
                break
    print(
        "jit_unlearn build configuration:\n"
        f"  torch           {torch.__version__} (CUDA {torch.version.cuda})\n"
        f"  CPU kernels     yes ({len(glob.glob('csrc/cpu/*.cpp'))} sources, OpenMP)\n"
        f"  CUDA kernels    {'yes' if with_cuda else 'no'}"
        + (f" ({len(glob.glob('csrc/cuda/*.cu'))} sources)" if with_cuda else "")
        + "\n"
        f"  CUDA_HOME       {CUDA_HOME}\n"
        f"  FORCE_CUDA      {int(force_cuda)}; GPU visible: {torch.cuda.is_available()}\n"
        f"  arch list       {os.environ.get('TORCH_CUDA_ARCH_LIST', '(default)')}",
        flush=True,
    )
    ext = extension(
        "jit_unlearn._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
