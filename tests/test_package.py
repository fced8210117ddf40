"""Package-level behaviour: info(), the CLI, and import without the compiled extension."""
import subprocess
import sys
import textwrap

import fastvid


def test_info_keys_and_types():
    info = fastvid.info()
    for key in ("version", "torch", "cpu_kernels", "cuda_compiled", "cuda_available", "triton_available"):
        assert key in info
    assert info["version"] == fastvid.__version__
    assert isinstance(info["cpu_kernels"], bool) and isinstance(info["cuda_compiled"], bool)


def test_cli_info_prints_the_dict():
    out = subprocess.run([sys.executable, "-m", "fastvid", "info"], capture_output=True, text=True, check=True)
    assert "cpu_kernels" in out.stdout and fastvid.__version__ in out.stdout


def test_import_does_not_load_dynamo():
    """`import fastvid` leaves torch._dynamo unimported, as `import torch` does (it cost ~1 s of import
    time, and dynamo's import makes a cache directory: with no writable temp dir the import failed)."""
    code = "import sys, fastvid; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_import_without_extension_falls_back_to_reference_with_one_warning():
    """With fastvid._C unimportable, import works, warns once, and the layers run on the reference."""
    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["fastvid._C"] = None  # makes `from fastvid import _C` raise ImportError
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fastvid
            import torch
            from fastvid.nn import ConvLSTM
            torch.manual_seed(0)
            m = ConvLSTM(3, 4)
            x = torch.randn(2, 3, 3, 5, 6)
            out, (h, c) = m(x)
            out.sum().backward()
        msgs = [str(w.message) for w in caught if "compiled kernels unavailable" in str(w.message)]
        assert len(msgs) == 1, msgs
        assert fastvid.info()["cpu_kernels"] is False
        with fastvid.backend("reference"):
            ref, _ = m(x)
        assert torch.equal(out, ref)
        assert m.weight_ih_l0.grad is not None
        try:
            with fastvid.backend("cpu"):
                m(x)
        except RuntimeError as e:
            assert "not built" in str(e)
        else:
            raise AssertionError("forcing the cpu backend without _C must fail")
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


# ---- build archs, routing by compute capability, backend scope, build isolation, required extension

import os  # noqa: E402
import re  # noqa: E402
import threading  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from fastvid import _backend  # noqa: E402
from _setup_py import setup_py_namespace  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class _FakeCuda:
    def __init__(self, capabilities):
        self.capabilities = capabilities

    def is_available(self):
        return bool(self.capabilities)

    def device_count(self):
        return len(self.capabilities)

    def get_device_capability(self, i):
        return self.capabilities[i]


class _FakeTorch:
    def __init__(self, capabilities):
        self.cuda = _FakeCuda(capabilities)


def test_default_cuda_archs_cover_the_gpus_users_have(monkeypatch):
    """Without TORCH_CUDA_ARCH_LIST: the visible GPUs when there are any (newest + PTX), else Turing to
    Blackwell as SASS plus PTX of the newest. The old default (9.0 only, no PTX) served only Hopper."""
    ns = setup_py_namespace()
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert ns["cuda_arch_list"](_FakeTorch([])) == "7.5;8.0;8.6;8.9;9.0;10.0+PTX"
    assert ns["cuda_arch_list"](_FakeTorch([(8, 6), (8, 0), (8, 6)])) == "8.0;8.6+PTX"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert ns["cuda_arch_list"](_FakeTorch([(8, 6)])) == "9.0"
    flags = ["-gencode=arch=compute_75,code=sm_75", "-gencode=arch=compute_100,code=sm_100",
             "-gencode=arch=compute_100,code=compute_100", "-gencode=arch=compute_90,code=sm_90"]
    assert ns["compiled_cuda_archs"](flags) == ["sm_75", "sm_90", "compute_100", "sm_100"]
    for script in ("scripts/setup.sh", "scripts/rebuild.sh"):  # no user-facing script pins a default arch
        assert "${TORCH_CUDA_ARCH_LIST:-" not in (ROOT / script).read_text(), script


def test_nvcc_flags_of_a_multi_arch_build_compile_cuda_headers(tmp_path):
    """nvcc splits option values at commas: the arch list passed as -DFASTVID_CUDA_ARCHS=sm_75,sm_80,...
    defined sm_80 etc. as macros, and every .cu failed in CUDA's <nv/target> on the default (multi-arch)
    build; CI builds one arch, so only this test sees it. Compiles a .cu with setup.py's nvcc flags."""
    ns = setup_py_namespace()
    archs = ["sm_75", "sm_80", "sm_90", "compute_100", "sm_100"]
    cxx_defines, nvcc_defines = ns["cuda_defines"](archs)
    assert any("sm_80,sm_90" in d for d in cxx_defines)  # ops.cpp still gets the list
    home = ns["find_cuda_home"]()
    nvcc = Path(home, "bin", "nvcc") if home else None
    if nvcc is None or not nvcc.exists():
        pytest.skip("no CUDA toolkit: the flags cannot be preprocessed here")
    source = tmp_path / "probe.cu"
    source.write_text("#include <nv/target>\n#include <cuda_runtime.h>\n__global__ void k() {}\n")
    out = subprocess.run([str(nvcc), "-c", "-std=c++20", "-arch=sm_90", *nvcc_defines, str(source),
                          "-o", str(tmp_path / "probe.o")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_info_reports_the_compiled_cuda_archs():
    archs = fastvid.info()["cuda_archs"]
    assert isinstance(archs, list)
    assert bool(archs) == fastvid.info()["cuda_compiled"]
    assert all(re.fullmatch(r"(sm|compute)_\d+a?", a) for a in archs), archs


@pytest.mark.parametrize("archs, capability, served", [
    (["sm_90"], (9, 0), True),
    (["sm_90"], (8, 0), False),            # SASS does not run on an older major
    (["sm_90"], (10, 0), False),           # nor on a newer major (needs PTX)
    (["sm_80"], (8, 6), True),             # same major, newer minor: binary compatible
    (["sm_86"], (8, 0), False),            # same major, older minor: not
    (["sm_80", "compute_90"], (12, 0), True),   # PTX JIT-compiles for newer GPUs
    (["compute_90"], (8, 9), False),       # but not for older ones
    (["sm_90a"], (9, 0), True),
    (["sm_90a"], (10, 0), False),          # arch-specific code runs on its exact arch only
    ([], (9, 0), False),
])
def test_arch_serves(archs, capability, served):
    assert _backend.arch_serves(archs, capability) is served


def test_auto_routes_a_gpu_the_build_does_not_serve_to_triton_then_reference(monkeypatch):
    """A device no compiled SASS/PTX serves goes to Triton (else the reference) with one warning, never
    an exception; forcing 'cuda' there explains why it cannot run."""
    monkeypatch.setattr(_backend, "cuda_compiled", lambda: True)
    monkeypatch.setattr(_backend, "cuda_archs", lambda: ("sm_90",))
    monkeypatch.setattr(_backend, "_devices", lambda tensors: {"cuda"})
    monkeypatch.setattr(_backend, "_cuda_capabilities", lambda tensors: {"cuda:0": (8, 6)})
    monkeypatch.setattr(_backend, "_warned_capabilities", set())
    for triton_ok, expected in ((True, "triton"), (False, "reference")):
        monkeypatch.setattr(_backend, "triton_importable", lambda: triton_ok)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert _backend.resolve({"x": None}) == expected
            assert _backend.resolve({"x": None}) == expected
        assert len([w for w in caught if "compute capability 8.6" in str(w.message)]) == (1 if triton_ok else 0)
    with fastvid.backend("cuda"), pytest.raises(RuntimeError, match=r"no compiled kernel image serves cuda:0"):
        _backend.resolve({"x": None})
    monkeypatch.setattr(_backend, "_cuda_capabilities", lambda tensors: {"cuda:0": (9, 0)})
    assert _backend.resolve({"x": None}) == "cuda"


def test_set_backend_is_process_wide_and_backend_block_is_context_local():
    """set_backend reaches threads started later (DataParallel replicas, thread pools); a `with
    backend(...)` block overrides it only in its own thread."""
    seen = {}

    def probe(key):
        seen[key] = fastvid.get_backend()

    fastvid.set_backend("reference")
    try:
        t = threading.Thread(target=probe, args=("thread after set_backend",))
        t.start(); t.join()
        with fastvid.backend("cpu"):
            probe("inside block")
            t = threading.Thread(target=probe, args=("thread started inside block",))
            t.start(); t.join()
        probe("after block")
    finally:
        fastvid.set_backend("auto")
    assert seen == {"thread after set_backend": "reference", "inside block": "cpu",
                    "thread started inside block": "reference", "after block": "reference"}
    with pytest.raises(ValueError, match="backend must be one of"):
        fastvid.set_backend("gpu")


def test_build_without_importable_torch_says_to_use_no_build_isolation():
    """`pip install .` builds in an isolated env without torch: setup.py must stop with one clear sentence."""
    code = ("import sys, runpy; sys.modules['torch'] = None; sys.argv = ['setup.py', 'egg_info']; "
            "runpy.run_path('setup.py', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0
    assert "--no-build-isolation" in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert 'requires = ["setuptools>=64", "wheel"]' in (ROOT / "pyproject.toml").read_text()


def test_suite_fails_when_the_compiled_extension_is_missing(tmp_path):
    """With fastvid._C unimportable the test session (this suite's conftest) must fail, not skip its way
    to green."""
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "test_probe.py").write_text("def test_nothing():\n    pass\n")
    code = ("import sys; sys.modules['fastvid._C'] = None; import pytest; "
            f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', {str(tmp_path)!r}]))")
    env = {k: v for k, v in os.environ.items() if k != "FASTVID_TEST_WITHOUT_EXTENSION"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
    assert out.returncode != 0, out.stdout[-2000:]
    assert "fastvid._C failed to load" in out.stdout + out.stderr


def test_only_conftest_switches_the_triton_interpreter_on():
    """conftest sets TRITON_INTERPRET=1 only where no GPU is visible. A test module setting it too made
    every Triton test on a GPU machine run interpreted on CPU tensors (the H200 run of 2026-12-04)."""
    setters = [path.name for path in sorted((ROOT / "tests").glob("*.py"))
               if path.name != "conftest.py" and re.search(r"environ(\.setdefault\(|\[)\s*[\"']TRITON_INTERPRET",
                                                           path.read_text())]
    assert setters == [], f"test modules that set TRITON_INTERPRET: {setters}"
