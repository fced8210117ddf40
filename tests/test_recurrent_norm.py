"""Layer-normalised ConvLSTM (norm="layer"): the fused CPU op and the modules against the float64
reference of fastvid/reference/recurrent_norm.py, which itself is checked to normalise."""
import pytest
import torch
import torch.nn.functional as F

import fastvid
from conftest import TRITON_DEVICE
from fastvid import ops
from fastvid.convert import convert
from fastvid.reference import recurrent_norm as ref_norm

from _isa import cpu_isa  # noqa: F401 (fixture: every CPU ISA path)
from _recurrent_samples import (
    LOW_PRECISION, RECURRENT_ULPS, acc_dtype, assert_parity, channels_last_frames, dtype_id, upstream_grads,
)
from _tolerances import assert_full_precision

pytestmark = pytest.mark.skipif(not fastvid.info()["cpu_kernels"], reason="fastvid._C is not built")

OPS = torch.ops.fastvid
SHAPE = (2, 3, 3, 4, 5, 6)  # B, T, C_in, C, H, W


def make_sample(dtype, shape=SHAPE, bias=True, layout="contiguous", seed=0, kind="lstm"):
    """Inputs drawn in float64 and rounded to ``dtype`` (the cell state and the norm parameters in the
    accumulation dtype). Gains away from 1 and nonzero biases so a kernel that ignores them fails."""
    B, T, Cin, C, H, W = shape
    gen = torch.Generator().manual_seed(seed)

    def randn(*s, scale=1.0, shift=0.0):
        return torch.randn(*s, generator=gen, dtype=torch.float64) * scale + shift

    acc = acc_dtype(dtype)
    G = 4 if kind == "lstm" else 3
    t = dict(x=randn(B, T, Cin, H, W), weight_ih=randn(G * C, Cin, 3, 3, scale=0.3),
             weight_hh=randn(G * C, C, 3, 3, scale=0.3))
    if kind == "lstm":
        t.update(bias=randn(4 * C, scale=0.5) if bias else None, h0=randn(B, C, H, W, scale=0.5),
                 c0=randn(B, C, H, W), gain_ih=randn(4 * C, scale=0.3, shift=1.0),
                 gain_hh=randn(4 * C, scale=0.3, shift=1.0), gain_c=randn(C, scale=0.3, shift=1.0),
                 bias_c=randn(C, scale=0.3))
    else:
        t.update(bias_ih=randn(3 * C, scale=0.5) if bias else None, bias_hh=randn(3 * C, scale=0.5) if bias else None,
                 h0=randn(B, C, H, W, scale=0.5), gain_ih=randn(3 * C, scale=0.3, shift=1.0),
                 gain_hh=randn(3 * C, scale=0.3, shift=1.0))
    for k, v in t.items():
        if v is not None:
            t[k] = v.to(acc if k in ("c0", "gain_ih", "gain_hh", "gain_c", "bias_c") else dtype)
    if layout == "channels_last":
        t["x"] = channels_last_frames(t["x"])
        t["h0"] = t["h0"].contiguous(memory_format=torch.channels_last)
    return t


def leaves(t):
    return {k: (v.detach().clone().requires_grad_(True) if v is not None else None) for k, v in t.items()}


def run_ops(t, reverse=False):
    if "bias_ih" in t:  # GRU
        return ops.convgru_ln(t["x"], t["weight_ih"], t["weight_hh"], t["bias_ih"], t["bias_hh"], t["h0"],
                              t["gain_ih"], t["gain_hh"], reverse=reverse)
    return ops.convlstm_ln(t["x"], t["weight_ih"], t["weight_hh"], t["bias"], t["h0"], t["c0"], t["gain_ih"],
                           t["gain_hh"], t["gain_c"], t["bias_c"], reverse=reverse)


def run_reference(t, reverse=False):
    if "bias_ih" in t:  # GRU
        return ref_norm.convgru_ln_sequence(t["x"], t["weight_ih"], t["weight_hh"], t["bias_ih"], t["bias_hh"],
                                            t["h0"], t["gain_ih"], t["gain_hh"], (1, 1), (1, 1), reverse)
    return ref_norm.convlstm_ln_sequence(t["x"], t["weight_ih"], t["weight_hh"], t["bias"], t["h0"], t["c0"],
                                         t["gain_ih"], t["gain_hh"], t["gain_c"], t["bias_c"], (1, 1), (1, 1), reverse)


def grads_of(outputs, tensors, grad_outputs):
    names = [k for k, v in tensors.items() if v is not None]
    grads = torch.autograd.grad(outputs, [tensors[k] for k in names], [g.to(o.device, o.dtype) for g, o in
                                                                       zip(grad_outputs, outputs)])
    return dict(zip(names, grads))


def to64(t):
    return {k: (v.detach().double().requires_grad_(True) if v is not None else None) for k, v in t.items()}


def check_against_reference(dtype, layout, reverse, bias, kind="lstm", backend="cpu", shape=SHAPE, device="cpu"):
    """fastvid on ``device`` against the float64 reference on the CPU."""
    sample = make_sample(dtype, bias=bias, layout=layout, kind=kind, shape=shape)
    on_device = {k: (v.to(device) if v is not None else None) for k, v in sample.items()}
    ours_in = leaves(on_device)
    names = ("output", "h_n", "c_n") if kind == "lstm" else ("output", "h_n")
    with fastvid.backend(backend):
        ours = run_ops(ours_in, reverse)
    grad_outputs = upstream_grads(ours)
    ours_grads = {k: g.cpu() for k, g in grads_of(ours, ours_in, grad_outputs).items()}
    ours = [o.cpu() for o in ours]
    oracle_in = to64(sample)
    oracle = run_reference(oracle_in, reverse)
    oracle_grads = grads_of(oracle, oracle_in, grad_outputs)
    comparator, comparator_grads = [None] * len(names), {}
    if dtype in LOW_PRECISION:  # the reference run in the dtype: its gate math in fp32 on convs in the dtype
        comp_in = leaves(sample)
        comparator = run_reference(comp_in, reverse)
        comparator_grads = grads_of(comparator, comp_in, grad_outputs)
    assert len(ours) == len(names)
    for name, a, o, c in zip(names, ours, oracle, comparator):
        assert a.dtype == (acc_dtype(dtype) if name == "c_n" else dtype), name
        assert_parity(a, o, dtype, name, c)
    for name in ours_grads:
        assert ours_grads[name].dtype == sample[name].dtype, f"grad {name} dtype"
        assert_parity(ours_grads[name], oracle_grads[name], dtype, f"grad {name}", comparator_grads.get(name),
                      grad=True)
    with torch.no_grad(), fastvid.backend(backend):  # inference: save=False, one step of scratch
        for name, a, o, c in zip(names, run_ops(on_device, reverse), oracle, comparator):
            assert_parity(a.cpu(), o, dtype, f"{name} (no_grad)", c)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_sequence_matches_reference(dtype, layout, reverse, bias, cpu_isa):
    """Outputs, final states and the gradients w.r.t. x, both weights, the bias, h0, c0, the gains and
    the cell-norm bias (random upstream gradients on output, h_n, c_n) equal the float64 reference, on
    every CPU ISA path (RECURRENT_ULPS: three recurrent steps of per-sample reductions)."""
    check_against_reference(dtype, layout, reverse, bias)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_gru_sequence_matches_reference(dtype, layout, reverse, bias, cpu_isa):
    """ConvGRU: output, h_n and the gradients w.r.t. x, weights, both biases, h0 and both gains equal
    the float64 reference on every CPU ISA path."""
    check_against_reference(dtype, layout, reverse, bias, kind="gru")


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_sequence_fp16_matches_reference(layout, kind):
    """fp16 on the CPU kernels (gate math and statistics in fp32, the cell state in fp32), by the
    flash-attention rule against the reference run in fp16 (tests/_tolerances.py)."""
    check_against_reference(torch.float16, layout, reverse=False, bias=True, kind=kind)


@pytest.mark.skipif(not fastvid._backend.triton_usable(), reason="triton is not usable here")
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("block", [1024, 16], ids=["one_chunk", "many_chunks"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_triton_matches_reference(dtype, reverse, block, kind, monkeypatch):
    """The Triton LN step kernels (on the GPU, or under the interpreter) in the sequence loop: values
    and every gradient against the float64 reference; BLOCK 16 makes every pass loop over several
    masked chunks of a sample (C·H·W = 12, G·C·H·W = 36 / 48 here)."""
    from fastvid.triton_kernels import recurrent_norm as tk
    monkeypatch.setattr(tk, "BLOCK_SIZE", block)
    check_against_reference(dtype, "contiguous", reverse, True, kind=kind, backend="triton", shape=(2, 2, 2, 3, 2, 2),
                            device=TRITON_DEVICE)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_gradcheck(kind):
    """fp64 gradcheck of the C++ forward/backward pair over every differentiable input."""
    sample = leaves(make_sample(torch.float64, shape=(2, 2, 2, 2, 3, 4), kind=kind))
    names = [k for k, v in sample.items() if v is not None]

    def f(*args):
        with fastvid.backend("cpu"):
            return run_ops(dict(sample, **dict(zip(names, args))))

    assert torch.autograd.gradcheck(f, [sample[k] for k in names], eps=1e-6, atol=1e-6, rtol=1e-5)


def _op_args(layout, save, reverse=False):
    t = make_sample(torch.float64, shape=(2, 2, 2, 2, 3, 4), layout=layout)
    return (t["x"], t["weight_ih"], t["weight_hh"], t["bias"], t["h0"], t["c0"], t["gain_ih"], t["gain_hh"],
            t["gain_c"], t["bias_c"], [1, 1], [1, 1], reverse, layout == "channels_last", save)


@pytest.mark.parametrize("save", [True, False], ids=["save", "nosave"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck_forward(layout, save):
    args = list(_op_args(layout, save))
    for i in range(10):  # differentiable arguments
        if isinstance(args[i], torch.Tensor):
            args[i] = args[i].requires_grad_(save)
    result = torch.library.opcheck(OPS.convlstm_ln_sequence, tuple(args))
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck_backward(layout, reverse):
    args = _op_args(layout, True, reverse)
    x, w_ih, w_hh, bias, h0, c0, g_ih, g_hh, g_c, b_c, padding, dilation, reverse, cl, _ = args
    out, h_n, c_n, x_pre, h_pre, gates, cells, stats = OPS.convlstm_ln_sequence(*args)
    grads = upstream_grads((out, h_n, c_n))
    bargs = (*grads, x, w_ih, w_hh, True, h0, c0, g_ih, g_hh, g_c, b_c, out, x_pre, h_pre, gates, cells, stats,
             padding, dilation, reverse, cl)
    result = torch.library.opcheck(OPS.convlstm_ln_sequence_backward, bargs)
    assert all(v == "SUCCESS" for v in result.values()), result


# ------------------------------------------------------------------------------ the norm itself
def test_reference_layer_norm_normalises():
    """With gain 1 and bias 0, every sample of LN(v) has mean 0 and variance σ²/(σ² + eps) over all
    K x H x W values; gains and biases act per channel."""
    v = torch.randn(3, 8, 5, 6, dtype=torch.float64) * 4 + 2
    out = ref_norm.layer_norm(v, torch.ones(8, dtype=torch.float64))
    var = v.var(dim=(1, 2, 3), unbiased=False)
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(out.var(dim=(1, 2, 3), unbiased=False), var / (var + ref_norm.EPS), atol=1e-12,
                               rtol=1e-12)
    gain, bias = torch.rand(8, dtype=torch.float64) + 0.5, torch.randn(8, dtype=torch.float64)
    torch.testing.assert_close(ref_norm.layer_norm(v, gain, bias),
                               out * gain.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1), atol=1e-12, rtol=1e-12)


def test_kernel_statistics_and_normalised_gates():
    """The op's saved per-sample statistics are the mean and 1/sqrt(var + eps) of the raw conv outputs
    and of the cell state over all channels and pixels, and the saved gates are the activations of the
    normalised pre-activations (recomputed here from x_pre, h_pre with the statistics of torch.var_mean)."""
    x, w_ih, w_hh, bias, h0, c0, g_ih, g_hh, g_c, b_c, *rest = _op_args("contiguous", True)
    out, h_n, c_n, x_pre, h_pre, gates, cells, stats = OPS.convlstm_ln_sequence(
        x, w_ih, w_hh, bias, h0, c0, g_ih, g_hh, g_c, b_c, *rest)
    eps = ref_norm.EPS

    def moments(v):
        var, mean = torch.var_mean(v, dim=(2, 3, 4), unbiased=False)
        return mean, 1 / torch.sqrt(var + eps)

    for k, v in enumerate((x_pre, h_pre, cells)):
        mean, rstd = moments(v)
        torch.testing.assert_close(stats[..., 2 * k], mean, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(stats[..., 2 * k + 1], rstd, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(x_pre, torch.stack([F.conv2d(x[:, t], w_ih, padding=1) for t in range(2)], 1))
    a = ref_norm.layer_norm(x_pre.flatten(0, 1), g_ih) + ref_norm.layer_norm(h_pre.flatten(0, 1), g_hh) + \
        bias.view(1, -1, 1, 1)
    a_i, a_f, a_g, a_o = a.chunk(4, 1)
    expected = torch.cat([a_i.sigmoid(), a_f.sigmoid(), a_g.tanh(), a_o.sigmoid()], 1).view_as(gates)
    torch.testing.assert_close(gates, expected, atol=1e-12, rtol=1e-12)


def test_output_invariant_to_weight_scale():
    """Layer norm makes the cell invariant to scaling W_ih and W_hh (up to eps): x10 weights give the
    same outputs to ~eps/σ² (σ² ~ 1 here, so 1e-4 bounds the eps effect with room)."""
    t = make_sample(torch.float64)
    scaled = dict(t, weight_ih=t["weight_ih"] * 10, weight_hh=t["weight_hh"] * 10)
    with fastvid.backend("cpu"):
        a, b = run_ops(t), run_ops(scaled)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=0)
    plain = ops.convlstm(t["x"], t["weight_ih"], t["weight_hh"], t["bias"], t["h0"], t["c0"])
    assert (plain[0] - a[0]).abs().max() > 0.05, "norm='layer' output equals the plain ConvLSTM's"


# ------------------------------------------------------------------------------ modules
def _set_norm_params(module, gen):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith("ln_"):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3 + (0 if "bias" in name else 1))


@pytest.mark.parametrize("batch_first", [True, False])
def test_bidirectional_multilayer_module_matches_reference(batch_first):
    """ConvLSTM(norm='layer', num_layers=2, bidirectional=True) on the CPU kernels equals the same
    module under the reference backend and its convert(to='reference') twin: outputs, states and the
    gradient of every parameter (fp64)."""
    gen = torch.Generator().manual_seed(3)
    m = fastvid.nn.ConvLSTM(3, [4, 3], 3, num_layers=2, bidirectional=True, norm="layer",
                            batch_first=batch_first).double()
    _set_norm_params(m, gen)
    x = torch.randn(2, 3, 3, 5, 6, generator=gen, dtype=torch.float64)
    if not batch_first:
        x = x.transpose(0, 1).contiguous()
    names = [n for n, _ in m.named_parameters()]
    assert {"ln_gain_ih_l0", "ln_gain_hh_l1_reverse", "ln_gain_c_l1", "ln_bias_c_l0_reverse"} <= set(names)

    def run(module, backend):
        module.zero_grad()
        with fastvid.backend(backend):
            out, (h_n, c_n) = module(x)
        states = [*h_n, *c_n]  # per-layer lists: the layers differ in width
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum() + \
            sum((s * s).sum() for s in states)
        loss.backward()
        return [out, *states], {n: p.grad.clone() for n, p in module.named_parameters()}

    ours, ours_grads = run(m, "cpu")
    oracle, oracle_grads = run(m, "reference")
    twin = convert(m, to="reference")
    twin_out, twin_grads = run(twin, "cpu")
    for a, o, tw in zip(ours, oracle, twin_out):
        assert_full_precision(a, o, "module output", ulps=RECURRENT_ULPS)
        assert_full_precision(tw, o, "reference twin output", ulps=RECURRENT_ULPS)
    for n in names:
        assert_full_precision(ours_grads[n], oracle_grads[n], f"grad {n}", ulps=RECURRENT_ULPS)
        assert_full_precision(twin_grads[n], oracle_grads[n], f"twin grad {n}", ulps=RECURRENT_ULPS)


def test_cell_matches_reference_and_sequence():
    """ConvLSTMCell(norm='layer') steps equal the reference cell and a one-layer ConvLSTM with the same
    parameters; gradients of the norm parameters too."""
    gen = torch.Generator().manual_seed(5)
    cell = fastvid.nn.ConvLSTMCell(3, 4, norm="layer").double()
    _set_norm_params(cell, gen)
    x = torch.randn(2, 3, 5, 6, generator=gen, dtype=torch.float64)
    h = torch.randn(2, 4, 5, 6, generator=gen, dtype=torch.float64)
    c = torch.randn(2, 4, 5, 6, generator=gen, dtype=torch.float64)
    h1, c1 = cell(x, (h, c))
    (h1.sum() + (c1 * c1).sum()).backward()
    ours_grads = {n: p.grad.clone() for n, p in cell.named_parameters()}
    twin = convert(cell, to="reference")
    h2, c2 = twin(x, (h, c))
    (h2.sum() + (c2 * c2).sum()).backward()
    assert_full_precision(h1, h2, "h", ulps=RECURRENT_ULPS)
    assert_full_precision(c1, c2, "c", ulps=RECURRENT_ULPS)
    for n, p in twin.named_parameters():
        assert_full_precision(ours_grads[n], p.grad, f"grad {n}", ulps=RECURRENT_ULPS)
    seq = fastvid.nn.ConvLSTM(3, 4, norm="layer").double()
    seq.load_state_dict({k + "_l0": v for k, v in cell.state_dict().items()})
    out, (h_n, c_n) = seq(x.unsqueeze(1), (h.unsqueeze(0), c.unsqueeze(0)))
    assert_full_precision(out[:, 0], h1, "sequence of one step", ulps=RECURRENT_ULPS)


def test_norm_parameters_initialised():
    m = fastvid.nn.ConvLSTM(2, 3, norm="layer")
    assert torch.equal(m.ln_gain_ih_l0, torch.ones(12)) and torch.equal(m.ln_gain_hh_l0, torch.ones(12))
    assert torch.equal(m.ln_gain_c_l0, torch.ones(3)) and torch.equal(m.ln_bias_c_l0, torch.zeros(3))
    assert not any(n.startswith("ln_") for n, _ in fastvid.nn.ConvLSTM(2, 3).named_parameters())


# ------------------------------------------------------------------------------ bad input
def test_bad_norm_arguments():
    with pytest.raises(ValueError, match="norm must be None or 'layer'"):
        fastvid.nn.ConvLSTM(2, 3, norm="batch")
    with pytest.raises(ValueError, match="norm must be None or 'layer'"):
        fastvid.nn.ConvLSTMCell(2, 3, norm="group")
    with pytest.raises(ValueError, match="peephole"):
        fastvid.nn.ConvLSTM(2, 3, norm="layer", peephole=True)
    with pytest.raises(ValueError, match="hoisted"):
        fastvid.nn.ConvLSTM(2, 3, norm="layer", strategy="concat")
    t = make_sample(torch.float32)
    with pytest.raises(ValueError, match="gain_ih must be \\[16\\]"):
        ops.convlstm_ln(t["x"], t["weight_ih"], t["weight_hh"], t["bias"], None, None, t["gain_ih"][:4],
                        t["gain_hh"], t["gain_c"], t["bias_c"])


def test_raw_op_rejects_bad_norm_parameters():
    args = list(_op_args("contiguous", False))
    args[8] = args[8][:1]  # gain_c
    with pytest.raises(ValueError, match="gain_c must be \\[2\\]"):
        OPS.convlstm_ln_sequence(*args)
    args = list(_op_args("contiguous", False))
    args[9] = args[9].to(torch.int64)  # bias_c
    with pytest.raises(TypeError, match="bias_c must be floating point"):
        OPS.convlstm_ln_sequence(*args)


# ------------------------------------------------------------------------------ ConvGRU
def _gru_op_args(layout, save, reverse=False):
    t = make_sample(torch.float64, shape=(2, 2, 2, 2, 3, 4), layout=layout, kind="gru")
    return (t["x"], t["weight_ih"], t["weight_hh"], t["bias_ih"], t["bias_hh"], t["h0"], t["gain_ih"], t["gain_hh"],
            [1, 1], [1, 1], reverse, layout == "channels_last", save)


@pytest.mark.parametrize("save", [True, False], ids=["save", "nosave"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gru_opcheck_forward(layout, save):
    args = list(_gru_op_args(layout, save))
    for i in range(8):
        if isinstance(args[i], torch.Tensor):
            args[i] = args[i].requires_grad_(save)
    result = torch.library.opcheck(OPS.convgru_ln_sequence, tuple(args))
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gru_opcheck_backward(layout, reverse):
    args = _gru_op_args(layout, True, reverse)
    x, w_ih, w_hh, b_ih, b_hh, h0, g_ih, g_hh, padding, dilation, reverse, cl, _ = args
    out, h_n, x_pre, h_pre, stats = OPS.convgru_ln_sequence(*args)
    grads = upstream_grads((out, h_n))
    bargs = (*grads, x, w_ih, w_hh, b_ih, b_hh, h0, g_ih, g_hh, out, x_pre, h_pre, stats, padding, dilation, reverse,
             cl)
    result = torch.library.opcheck(OPS.convgru_ln_sequence_backward, bargs)
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_double_backward_raises(kind):
    """The backward ops' autograd (csrc/autograd.cpp) refuses a second derivative instead of returning
    a wrong one: differentiating the first gradient raises."""
    t = leaves(make_sample(torch.float64, shape=(2, 2, 2, 2, 3, 4), kind=kind))
    output = run_ops(t)[0]
    (grad_x,) = torch.autograd.grad(output.pow(2).sum(), t["x"], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        grad_x.sum().backward()


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_backward_after_save_false_raises(kind):
    """A forward run without caches (save=False) cannot be differentiated: a clear error, not zeros."""
    args = list(_op_args("contiguous", False) if kind == "lstm" else _gru_op_args("contiguous", False))
    args[0] = args[0].requires_grad_()
    op = OPS.convlstm_ln_sequence if kind == "lstm" else OPS.convgru_ln_sequence
    output = op(*args)[0]
    with pytest.raises(RuntimeError, match=f"fastvid.conv{kind}_ln: backward through a call made with save=False"):
        output.sum().backward()


def test_gru_bidirectional_multilayer_module_matches_reference():
    """ConvGRU(norm='layer', num_layers=2, bidirectional=True) on the CPU kernels equals the reference
    backend and the convert(to='reference') twin, outputs and every parameter gradient (fp64)."""
    gen = torch.Generator().manual_seed(4)
    m = fastvid.nn.ConvGRU(3, [4, 3], 3, num_layers=2, bidirectional=True, norm="layer").double()
    _set_norm_params(m, gen)
    x = torch.randn(2, 3, 3, 5, 6, generator=gen, dtype=torch.float64)
    assert {"ln_gain_ih_l0", "ln_gain_hh_l1_reverse"} <= {n for n, _ in m.named_parameters()}

    def run(module, backend):
        module.zero_grad()
        with fastvid.backend(backend):
            out, h_n = module(x)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum() + \
            sum((s * s).sum() for s in h_n)
        loss.backward()
        return [out, *h_n], {n: p.grad.clone() for n, p in module.named_parameters()}

    ours, ours_grads = run(m, "cpu")
    oracle, oracle_grads = run(m, "reference")
    twin_out, twin_grads = run(convert(m, to="reference"), "cpu")
    for a, o, tw in zip(ours, oracle, twin_out):
        assert_full_precision(a, o, "module output", ulps=RECURRENT_ULPS)
        assert_full_precision(tw, o, "reference twin output", ulps=RECURRENT_ULPS)
    for n in ours_grads:
        assert_full_precision(ours_grads[n], oracle_grads[n], f"grad {n}", ulps=RECURRENT_ULPS)
        assert_full_precision(twin_grads[n], oracle_grads[n], f"twin grad {n}", ulps=RECURRENT_ULPS)


def test_gru_cell_matches_reference():
    gen = torch.Generator().manual_seed(6)
    cell = fastvid.nn.ConvGRUCell(3, 4, norm="layer").double()
    _set_norm_params(cell, gen)
    x = torch.randn(2, 3, 5, 6, generator=gen, dtype=torch.float64)
    h = torch.randn(2, 4, 5, 6, generator=gen, dtype=torch.float64)
    ours = cell(x, h)
    ours.square().sum().backward()
    ours_grads = {n: p.grad.clone() for n, p in cell.named_parameters()}
    twin = convert(cell, to="reference")
    theirs = twin(x, h)
    theirs.square().sum().backward()
    assert_full_precision(ours, theirs, "h", ulps=RECURRENT_ULPS)
    for n, p in twin.named_parameters():
        assert_full_precision(ours_grads[n], p.grad, f"grad {n}", ulps=RECURRENT_ULPS)


def test_gru_bad_norm_arguments():
    with pytest.raises(ValueError, match="reset_after=True"):
        fastvid.nn.ConvGRU(2, 3, norm="layer", reset_after=False)
    with pytest.raises(ValueError, match="reset_after=True"):
        fastvid.nn.ConvGRUCell(2, 3, norm="layer", reset_after=False)
    t = make_sample(torch.float32, kind="gru")
    with pytest.raises(ValueError, match="gain_hh must be \\[12\\]"):
        ops.convgru_ln(t["x"], t["weight_ih"], t["weight_hh"], t["bias_ih"], t["bias_hh"], None, t["gain_ih"],
                       t["gain_hh"][:3])


@pytest.mark.parametrize("cls", [fastvid.nn.ConvLSTM, fastvid.nn.ConvGRU])
def test_autocast_bf16(cls):
    """Under CPU autocast the conv operands run in bf16 (outputs bf16, the LSTM cell state fp32), and the
    result stays within bf16 rounding of the fp32 module's (a loose, dtype-derived bound: 8 bf16 ulps of
    the largest output, the outputs being tanh-bounded)."""
    m = cls(3, 4, norm="layer")
    x = torch.randn(2, 3, 3, 5, 6)
    with fastvid.backend("cpu"):
        expected = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
    assert out[0].dtype == torch.bfloat16
    if cls is fastvid.nn.ConvLSTM:
        assert out[1][1].dtype == torch.float32
    bound = 8 * torch.finfo(torch.bfloat16).eps * expected[0].abs().max().item()
    assert (out[0].float() - expected[0]).abs().max().item() <= bound


@pytest.mark.parametrize("cls", [fastvid.nn.ConvLSTM, fastvid.nn.ConvGRU])
def test_module_pickles_and_state_dict_round_trips(cls):
    """A norm='layer' module survives pickling (norm attribute and ln_* parameters), and its state dict
    loads into a fresh module giving the same outputs; a module without norm rejects it (unexpected keys)."""
    import io
    m = cls(3, 4, norm="layer", bidirectional=True)
    _set_norm_params(m, torch.Generator().manual_seed(7))
    x = torch.randn(2, 3, 3, 5, 6)
    buffer = io.BytesIO()
    torch.save(m, buffer)
    buffer.seek(0)
    copy = torch.load(buffer, weights_only=False)
    fresh = cls(3, 4, norm="layer", bidirectional=True)
    fresh.load_state_dict(m.state_dict())
    with torch.no_grad():
        expected = m(x)[0]
        assert copy.norm == "layer"
        assert torch.equal(copy(x)[0], expected)
        assert torch.equal(fresh(x)[0], expected)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        cls(3, 4, bidirectional=True).load_state_dict(m.state_dict())


@pytest.mark.parametrize("op", ["convlstm_ln", "convgru_ln"])
def test_cuda_tensors_without_triton_run_the_reference_cell(op, monkeypatch):
    """The layer-norm sequence ops have no CUDA C++ kernel: on CUDA tensors their time loop runs Triton's
    step cell, and without Triton (a CUDA build of torch without it) it took that cell anyway and raised
    AttributeError. Simulated here: auto resolves to 'cuda' as for CUDA tensors, the Triton module is not
    available; the op then runs the reference cell and matches the reference backend."""
    pytest.importorskip("triton")
    from fastvid import _backend
    from fastvid.triton_kernels import recurrent_norm as triton_norm
    monkeypatch.setattr(triton_norm, "AVAILABLE", False)
    for name in ("ln_lstm_cell", "ln_gru_cell"):
        monkeypatch.delattr(triton_norm, name, raising=False)
    B, T, C_in, C, H, W = 2, 3, 2, 3, 4, 4
    G = 4 if op == "convlstm_ln" else 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, C_in, H, W, generator=g, dtype=torch.float64)
    w_ih, w_hh = torch.randn(G * C, C_in, 3, 3, generator=g, dtype=torch.float64), \
        torch.randn(G * C, C, 3, 3, generator=g, dtype=torch.float64)
    gains = [torch.rand(G * C, generator=g, dtype=torch.float64) + 0.5 for _ in range(2)]
    args = (x, w_ih, w_hh, None, None, None, *gains, torch.rand(C, generator=g, dtype=torch.float64) + 0.5,
            torch.randn(C, generator=g, dtype=torch.float64)) if op == "convlstm_ln" else \
        (x, w_ih, w_hh, None, None, None, *gains)
    fn = getattr(fastvid.ops, op)
    with fastvid.backend("reference"):
        expected = fn(*args)
    real_resolve = _backend.resolve
    monkeypatch.setattr(_backend, "resolve", lambda tensors: "cuda" if real_resolve(tensors) == "cpu" else "reference")
    torch.testing.assert_close(fn(*args), expected, rtol=0, atol=0)
