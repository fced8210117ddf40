"""Variable-length sequences (issue 13 feature 1): ``lengths=`` on fastvid.ops.convlstm / convgru and
the ConvLSTM / ConvGRU modules, with the semantics of ``pack_padded_sequence`` + ``nn.LSTM``.

The independent computation is each sample run ALONE at its own length (``x[b:b+1, :lengths[b]]``,
no lengths involved): through the float64 reference (which knows nothing of masks) and through
fastvid itself. A batched call with lengths must give each sample that output (zero past its
length), that h_n / c_n, and the gradients of the sum of the per-sample losses.
"""
import dataclasses

import pytest
import torch

import fastvid
from conftest import TRITON_DEVICE
from fastvid.reference import recurrent as ref
from _isa import cpu_isa  # noqa: F401 (fixture: every CPU ISA path)
from _recurrent_samples import RECURRENT_ULPS, channels_last_frames
from _tolerances import assert_full_precision

B, T, C_IN, C, H, W = 3, 5, 2, 3, 4, 5
LENGTHS = [5, 2, 4]  # one full, one short, one in between; B = 3
STRATEGIES = ("hoisted", "concat")


@dataclasses.dataclass(frozen=True)
class Cfg:
    cell: str  # "lstm" | "gru"
    peephole: bool = False
    reset_after: bool = True

    def id(self):
        if self.cell == "lstm":
            return "lstm-peephole" if self.peephole else "lstm"
        return "gru" if self.reset_after else "gru-ballas"


CONFIGS = [Cfg("lstm"), Cfg("lstm", peephole=True), Cfg("gru"), Cfg("gru", reset_after=False)]


def _tensors(cfg, dtype, seed=0):
    """Inputs in float64, rounded to dtype (the oracle sees the same values). The padding frames of x
    (past each sample's length) are random too: nothing may read them."""
    g = torch.Generator().manual_seed(seed)
    G = 4 if cfg.cell == "lstm" else 3
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype)  # noqa: E731
    t = {"x": r(B, T, C_IN, H, W), "weight_ih": r(G * C, C_IN, 3, 3, scale=0.3),
         "weight_hh": r(G * C, C, 3, 3, scale=0.3), "h0": r(B, C, H, W, scale=0.5)}
    if cfg.cell == "lstm":
        t["bias"] = r(4 * C, scale=0.3)
        t["c0"] = r(B, C, H, W, scale=0.5).to(ref.compute_dtype(dtype))
        if cfg.peephole:
            t["peephole"] = r(3, C, scale=0.3)
    else:
        t["bias_ih"], t["bias_hh"] = r(3 * C, scale=0.3), r(3 * C, scale=0.3)
    return t


def _run(cfg, t, reverse, lengths=None, strategy=None, reference=False, **kw):
    """(output, h_n[, c_n]) of one layer through fastvid (or the reference when reference=True)."""
    if cfg.cell == "lstm":
        args = (t["x"], t["weight_ih"], t["weight_hh"], t["bias"], t["h0"], t["c0"], t.get("peephole"))
        if reference:
            assert lengths is None
            return ref.convlstm_sequence(*args, (1, 1), (1, 1), reverse)
        return fastvid.ops.convlstm(*args, reverse=reverse, strategy=strategy, lengths=lengths, **kw)
    args = (t["x"], t["weight_ih"], t["weight_hh"], t["bias_ih"], t["bias_hh"], t["h0"])
    if reference:
        assert lengths is None
        return ref.convgru_sequence(*args, (1, 1), (1, 1), cfg.reset_after, reverse)
    return fastvid.ops.convgru(*args, reset_after=cfg.reset_after, reverse=reverse, strategy=strategy,
                               lengths=lengths, **kw)


def _sample(t, b, length):
    """Sample b alone, cut to its length; weights shared."""
    out = dict(t)
    out["x"] = t["x"][b:b + 1, :length]
    for k in ("h0", "c0"):
        if k in t:
            out[k] = t[k][b:b + 1]
    return out


def _upstream(outs, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype) for o in outs]


def _loss(outs, ups):
    return sum((o.double() * u.double()).sum() for o, u in zip(outs, ups))


def _per_sample(cfg, t, reverse, ups, **run_kw):
    """Each sample alone at its length: (output zero-padded to T, h_n, c_n...) and the gradients of the
    summed losses (upstream gradients cut the same way) w.r.t. every tensor in t."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in t.items()}
    per = []
    loss = 0
    for b, length in enumerate(LENGTHS):
        outs = _run(cfg, _sample(leaves, b, length), reverse, **run_kw)
        cut = [ups[0][b:b + 1, :length]] + [u[b:b + 1] for u in ups[1:]]
        loss = loss + _loss(outs, cut)
        per.append(outs)
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    output = torch.zeros(B, T, C, H, W, dtype=per[0][0].dtype)
    for b, length in enumerate(LENGTHS):
        output[b, :length] = per[b][0][0].detach()
    states = [torch.cat([p[k].detach() for p in per]) for k in range(1, len(per[0]))]
    return [output, *states], grads


def _batched(cfg, t, reverse, lengths, strategy, ups=None, **kw):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in t.items()}
    outs = _run(cfg, leaves, reverse, lengths=lengths, strategy=strategy, **kw)
    ups = _upstream(outs) if ups is None else ups
    grads = dict(zip(leaves, torch.autograd.grad(_loss(outs, ups), list(leaves.values()))))
    return [o.detach() for o in outs], grads, ups


def _compare(ours, ours_grads, oracle, oracle_grads, what, ulps=RECURRENT_ULPS):
    names = ["output", "h_n", "c_n"]
    for name, a, o in zip(names, ours, oracle):
        assert_full_precision(a, o, f"{what}: {name}", ulps=ulps)
    for name in oracle_grads:
        assert_full_precision(ours_grads[name], oracle_grads[name], f"{what}: grad {name}", ulps=ulps)


def _check_padding_zero(output, what):
    for b, length in enumerate(LENGTHS):
        assert torch.equal(output[b, length:], torch.zeros_like(output[b, length:])), \
            f"{what}: sample {b} has nonzero output past its length {length}"


# ------------------------------------------------------------------------------ kernels vs each sample alone
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=Cfg.id)
def test_lengths_match_each_sample_alone(cfg, dtype, reverse, strategy, layout):
    """Output (zero past the length), h_n / c_n and the gradients w.r.t. x, the weights, biases, h0, c0
    and peephole of a batched call with lengths equal each sample run alone at its own length, through
    the float64 reference and through fastvid itself (same dtype, same strategy)."""
    t = _tensors(cfg, dtype)
    if layout == "channels_last":
        t["x"] = channels_last_frames(t["x"])
    lengths = torch.tensor(LENGTHS)
    ours, ours_grads, ups = _batched(cfg, t, reverse, lengths, strategy)
    _check_padding_zero(ours[0], "batched")

    oracle, oracle_grads = _per_sample(cfg, {k: v.double() for k, v in t.items()}, reverse, ups, reference=True)
    _compare(ours, ours_grads, oracle, oracle_grads, "vs fp64 reference per sample")
    alone, alone_grads = _per_sample(cfg, t, reverse, ups, strategy=strategy)
    _compare(ours, ours_grads, alone, alone_grads, "vs fastvid per sample")
    # padding frames get no gradient
    for b, length in enumerate(LENGTHS):
        assert torch.equal(ours_grads["x"][b, length:], torch.zeros_like(ours_grads["x"][b, length:]))

    with torch.no_grad():  # the inference path (save=False: LSTM keeps c in place)
        nograd = _run(cfg, t, reverse, lengths=lengths, strategy=strategy)
    for name, a, o in zip(["output", "h_n", "c_n"], nograd, oracle):
        assert_full_precision(a, o, f"no_grad {name}", ulps=RECURRENT_ULPS)


# ------------------------------------------------------------------------------ every ISA path, every dtype
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp64", "fp32", "bf16", "fp16"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=Cfg.id)
def test_lengths_exact_against_unmasked_run(cfg, strategy, dtype, cpu_isa):
    """In the forward direction a sample's first lengths[b] steps see exactly what they see without
    lengths, so on every ISA path and dtype, bit for bit: output[b, :L] equals the unmasked run's, the
    output past L is 0 and h_n[b] = unmasked output[b, L-1]. Backward with upstream gradients on the
    output (zero past L) and on h_n, which the unmasked run receives on output[b, L-1] instead: every
    gradient is identical (GRU; LSTM's grad c_n has no such twin and is 0 here)."""
    t = _tensors(cfg, dtype)
    lengths = torch.tensor(LENGTHS)
    leaves = {k: v.clone().requires_grad_(True) for k, v in t.items()}
    outs = _run(cfg, leaves, False, lengths=lengths, strategy=strategy)
    plain_leaves = {k: v.clone().requires_grad_(True) for k, v in t.items()}
    plain = _run(cfg, plain_leaves, False, strategy=strategy)
    _check_padding_zero(outs[0], cpu_isa)
    for b, length in enumerate(LENGTHS):
        assert torch.equal(outs[0][b, :length], plain[0][b, :length]), f"{cpu_isa}: output of sample {b}"
        assert torch.equal(outs[1][b], plain[0][b, length - 1]), f"{cpu_isa}: h_n of sample {b}"

    g = torch.Generator().manual_seed(3)
    g_out = torch.randn(outs[0].shape, generator=g).to(dtype)
    g_h = torch.randn(outs[1].shape, generator=g).to(dtype)
    plain_g_out = g_out.clone()
    for b, length in enumerate(LENGTHS):
        g_out[b, length:] = 0
        plain_g_out[b, length:] = 0
        plain_g_out[b, length - 1] += g_h[b]
    grads = torch.autograd.grad([outs[0], outs[1]], list(leaves.values()), [g_out, g_h])
    # the unmasked run: the same gradient reaches output[b, L-1] (a low-precision sum rounds once more)
    plain_grads = torch.autograd.grad(plain[0], list(plain_leaves.values()), plain_g_out)
    if dtype in (torch.bfloat16, torch.float16):
        return  # g_out + g_h was rounded to the dtype above: the runs see different upstream values
    for name, a, p in zip(leaves, grads, plain_grads):
        assert torch.equal(a, p), f"{cpu_isa}: grad {name} differs from the unmasked run"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=Cfg.id)
def test_lengths_low_precision_gradients_exact(cfg, dtype, cpu_isa):
    """bf16 / fp16: with upstream gradients on the output only (zero past each length) the gradients of
    a call with lengths equal those of the unmasked call bit for bit (the masked steps get none)."""
    t = _tensors(cfg, dtype)
    lengths = torch.tensor(LENGTHS)
    for strategy in STRATEGIES:
        leaves = {k: v.clone().requires_grad_(True) for k, v in t.items()}
        plain_leaves = {k: v.clone().requires_grad_(True) for k, v in t.items()}
        out = _run(cfg, leaves, False, lengths=lengths, strategy=strategy)[0]
        plain = _run(cfg, plain_leaves, False, strategy=strategy)[0]
        g_out = torch.randn(out.shape).to(dtype)
        for b, length in enumerate(LENGTHS):
            g_out[b, length:] = 0
        grads = torch.autograd.grad(out, list(leaves.values()), g_out)
        plain_grads = torch.autograd.grad(plain, list(plain_leaves.values()), g_out)
        for name, a, p in zip(leaves, grads, plain_grads):
            assert torch.equal(a, p), f"{cpu_isa} {strategy}: grad {name}"


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=Cfg.id)
def test_lengths_all_full_equals_no_lengths_bitwise(cfg, strategy, reverse):
    """lengths all equal to T: outputs, states and gradients identical to a call without lengths."""
    t = _tensors(cfg, torch.float32)
    ours, ours_grads, ups = _batched(cfg, t, reverse, torch.full((B,), T), strategy)
    plain, plain_grads, _ = _batched(cfg, t, reverse, None, strategy, ups=ups)
    for a, p in zip(ours, plain):
        assert torch.equal(a, p)
    for name in plain_grads:
        assert torch.equal(ours_grads[name], plain_grads[name]), name


# ------------------------------------------------------------------------------ modules
@pytest.mark.parametrize("kind", ["lstm", "lstm-peephole", "gru", "gru-ballas"])
def test_bidirectional_multilayer_module_matches_each_sample_alone(kind):
    """A 2-layer bidirectional module (batch_first and not) with lengths: output, h_n (c_n) and every
    parameter gradient equal the same module run on each sample alone at its length (float64)."""
    torch.manual_seed(0)
    if kind.startswith("lstm"):
        m = fastvid.nn.ConvLSTM(C_IN, 3, 3, num_layers=2, bidirectional=True, peephole=kind.endswith("peephole"))
    else:
        m = fastvid.nn.ConvGRU(C_IN, 3, 3, num_layers=2, bidirectional=True, reset_after=kind == "gru")
    m = m.double()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("peephole"):
                p.normal_(0, 0.3)
    x = torch.randn(B, T, C_IN, H, W, dtype=torch.float64)
    lengths = torch.tensor(LENGTHS)
    out, state = m(x, lengths=lengths)
    states = list(state) if isinstance(state, tuple) else [state]
    g_out = torch.randn_like(out)
    g_states = [torch.randn_like(s) for s in states]
    loss = (out * g_out).sum() + sum((s * g).sum() for s, g in zip(states, g_states))
    params = [p for _, p in m.named_parameters()]
    grads = torch.autograd.grad(loss, params)

    alone_loss = 0
    for b, length in enumerate(LENGTHS):
        o, s = m(x[b:b + 1, :length])
        s = list(s) if isinstance(s, tuple) else [s]
        assert torch.equal(out[b, length:], torch.zeros_like(out[b, length:]))
        assert_full_precision(out[b, :length], o[0], f"{kind}: output of sample {b}", ulps=RECURRENT_ULPS)
        for k, (sb, st) in enumerate(zip(s, states)):
            assert_full_precision(st[:, b], sb[:, 0], f"{kind}: state {k} of sample {b}", ulps=RECURRENT_ULPS)
        alone_loss = alone_loss + (o * g_out[b:b + 1, :length]).sum() + \
            sum((sb * g[:, b:b + 1]).sum() for sb, g in zip(s, g_states))
    alone_grads = torch.autograd.grad(alone_loss, params)
    for (name, _), a, o in zip(m.named_parameters(), grads, alone_grads):
        assert_full_precision(a, o, f"{kind}: grad {name}", ulps=RECURRENT_ULPS)

    # time-major input (batch_first=False) gives the same
    m.batch_first = False
    out_tm, _ = m(x.transpose(0, 1), lengths=lengths)
    assert torch.equal(out_tm.transpose(0, 1), out)


def test_module_lengths_on_reference_backend_matches_kernels():
    """The reference backend (the fallback without _C) honours lengths like the kernels."""
    torch.manual_seed(0)
    m = fastvid.nn.ConvLSTM(C_IN, 3, 3, num_layers=1, bidirectional=True).double()
    x = torch.randn(B, T, C_IN, H, W, dtype=torch.float64)
    lengths = torch.tensor(LENGTHS)
    out, (h_n, c_n) = m(x, lengths=lengths)
    with fastvid.backend("reference"):
        out_r, (h_r, c_r) = m(x, lengths=lengths)
    for a, o, name in ((out, out_r, "output"), (h_n, h_r, "h_n"), (c_n, c_r, "c_n")):
        assert_full_precision(a, o, name, ulps=RECURRENT_ULPS)


# ------------------------------------------------------------------------------ Triton (interpreter on CPU)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=Cfg.id)
def test_triton_backend_lengths_match_each_sample_alone(cfg, reverse):
    """The Triton backend with lengths (the step mask inside the cell kernels): values and gradients
    equal each sample alone through the float64 reference."""
    pytest.importorskip("triton")
    t = _tensors(cfg, torch.float64)
    with fastvid.backend("triton"):
        ours, ours_grads, ups = _batched(cfg, {k: v.to(TRITON_DEVICE) for k, v in t.items()}, reverse,
                                         torch.tensor(LENGTHS), None)
    ours, ours_grads, ups = [o.cpu() for o in ours], {k: g.cpu() for k, g in ours_grads.items()}, [u.cpu() for u in ups]
    _check_padding_zero(ours[0], "triton")
    oracle, oracle_grads = _per_sample(cfg, t, reverse, ups, reference=True)
    _compare(ours, ours_grads, oracle, oracle_grads, "triton vs fp64 reference per sample")


def test_triton_masked_cells_fp32():
    """The masked Triton cells in fp32 against the masked reference step (torch.where), values and
    gradients, with the mask mixing valid and masked samples."""
    pytest.importorskip("triton")
    from fastvid.triton_kernels import recurrent as tk
    lengths = torch.tensor(LENGTHS, device=TRITON_DEVICE)
    t = 3  # samples 0, 2 valid; 1 masked
    valid = (lengths > t).view(-1, 1, 1, 1)
    randn = lambda *shape: torch.randn(*shape, device=TRITON_DEVICE, requires_grad=True)  # noqa: E731
    gp, c_prev, h_prev, peephole = randn(B, 4 * C, H, W), randn(B, C, H, W), randn(B, C, H, W), randn(3, C)
    out, h, c, _ = tk.lstm_cell_masked(gp, c_prev, h_prev, lengths, t, peephole)
    h_r, c_r, _ = ref.lstm_cell(gp, c_prev, peephole)
    expect = (torch.where(valid, h_r, 0.0), torch.where(valid, h_r, h_prev), torch.where(valid, c_r, c_prev))
    ups = [torch.randn(B, C, H, W, device=TRITON_DEVICE) for _ in range(3)]
    leaves = [gp, c_prev, h_prev, peephole]
    ga = torch.autograd.grad([out, h, c], leaves, ups)
    ge = torch.autograd.grad(list(expect), leaves, ups)
    for a, e in zip((out, h, c), expect):
        torch.testing.assert_close(a, e, rtol=2e-6, atol=2e-6)
    for a, e in zip(ga, ge):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)

    for reset_after in (True, False):
        xg, hg = randn(B, 3 * C, H, W), randn(B, 3 * C, H, W)
        out, h, _ = tk.gru_cell_masked(xg, hg, h_prev, lengths, t, reset_after)
        h_r, _ = ref.gru_cell(xg, hg, h_prev, reset_after)
        expect = (torch.where(valid, h_r, 0.0), torch.where(valid, h_r, h_prev))
        leaves = [xg, hg, h_prev]
        ga = torch.autograd.grad([out, h], leaves, ups[:2])
        ge = torch.autograd.grad(list(expect), leaves, ups[:2])
        for a, e in zip((out, h), expect):
            torch.testing.assert_close(a, e, rtol=2e-6, atol=2e-6)
        for a, e in zip(ga, ge):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ bad lengths
def _bad_cases():
    return [
        ("zero", torch.tensor([5, 0, 4]), ValueError, "1..T"),
        ("too long", torch.tensor([5, 6, 4]), ValueError, "1..T"),
        ("wrong shape", torch.tensor([5, 2]), ValueError, r"\[B\]"),
        ("2-D", torch.tensor([[5, 2, 4]]), ValueError, r"\[B\]"),
        ("float", torch.tensor([5.0, 2.0, 4.0]), TypeError, "integer"),
        ("bool", torch.tensor([True, True, True]), TypeError, "integer"),
    ]


@pytest.mark.parametrize("backend", ["auto", "reference", "triton"])
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
@pytest.mark.parametrize("cfg", [Cfg("lstm"), Cfg("gru")], ids=Cfg.id)
def test_bad_lengths_raise_clear_error(cfg, case, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    _, lengths, exc, pattern = case
    t = _tensors(cfg, torch.float32)
    with fastvid.backend(backend), pytest.raises(exc, match=rf"lengths.*{pattern}|{pattern}.*lengths"):
        _run(cfg, t, False, lengths=lengths)


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_raw_op_rejects_bad_lengths(case):
    """The C++ op checks lengths itself (shape, integer dtype, values), naming the argument."""
    _, lengths, exc, _ = case
    t = _tensors(Cfg("lstm"), torch.float32)
    args = (t["x"], t["weight_ih"], t["weight_hh"], t["bias"], t["h0"], t["c0"], None, [1, 1], [1, 1], False, 0,
            False, False)
    with pytest.raises((exc, RuntimeError), match="lengths"):
        torch.ops.fastvid.convlstm_sequence(*args, lengths)


def test_module_rejects_bad_lengths():
    m = fastvid.nn.ConvGRU(C_IN, 3, 3)
    with pytest.raises(ValueError, match="lengths"):
        m(torch.randn(B, T, C_IN, H, W), lengths=torch.tensor([1, 2, T + 1]))


# ------------------------------------------------------------------------------ opcheck / compile
def _raw_args(cfg, strategy, reverse, save):
    t = _tensors(cfg, torch.float64)
    if cfg.cell == "lstm":
        return "convlstm_sequence", (t["x"], t["weight_ih"], t["weight_hh"], t["bias"], t["h0"], t["c0"],
                                     t.get("peephole"), [1, 1], [1, 1], reverse, strategy, False, save,
                                     torch.tensor(LENGTHS))
    return "convgru_sequence", (t["x"], t["weight_ih"], t["weight_hh"], t["bias_ih"], t["bias_hh"], t["h0"], [1, 1],
                                [1, 1], cfg.reset_after, reverse, strategy, False, save, torch.tensor(LENGTHS))


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("strategy", [0, 1], ids=STRATEGIES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=Cfg.id)
def test_opcheck_sequence_ops_with_lengths(cfg, strategy, reverse):
    """torch.library.opcheck (schema, fake kernel, autograd registration, AOT dispatch) of the
    sequence ops and their backward ops with lengths."""
    name, args = _raw_args(cfg, strategy, reverse, True)
    leaves = tuple(a.clone().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                   for a in args)
    op = getattr(torch.ops.fastvid, name)
    result = torch.library.opcheck(op.default, leaves)
    assert all(v == "SUCCESS" for v in result.values()), result

    forward = op(*args)
    n_states = 3 if cfg.cell == "lstm" else 2
    grads = _upstream(forward[:n_states])
    if cfg.cell == "lstm":
        bwd = (*grads, args[0], args[1], args[2], True, args[4], args[5], args[6], forward[0], forward[3],
               [1, 1], [1, 1], reverse, strategy, False, args[-1])
    else:
        bwd = (*grads, *args[:6], forward[0], forward[2], [1, 1], [1, 1], cfg.reset_after, reverse, strategy,
               False, args[-1])
    result = torch.library.opcheck(getattr(torch.ops.fastvid, name + "_backward").default, bwd)
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("cfg", [Cfg("lstm", peephole=True), Cfg("gru", reset_after=False)], ids=Cfg.id)
def test_compile_with_lengths_matches_eager(cfg):
    """torch.compile of a function calling the op with lengths: same values and gradients as eager."""
    t = _tensors(cfg, torch.float64)
    lengths = torch.tensor(LENGTHS)

    def f(tensors):
        return _run(cfg, tensors, True, lengths=lengths, strategy="concat")

    eager, eager_grads, ups = _batched(cfg, t, True, lengths, "concat")
    leaves = {k: v.clone().requires_grad_(True) for k, v in t.items()}
    compiled = torch.compile(f, backend="aot_eager", fullgraph=False)(leaves)
    grads = torch.autograd.grad(_loss(compiled, ups), list(leaves.values()))
    for a, e in zip(compiled, eager):
        torch.testing.assert_close(a.detach(), e, rtol=0, atol=0)
    for name, g in zip(leaves, grads):
        torch.testing.assert_close(g, eager_grads[name], rtol=0, atol=0)


def test_lengths_as_list_and_on_cpu_equal_tensor():
    """lengths given as a Python list, or as an int32 tensor, gives what an int64 tensor gives."""
    cfg = Cfg("gru")
    t = _tensors(cfg, torch.float32)
    ref_out = _run(cfg, t, True, lengths=torch.tensor(LENGTHS))
    for lengths in (LENGTHS, torch.tensor(LENGTHS, dtype=torch.int32)):
        out = _run(cfg, t, True, lengths=lengths)
        for a, r in zip(out, ref_out):
            assert torch.equal(a, r)


@pytest.mark.parametrize("cls", ["ConvLSTM", "ConvGRU"])
def test_lengths_with_layer_norm_is_refused(cls):
    m = getattr(fastvid.nn, cls)(2, 3, 3, norm="layer")
    with pytest.raises(ValueError, match="norm='layer'"):
        m(torch.randn(2, 3, 2, 5, 5), lengths=torch.tensor([3, 2]))


def test_winograd_refuses_lengths_and_auto_never_reuses_it_for_them():
    """The winograd loops carry h in the output frames, which a masked step zeroes: forcing it with
    lengths is refused (Python and C++), and an auto choice cached without lengths is not reused."""
    x, w_ih, w_hh = torch.randn(2, 3, 2, 6, 6), torch.randn(12, 2, 3, 3), torch.randn(12, 3, 3, 3)
    lengths = torch.tensor([3, 1])
    with pytest.raises(ValueError, match="lengths"):
        fastvid.ops.convlstm(x, w_ih, w_hh, strategy="winograd", lengths=lengths)
    h0 = torch.zeros(2, 3, 6, 6)
    with pytest.raises(ValueError, match="lengths"):
        torch.ops.fastvid.convlstm_sequence(x, w_ih, w_hh, None, h0, h0, None, [1, 1], [1, 1], False, 2, False,
                                            False, lengths)
    fastvid.ops.set_strategy("auto")
    try:
        fastvid.ops.recurrent._strategy_cache.clear()
        fastvid.ops.convlstm(x, w_ih, w_hh)  # may cache 'winograd' for this geometry
        out, h_n, c_n = fastvid.ops.convlstm(x, w_ih, w_hh, lengths=lengths)
        alone = fastvid.ops.convlstm(x[1:, :1], w_ih, w_hh, strategy="hoisted")
        torch.testing.assert_close(h_n[1:], alone[1], rtol=1e-5, atol=1e-6)
    finally:
        fastvid.ops.recurrent._strategy_cache.clear()
