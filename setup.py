"""Builds fastvid and its extension fastvid._C.

C++ CPU kernels are always built. CUDA kernels are built when a CUDA toolkit and a CUDA build of
torch are present (a GPU is not needed to compile). Environment:
  FASTVID_CPU_ONLY=1     skip the CUDA kernels
  FORCE_CUDA=1           fail instead of skipping when the CUDA toolkit is not found
  TORCH_CUDA_ARCH_LIST   CUDA archs to build (default here: "8.0;9.0+PTX")
  CUDA_HOME              the toolkit root (otherwise resolved from nvcc, see find_cuda_home)
Install with `pip install --no-build-isolation -e .` (the build imports the installed torch).
"""
import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(ROOT, "fastvid", "_version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def find_cuda_home():
    """The toolkit root. The `nvcc` on PATH may be a wrapper script outside the toolkit (it is on
    the project's build machines), which makes torch guess CUDA_HOME wrong: follow the wrapper."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and os.path.exists(os.path.join(os.environ[var], "bin", "nvcc")):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        nvcc = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(nvcc)))
        try:  # a wrapper script: look for the toolkit path it execs
            with open(nvcc, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                candidates += [os.path.dirname(os.path.dirname(p.decode()))
                               for p in re.findall(rb"(/[\w./+-]+/bin/nvcc)\b", head)]
        except OSError:
            pass
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True) + ["/usr/local/cuda"]
    for root in candidates:
        if os.path.isfile(os.path.join(root, "bin", "nvcc")) and \
                os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None


def cuda_library_includes():
    """torch's CUDA headers include cusparse.h / cublas_v2.h; a toolkit without the math libraries
    lacks them, but the pip CUDA packages installed with torch carry them."""
    for path in sys.path:
        inc = os.path.join(path, "nvidia", "cu13", "include")
        if os.path.isfile(os.path.join(inc, "cublas_v2.h")):
            return [inc]
    return []


def extensions():
    cpu_only = os.environ.get("FASTVID_CPU_ONLY", "0") == "1"
    cuda_home = None if cpu_only else find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # before cpp_extension reads it at import
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    with_cuda = not cpu_only and cuda_home is not None and torch.version.cuda is not None
    if os.environ.get("FORCE_CUDA", "0") == "1" and not with_cuda:
        raise RuntimeError(f"FORCE_CUDA=1 but no CUDA build is possible (toolkit: {cuda_home}, "
                           f"torch CUDA: {torch.version.cuda}, FASTVID_CPU_ONLY={int(cpu_only)})")
    sources = ["csrc/ops.cpp", "csrc/cpu_isa.cpp"] + sorted(glob.glob("csrc/*/*_cpu.cpp")) + sorted(glob.glob("csrc/*/*_ops.cpp"))
    # -fno-math-errno/-fno-trapping-math let gcc vectorise the gate loops (no libm errno, no FP traps);
    # -fopenmp makes at::parallel_for parallel (without _OPENMP its header falls back to a serial loop).
    cxx = ["-O3", "-std=c++20", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]
    link = ["-fopenmp"]
    if not with_cuda:
        print(f"fastvid: building CPU kernels only (toolkit: {cuda_home}, torch CUDA: {torch.version.cuda})")
        return [CppExtension("fastvid._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)]
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    print(f"fastvid: building CPU and CUDA kernels (toolkit {cuda_home}, "
          f"archs {os.environ['TORCH_CUDA_ARCH_LIST']})")
    return [CUDAExtension(
        "fastvid._C", sources + sorted(glob.glob("csrc/*/*_cuda.cu")),
        define_macros=[("FASTVID_WITH_CUDA", None)],
        include_dirs=cuda_library_includes(),
        extra_link_args=link,
        extra_compile_args={"cxx": cxx + ["-DFASTVID_WITH_CUDA"],
                            "nvcc": ["-O3", "-std=c++20", "-DFASTVID_WITH_CUDA"]},
    )]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension
    return BuildExtension.with_options(use_ninja=True)


setup(
    name="fastvid-kernels",  # the PyPI name `fastvid` belongs to an unrelated project
    version=read_version(),
    description="Fused ConvLSTM/ConvGRU, separable 3D conv and nonlocal attention kernels for PyTorch video models",
    python_requires=">=3.10",
    packages=find_packages(include=["fastvid", "fastvid.*"]) + ["fastvid.triton_kernels"],
    # The Triton kernels live in triton_kernels/ and install as fastvid.triton_kernels: an unrelated
    # PyPI package already owns the top-level name `triton_kernels`.
    package_dir={"fastvid.triton_kernels": "triton_kernels"},
    ext_modules=extensions(),
    cmdclass={"build_ext": build_ext_class()},
    install_requires=["torch>=2.6"],
    extras_require={"test": ["pytest", "pytest-benchmark", "numpy", "expecttest"]},
    entry_points={"console_scripts": ["fastvid=fastvid.__main__:main"]},
)
