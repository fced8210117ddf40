"""The oracle package ``fastvid.reference`` stands on its own (it imports nothing it checks), and the
layers without a kernel twin of their own are checked against it: AttentionConvLSTM in fp64, values and
gradients."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastvid
from fastvid.nn import AttentionConvLSTM
from fastvid.reference.attention_lstm import attention_convlstm

PACKAGE_DIR = Path(fastvid.__file__).parent

# Imports fastvid.reference and every module in it without running fastvid/__init__.py (which imports
# the whole library): a bare package object stands in for fastvid. Prints the fastvid modules loaded.
_IMPORT_REFERENCE_ALONE = """
import importlib, pkgutil, sys, types
package = types.ModuleType("fastvid")
package.__path__ = [{package_dir!r}]
sys.modules["fastvid"] = package
import fastvid.reference
for info in pkgutil.iter_modules(fastvid.reference.__path__):
    importlib.import_module("fastvid.reference." + info.name)
print(sorted(name for name in sys.modules if name.startswith(("fastvid", "triton_kernels"))))
"""


def test_reference_package_imports_nothing_it_checks():
    """A fresh interpreter imports fastvid.reference and all its modules: no fastvid.nn, fastvid.ops,
    fastvid._C or Triton kernel module gets loaded, only the reference package itself."""
    code = _IMPORT_REFERENCE_ALONE.format(package_dir=str(PACKAGE_DIR))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    loaded = eval(result.stdout.strip().splitlines()[-1])
    modules = {p.stem for p in (PACKAGE_DIR / "reference").glob("*.py") if p.stem != "__init__"}
    assert "attention_lstm" in modules
    assert set(loaded) == {"fastvid", "fastvid.reference"} | {f"fastvid.reference.{m}" for m in modules}, loaded


def _randomized(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.4)
    return layer


@pytest.mark.parametrize("motion,batch_first,with_state", [(False, True, False), (True, True, True),
                                                            (False, False, True)])
def test_attention_convlstm_matches_reference_fp64(motion, batch_first, with_state):
    layer = _randomized(AttentionConvLSTM(3, 4, kernel_size=(3, 1), attention_channels=5, attention_kernel_size=3,
                                          attention_in_channels=2 if motion else None, batch_first=batch_first,
                                          peephole=True)).double()
    g = torch.Generator().manual_seed(1)
    B, T, H, W = 2, 4, 5, 6

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()
    x = rand(B, T, 3, H, W)
    source = rand(B, T, 2, H, W) if motion else None
    state = (rand(B, 4, H, W), rand(B, 4, H, W)) if with_state else None

    def time_major(t):
        return t if (batch_first or t is None) else t.transpose(0, 1)
    output, (h_n, c_n), maps = layer(time_major(x), time_major(source), state)
    output, maps = time_major(output), time_major(maps)
    cell = layer.cell
    expected, (h_ref, c_ref), maps_ref = attention_convlstm(
        x, source, layer.input_attention.weight, layer.input_attention.bias, layer.hidden_attention.weight,
        layer.attention_score.weight, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh, cell.peephole,
        *(state or (None, None)))
    for got, want in ((output, expected), (h_n, h_ref), (c_n, c_ref), (maps, maps_ref)):
        torch.testing.assert_close(got, want)
    inputs = [x] + ([source] if motion else []) + (list(state) if with_state else []) + list(layer.parameters())
    weights = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (output, c_n, maps)]

    def loss(out, c, m):
        return sum((a * w).sum() for a, w in zip((out, c, m), weights))
    grads = torch.autograd.grad(loss(output, c_n, maps), inputs)
    grads_ref = torch.autograd.grad(loss(expected, c_ref, maps_ref), inputs)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want)


def test_attention_convlstm_reference_against_a_hand_unrolled_step():
    """The oracle itself, one step by hand with 1×1 attention and no hidden term (H_0 = 0): A is the
    spatial softmax of W_z tanh(W_xa x + b_a) and the gates see A ⊙ x."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 1, 2, 3, 3, generator=g, dtype=torch.float64)
    w_xa, b_a = torch.randn(4, 2, 1, 1, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    w_ha, w_z = torch.randn(4, 3, 1, 1, generator=g, dtype=torch.float64), torch.randn(1, 4, 1, 1, generator=g, dtype=torch.float64)
    w_ih, w_hh = torch.randn(12, 2, 1, 1, generator=g, dtype=torch.float64), torch.randn(12, 3, 1, 1, generator=g, dtype=torch.float64)
    out, (h, c), maps = attention_convlstm(x, None, w_xa, b_a, w_ha, w_z, w_ih, w_hh)
    xt = x[0, 0].reshape(2, 9)                                                  # [channels, positions]
    z = w_z.reshape(1, 4) @ torch.tanh(w_xa.reshape(4, 2) @ xt + b_a[:, None])  # [1, positions]
    a = torch.exp(z) / torch.exp(z).sum()
    gates = w_ih.reshape(12, 2) @ (a * xt)
    i, f, gg, o = torch.sigmoid(gates[:3]), torch.sigmoid(gates[3:6]), torch.tanh(gates[6:9]), torch.sigmoid(gates[9:])
    c_hand = i * gg
    torch.testing.assert_close(maps.reshape(9), a.reshape(9))
    torch.testing.assert_close(c.reshape(3, 9), c_hand)
    torch.testing.assert_close(h.reshape(3, 9), o * torch.tanh(c_hand))
