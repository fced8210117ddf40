"""Fused Triton ConvLSTM / ConvGRU sequences (triton_kernels/recurrent_conv.py): the hidden convolution
and the cell in one launch per step, reached through ``fastvid.backend("triton")``.

Without a GPU under ``TRITON_INTERPRET=1`` on CPU tensors (tests/conftest.py; shapes tiny: the interpreter's tl.dot is slow). The oracle
is fastvid.reference run in float64 on the same rounded inputs; bf16/fp16 by the flash-attention rule
with the reference run in that dtype as yardstick (tests/_recurrent_samples.assert_parity). Every
parity test also counts the Triton launches of the forward: exactly one fused launch per step.
"""
import os

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import fastvid  # noqa: E402
from fastvid.reference import recurrent as ref  # noqa: E402
from fastvid.triton_kernels import recurrent as tk  # noqa: E402
from fastvid.triton_kernels import recurrent_conv as tc  # noqa: E402
from fastvid.triton_kernels.attention import SHARED_MEMORY_LIMITS  # noqa: E402

from _recurrent_samples import (  # noqa: E402
    LOW_PRECISION, SeqConfig, acc_dtype, assert_parity, dtype_id, make_seq_sample, upstream_grads,
)

if not tc.AVAILABLE:
    pytest.skip("triton unavailable", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from conftest import TRITON_DEVICE as DEVICE  # noqa: E402
STEP_KERNEL = "_conv_cell_step_kernel"
BALLAS_KERNELS = ("_ballas_reset_kernel", "_ballas_cell_kernel")

# (B, T, C_in, C, H, W): C, H, W not powers of two; C = 5 pads to one 16-wide tile.
SHAPE = (2, 3, 3, 5, 5, 7)
LSTM_PEEPHOLE = SeqConfig("lstm", bias="both", peephole=True)
GRU = SeqConfig("gru", bias="both", reset_after=True)
CONFIGS = [
    LSTM_PEEPHOLE,
    SeqConfig("lstm", bias="none", peephole=False, kernel=(1, 1)),
    SeqConfig("lstm", bias="both", peephole=False, kernel=(3, 5), dilation=(2, 1)),
    SeqConfig("lstm", bias="both", peephole=True, dilation=(2, 2)),
    GRU,
    SeqConfig("gru", bias="hh", reset_after=True, kernel=(5, 5)),
    SeqConfig("gru", bias="ih", reset_after=True, kernel=(1, 3), dilation=(1, 2)),
    SeqConfig("gru", bias="both", reset_after=False),
    SeqConfig("gru", bias="hh", reset_after=False, kernel=(5, 3), dilation=(1, 2)),
]
BALLAS = CONFIGS[-2]


def _step_kernels(config):
    """The Triton launches of one step: one fused kernel, two for the Ballas GRU (r*h before the n conv)."""
    if config.kind == "gru" and not config.reset_after:
        return [BALLAS_KERNELS[0], BALLAS_KERNELS[1]]
    return [STEP_KERNEL]


def _to_device(tensors):
    return {k: None if v is None else v.to(DEVICE) for k, v in tensors.items()}


@pytest.fixture
def launches(monkeypatch):
    """Names of the Triton kernels launched (fused step kernel and the cell kernels)."""
    names = []
    for module in (tc, tk):
        real = module.wrap_triton

        def wrap(kernel, _real=real):
            names.append(kernel.__name__)
            return _real(kernel)

        monkeypatch.setattr(module, "wrap_triton", wrap)
    return names


def _grads(outputs, tensors, grad_outputs):
    names = [k for k, v in tensors.items() if v is not None]
    grads = torch.autograd.grad(outputs, [tensors[k] for k in names], grad_outputs)
    return dict(zip(names, grads))


def check_sequence(config, reverse, dtype, layout, launches, shape=SHAPE):
    """Outputs, final states and the gradient of every input against the float64 reference, and one
    fused launch per step in the forward."""
    sample = make_seq_sample(config, reverse, dtype, layout, shape=shape)
    leaves = {k: None if v is None else v.to(DEVICE).requires_grad_() for k, v in sample.leaves().items()}
    with fastvid.backend("triton"):
        ours = sample.run_ops(leaves, None)
        forward_launches = list(launches)
        grad_outputs = [g.to(DEVICE) for g in upstream_grads(ours)]
        ours_grads = _grads(ours, leaves, grad_outputs)
    T = shape[1]
    assert forward_launches == _step_kernels(config) * T, f"forward launched {forward_launches}"

    grad_outputs = [g.cpu() for g in grad_outputs]
    t64 = sample.converted(torch.float64)
    oracle = sample.run_reference(t64)
    oracle_grads = _grads(oracle, t64, [g.double() for g in grad_outputs])
    comparator, comparator_grads = [None] * len(oracle), {}
    if dtype in LOW_PRECISION:
        t_lp = sample.converted(dtype)
        comparator = sample.run_reference(t_lp)
        comparator_grads = _grads(comparator, t_lp, [g.to(o.dtype) for g, o in zip(grad_outputs, comparator)])
    names = ["output", "h_n", "c_n"][:len(oracle)]
    assert len(ours) == len(oracle)
    for name, a, o, c in zip(names, ours, oracle, comparator):
        assert a.dtype == (acc_dtype(dtype) if name == "c_n" else dtype), name
        assert_parity(a.cpu(), o, dtype, name, c)
    for name in sample.names:
        assert ours_grads[name].dtype == leaves[name].dtype, f"grad {name}"
        assert_parity(ours_grads[name].cpu(), oracle_grads[name], dtype, f"grad {name}", comparator_grads.get(name),
                      grad=True)
    return ours


# ---------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("config", CONFIGS, ids=SeqConfig.id)
def test_sequence_matches_reference_fp64(config, launches):
    check_sequence(config, False, torch.float64, "contiguous", launches)


@pytest.mark.parametrize("config", [CONFIGS[1], CONFIGS[2], GRU, BALLAS], ids=SeqConfig.id)
def test_sequence_reverse_fp64(config, launches):
    check_sequence(config, True, torch.float64, "contiguous", launches)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("config", [LSTM_PEEPHOLE, GRU, BALLAS], ids=SeqConfig.id)
def test_sequence_matches_reference_dtypes(config, dtype, launches):
    check_sequence(config, False, dtype, "contiguous", launches)


@pytest.mark.parametrize("layout", ["channels_last", "noncontiguous"])
@pytest.mark.parametrize("config", [LSTM_PEEPHOLE, GRU], ids=SeqConfig.id)
def test_sequence_layouts(config, layout, launches):
    """Frames and states of any strides are read in place; channels-last frames give channels-last output."""
    ours = check_sequence(config, True, torch.float32, layout, launches)
    if layout == "channels_last":
        assert ours[0].permute(0, 1, 3, 4, 2).is_contiguous(), ours[0].stride()


def test_many_programs_and_k_chunks(monkeypatch, launches):
    """16-wide tiles over C = 20 hidden channels (2 channel programs, 2 K chunks per tap, masked tails)
    and 70 pixels (5 pixel programs, the last one partial)."""
    monkeypatch.setattr(tc, "BLOCK_M", 16)
    monkeypatch.setattr(tc, "BLOCK_C", 16)
    monkeypatch.setattr(tc, "BLOCK_K", 16)
    check_sequence(LSTM_PEEPHOLE, False, torch.float64, "contiguous", launches, shape=(2, 2, 2, 20, 5, 7))


def test_modules_through_backend(launches):
    """nn.ConvLSTM (bidirectional, 2 layers) and nn.ConvGRU (both reset rules) take the fused path under
    backend('triton')."""
    B, T, C_in, H, W = 2, 2, 3, 4, 5
    x = torch.randn(B, T, C_in, H, W, dtype=torch.float64).to(DEVICE)
    for module in (fastvid.nn.ConvLSTM(C_in, 4, 3, num_layers=2, bidirectional=True, peephole=True),
                   fastvid.nn.ConvGRU(C_in, 4, 3, reset_after=True),
                   fastvid.nn.ConvGRU(C_in, 4, 3, reset_after=False)):
        module = module.double().to(DEVICE)
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0, 0.3)
        launches.clear()
        with fastvid.backend("triton"), torch.no_grad():
            ours = module(x)
        if isinstance(module, fastvid.nn.ConvLSTM):
            assert launches == [STEP_KERNEL] * (T * 2 * 2)  # 2 layers, 2 directions
        else:
            assert launches == _step_kernels(SeqConfig("gru", reset_after=module.reset_after)) * T
        with fastvid.backend("reference"), torch.no_grad():
            expected = module(x)
        torch.testing.assert_close(ours[0], expected[0], rtol=1e-12, atol=1e-12)


def test_save_flag_and_cache_contents():
    """save=False keeps no cache and gives the same results; save=True's cache holds what the Triton cell
    backward reads (the activated gates and c of each step)."""
    sample = make_seq_sample(LSTM_PEEPHOLE, dtype=torch.float32, shape=SHAPE)
    t = _to_device(sample.tensors)
    x_gates = torch.nn.functional.conv2d(t["x"].flatten(0, 1), t["weight_ih"], t["bias"], padding=1)
    x_gates = x_gates.unflatten(0, (2, 3))
    out = torch.ops.fastvid.triton_convlstm_hidden(x_gates, t["weight_hh"], t["h0"], t["c0"], t["peephole"], None,
                                                   [1, 1], [1, 1], False, False)
    assert out[3].numel() == 0 and out[4].numel() == 0
    saved = torch.ops.fastvid.triton_convlstm_hidden(x_gates, t["weight_hh"], t["h0"], t["c0"], t["peephole"], None,
                                                     [1, 1], [1, 1], False, True)
    for a, b in zip(out[:3], saved[:3]):
        torch.testing.assert_close(a, b)
    # the cache is what the Triton cell backward reads: step 0's activated i, f, g, o, c_0
    gates_pre = x_gates[:, 0] + torch.nn.functional.conv2d(t["h0"], t["weight_hh"], padding=1)
    _, c_first, gates_first = ref.lstm_cell(gates_pre, t["c0"], t["peephole"])
    assert saved[3].shape == (3, 2, 20, 5, 7) and saved[4].shape == (3, 2, 5, 5, 7)
    torch.testing.assert_close(saved[3][0], gates_first, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(saved[4][0], c_first, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["lstm", "gru", "gru-ballas"])
def test_gradcheck_fp64(kind):
    """torch.autograd.gradcheck through the fused op and its backward op, w.r.t. every input of the op
    (the input convolution in front of it is native). Fast mode: the interpreter is slow."""
    gen = torch.Generator().manual_seed(3)
    B, T, C, H, W = 1, 2, 2, 3, 4
    G = 4 if kind == "lstm" else 3

    def r(*shape, scale=1.0):
        t = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
        return t.to(DEVICE).requires_grad_()

    x_gates, weight_hh, h0 = r(B, T, G * C, H, W), r(G * C, C, 3, 3, scale=0.3), r(B, C, H, W)
    if kind == "lstm":
        fn, inputs = tc.convlstm_hidden, (x_gates, weight_hh, h0, r(B, C, H, W), r(3, C, scale=0.5))
    else:
        def fn(x_gates, weight_hh, bias_hh, h0):
            return tc.convgru_hidden(x_gates, weight_hh, bias_hh, h0, reset_after=kind == "gru")
        inputs = (x_gates, weight_hh, r(G * C, scale=0.5), h0)
    # The backward's convolution gradients are cuDNN's on a GPU, which by default picks nondeterministic
    # algorithms (as for native conv2d); gradcheck's reentrancy check wants bitwise repeats.
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
        assert torch.autograd.gradcheck(fn, inputs, fast_mode=True, eps=1e-6, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------- lengths
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("kind", ["lstm", "gru", "gru-ballas"])
def test_lengths_match_per_sample_runs(kind, reverse, launches):
    """Sample b is valid at time index t iff t < lengths[b]: its output is the reference run on its first
    lengths[b] frames (processed backwards when reverse), 0 after them, and h_n (c_n) the state after
    its last valid frame (h0 (c0) for length 0)."""
    config = {"lstm": LSTM_PEEPHOLE, "gru": GRU, "gru-ballas": BALLAS}[kind]
    B, T = 4, 3
    sample = make_seq_sample(config, reverse, dtype=torch.float64, shape=(B, T, 3, 5, 5, 7))
    t = _to_device(sample.tensors)
    lengths = torch.tensor([T, 1, 0, T + 2], device=DEVICE)
    pad, dil = list(config.padding), list(config.dilation)
    if kind == "lstm":
        out, h_n, c_n = tc.convlstm(t["x"], t["weight_ih"], t["weight_hh"], t["bias"], t["h0"], t["c0"],
                                    t["peephole"], pad, dil, reverse, lengths=lengths)
    else:
        out, h_n = tc.convgru(t["x"], t["weight_ih"], t["weight_hh"], t["bias_ih"], t["bias_hh"], t["h0"], pad, dil,
                              reset_after=config.reset_after, reverse=reverse, lengths=lengths)
    assert launches == _step_kernels(config) * T
    for b in range(B):
        n = min(int(lengths[b]), T)
        one = {k: v[b:b + 1] if k in ("x", "h0", "c0") else v for k, v in sample.tensors.items()}
        one["x"] = one["x"][:, :n]
        expected_h, expected_c = one["h0"], one.get("c0")
        if n > 0:
            expected = sample.run_reference(one)
            torch.testing.assert_close(out[b:b + 1, :n].cpu(), expected[0], rtol=1e-12, atol=1e-12)
            expected_h = expected[1]
            expected_c = expected[2] if kind == "lstm" else None
        if n < T:
            assert out[b, n:].abs().max().item() == 0, f"sample {b}: output after its length is not 0"
        torch.testing.assert_close(h_n[b:b + 1].cpu(), expected_h, rtol=1e-12, atol=1e-12)
        if kind == "lstm":
            torch.testing.assert_close(c_n[b:b + 1].cpu(), expected_c, rtol=1e-12, atol=1e-12)


def test_backward_with_lengths_raises():
    sample = make_seq_sample(GRU, dtype=torch.float64, shape=(2, 2, 3, 5, 5, 7))
    t = {k: None if v is None else v.to(DEVICE).requires_grad_() for k, v in sample.tensors.items()}
    out, _ = tc.convgru(t["x"], t["weight_ih"], t["weight_hh"], t["bias_ih"], t["bias_hh"], t["h0"], [1, 1], [1, 1],
                        lengths=torch.tensor([2, 1], device=DEVICE))
    with pytest.raises(RuntimeError, match="lengths"):
        out.sum().backward()


# ---------------------------------------------------------------------------------------- bad input
def _lstm_args(**change):
    sample = make_seq_sample(LSTM_PEEPHOLE, dtype=torch.float32, shape=(2, 2, 3, 5, 5, 7))
    t = _to_device(sample.tensors)
    x_gates = torch.randn(2, 2, 20, 5, 7, device=DEVICE)
    args = dict(x_gates=x_gates, weight_hh=t["weight_hh"], h0=t["h0"], c0=t["c0"], peephole=t["peephole"],
                lengths=None, padding=[1, 1], dilation=[1, 1], reverse=False, save=False)
    args.update(change)
    return list(args.values())


@pytest.mark.parametrize("change,error,match", [
    (dict(weight_hh=torch.randn(16, 5, 3, 3)), ValueError, "weight_hh"),
    (dict(weight_hh=torch.randn(20, 5, 3, 3, dtype=torch.float64)), TypeError, "weight_hh"),
    (dict(h0=torch.randn(2, 5, 5, 6)), ValueError, "h0"),
    (dict(h0=torch.randn(2, 5, 5)), ValueError, "h0"),
    (dict(x_gates=torch.randn(2, 2, 16, 5, 7)), ValueError, "x_gates"),
    (dict(x_gates=torch.randn(2, 2, 20, 5, 7).int()), TypeError, "x_gates"),
    (dict(c0=torch.randn(1, 5, 5, 7)), ValueError, "c0"),
    (dict(peephole=torch.randn(2, 5)), ValueError, "peephole"),
    (dict(padding=[0, 1]), ValueError, "padding"),
    (dict(dilation=[0, 1]), ValueError, "dilation"),
    (dict(lengths=torch.tensor([1, 2, 3])), ValueError, "lengths"),
    (dict(lengths=torch.tensor([1.0, 2.0])), TypeError, "lengths"),
])
def test_bad_inputs(change, error, match):
    change = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in change.items()}
    with pytest.raises(error, match=match):
        torch.ops.fastvid.triton_convlstm_hidden(*_lstm_args(**change))


def test_bad_gru_bias():
    sample = make_seq_sample(GRU, dtype=torch.float32, shape=(2, 2, 3, 5, 5, 7))
    t = _to_device(sample.tensors)
    x_gates = torch.randn(2, 2, 15, 5, 7, device=DEVICE)
    with pytest.raises(ValueError, match="bias_hh"):
        torch.ops.fastvid.triton_convgru_hidden(x_gates, t["weight_hh"], t["bias_hh"][:14], t["h0"], None,
                                                [1, 1], [1, 1], True, False, False)
    with pytest.raises(ValueError, match="weight_hh"):  # an LSTM's 4C weight given to the GRU op
        torch.ops.fastvid.triton_convgru_hidden(x_gates, torch.randn(20, 5, 3, 3, device=DEVICE), None, t["h0"],
                                                None, [1, 1], [1, 1], True, False, False)


# ---------------------------------------------------------------------------------------- tiles
@pytest.mark.parametrize("capability", sorted(SHARED_MEMORY_LIMITS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=dtype_id)
def test_launch_config_fits_shared_memory(capability, dtype):
    limit = SHARED_MEMORY_LIMITS[capability]
    for cell in ("lstm", "gru"):
        for C in (1, 5, 16, 64, 256):
            meta = tc.launch_config(cell, dtype, C, capability, limit)
            gates = 4 if cell == "lstm" else 3
            elem = torch.empty((), dtype=dtype).element_size()
            assert tc._shared_bytes(gates, meta["BLOCK_M"], meta["BLOCK_C"], meta["BLOCK_K"], elem,
                                    meta["num_stages"], capability) <= limit
            assert min(meta["BLOCK_M"], meta["BLOCK_C"], meta["BLOCK_K"]) >= 16
            assert not meta["FIX_BF16"] and not meta["WIDEN"]
    with pytest.raises(RuntimeError, match="shared memory"):
        tc.launch_config("lstm", dtype, 64, capability, 1024)
