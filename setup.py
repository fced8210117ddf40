"""Builds fastvid and its extension fastvid._C.

C++ CPU kernels are always built. CUDA kernels are built when a CUDA toolkit and a CUDA build of
torch are present (a GPU is not needed to compile). Environment:
  FASTVID_CPU_ONLY=1     skip the CUDA kernels
  FORCE_CUDA=1           fail instead of skipping when the CUDA toolkit is not found
  TORCH_CUDA_ARCH_LIST   CUDA archs to build (default: the visible GPUs; without one, DEFAULT_CUDA_ARCHS)
  CUDA_HOME              the toolkit root (otherwise resolved from nvcc, see find_cuda_home)
Install with `pip install --no-build-isolation -e .` (the build compiles against the installed torch).
"""
import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# Without a visible GPU: Turing, Ampere (A100; RTX 30, A10/A40), Ada (RTX 40, L4, L40), Hopper, Blackwell
# (B200) as SASS, plus PTX of the newest so later GPUs JIT-compile it. CUDA 13 dropped sm < 7.5.
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0;10.0+PTX"

NO_TORCH_MESSAGE = (
    "fastvid-kernels compiles its C++/CUDA kernels against the torch you run, so it must be built with "
    "that torch importable: install torch first, then `pip install --no-build-isolation .` (an isolated "
    "build would compile against a different torch and break the ABI)")


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


def cpu_sources(root="."):
    """fastvid._C's C++ sources (the CUDA build adds csrc/*/*_cuda.cu): the op schemas and ISA dispatch
    (csrc/*.cpp), each family's CPU kernels and its device-generic op wrappers."""
    patterns = ("csrc/*.cpp", "csrc/*/*_cpu.cpp", "csrc/*/*_ops.cpp")
    return [os.path.relpath(path, root) for pattern in patterns for path in sorted(glob.glob(os.path.join(root, pattern)))]


def cuda_arch_list(torch):
    """TORCH_CUDA_ARCH_LIST if set; else the visible GPUs' capabilities (newest + PTX), as torch would pick
    them; else DEFAULT_CUDA_ARCHS. Set explicitly so the build records exactly what it compiled."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    visible = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}) \
        if torch.cuda.is_available() else []
    if not visible:
        return DEFAULT_CUDA_ARCHS
    return ";".join(f"{major}.{minor}" for major, minor in visible) + "+PTX"


def compiled_cuda_archs(arch_flags):
    """['sm_80', 'compute_90', ...] from nvcc's -gencode flags: SASS (sm_XY) and PTX (compute_XY)."""
    archs = set()
    for flag in arch_flags:
        archs.update(re.findall(r"code=((?:sm|compute)_\d+a?)", flag))
    return sorted(archs, key=lambda a: (int(re.sub(r"\D", "", a)), a))


def cuda_defines(archs):
    """Preprocessor flags of a CUDA build: (for the C++ sources, for nvcc). Only ops.cpp reads the arch
    list (fastvid._C.cuda_archs, which fastvid.info() reports and auto routing checks), and it must not
    reach nvcc: nvcc splits option values at commas, so -DFASTVID_CUDA_ARCHS=sm_80,sm_90 would also
    define sm_90 as a macro and break CUDA's own <nv/target>."""
    return ["-DFASTVID_WITH_CUDA", "-DFASTVID_CUDA_ARCHS=" + ",".join(archs)], ["-DFASTVID_WITH_CUDA"]


def extensions():
    cpu_only = os.environ.get("FASTVID_CPU_ONLY", "0") == "1"
    cuda_home = None if cpu_only else find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # before cpp_extension reads it at import
    try:
        import torch
    except ImportError as exc:
        raise SystemExit(f"{NO_TORCH_MESSAGE} ({exc})") from None
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    with_cuda = not cpu_only and cuda_home is not None and torch.version.cuda is not None
    if os.environ.get("FORCE_CUDA", "0") == "1" and not with_cuda:
        raise RuntimeError(f"FORCE_CUDA=1 but no CUDA build is possible (toolkit: {cuda_home}, "
                           f"torch CUDA: {torch.version.cuda}, FASTVID_CPU_ONLY={int(cpu_only)})")
    sources = cpu_sources()
    # -fno-math-errno/-fno-trapping-math let gcc vectorise the gate loops (no libm errno, no FP traps);
    # -fopenmp makes at::parallel_for parallel (without _OPENMP its header falls back to a serial loop).
    # -g0 overrides the -g in Python's own CFLAGS: the templated kernels' debug info made a 115 MB library
    # and ~40 % of the compile time; without it the CPU-only library is ~12 MB (symbol names stay, for perf).
    cxx = ["-O3", "-g0", "-std=c++20", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]
    link = ["-fopenmp"]
    if not with_cuda:
        print(f"fastvid: building CPU kernels only (toolkit: {cuda_home}, torch CUDA: {torch.version.cuda})")
        return [CppExtension("fastvid._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)]
    from torch.utils.cpp_extension import _get_cuda_arch_flags
    os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list(torch)
    archs = compiled_cuda_archs(_get_cuda_arch_flags())
    print(f"fastvid: building CPU and CUDA kernels (toolkit {cuda_home}, "
          f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}: {' '.join(archs)})")
    cxx_defines, nvcc_defines = cuda_defines(archs)
    return [CUDAExtension(
        "fastvid._C", sources + sorted(glob.glob("csrc/*/*_cuda.cu")),
        include_dirs=cuda_library_includes(),
        extra_link_args=link,
        extra_compile_args={"cxx": cxx + cxx_defines, "nvcc": ["-O3", "-std=c++20"] + nvcc_defines},
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
    install_requires=["torch>=2.9"],  # the oldest torch tested (README: Torch versions)
    extras_require={"test": ["pytest", "pytest-benchmark", "numpy", "expecttest"]},
    entry_points={"console_scripts": ["fastvid=fastvid.__main__:main"]},
)
