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
