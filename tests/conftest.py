"""Test configuration.

- Without a GPU the Triton kernels run on CPU tensors under the Triton interpreter, which must be
  switched on before triton is imported anywhere (here, and only here); with a GPU the suite leaves it
  off, so the Triton tests run the compiled kernels (scripts/gpu_check.sh), and turns TF32 off.
- The suite tests the compiled kernels: a missing or broken fastvid._C (or, where the build has a CUDA
  toolkit, missing CUDA kernels) fails the session instead of quietly turning every kernel test into a
  reference-vs-reference comparison. FASTVID_TEST_WITHOUT_EXTENSION=1 lifts that for a deliberate run.
- torch.compile tests get a fresh inductor cache per session (unless TORCHINDUCTOR_CACHE_DIR is set):
  inductor's FX-graph cache key does not cover a custom op's fake kernel, so graphs compiled against an
  earlier build of fastvid (e.g. before the sequence ops returned one uint8 reserve) were replayed and
  failed with "expected dtype torch.float32 but got torch.uint8".
"""
import os
import tempfile

import torch  # noqa: E402  (does not import triton)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # fp32 results are judged at fp32 precision: cuDNN's default TF32 convolutions (10-bit mantissa)
    # put the hoisted/concat convolutions ~1e-3 from a float64 run.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastvid-inductor-")

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
#: Where the Triton tests put their tensors: CPU under the interpreter, else the GPU (compiled kernels).
TRITON_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def pytest_sessionstart(session):
    if os.environ.get("FASTVID_TEST_WITHOUT_EXTENSION") == "1":
        return
    import fastvid
    from fastvid import _backend
    if _backend.EXTENSION_ERROR is not None:
        raise pytest.UsageError(f"fastvid._C failed to load ({_backend.EXTENSION_ERROR}): the tests need the "
                                "compiled kernels. Build them (bash scripts/setup.sh) or set "
                                "FASTVID_TEST_WITHOUT_EXTENSION=1 to run against the reference on purpose.")
    if os.environ.get("FASTVID_EXPECT_CUDA_KERNELS") == "1" and not fastvid.info()["cuda_compiled"]:
        raise pytest.UsageError("FASTVID_EXPECT_CUDA_KERNELS=1 but fastvid._C has no CUDA kernels")


@pytest.fixture(autouse=True)
def _seed_and_backend():
    """Every test starts from a fixed seed and the default backend (set_backend's process default; a
    `with backend(...)` block resets itself on exit)."""
    import fastvid
    torch.manual_seed(0)
    fastvid.set_backend("auto")
    yield
    fastvid.set_backend("auto")
