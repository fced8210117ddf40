"""Test configuration. Triton kernels run on CPU tensors under the Triton interpreter here, which
must be switched on before triton is imported anywhere."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@pytest.fixture(autouse=True)
def _seed_and_backend():
    """Every test starts from a fixed seed and the default backend."""
    import fastvid
    torch.manual_seed(0)
    with fastvid.backend("auto"):
        yield
