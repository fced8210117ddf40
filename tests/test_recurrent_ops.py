"""ConvLSTM / ConvGRU ops: torch.ops.fastvid.* and fastvid.ops.* against fastvid.reference.

One sample list (tests/_recurrent_samples.py) feeds the value, gradient and opcheck tests. The
oracle is always the pure-PyTorch reference run in float64 on the same (rounded) inputs; bf16 is
judged with the flash-attention rule against the reference run in bf16.
"""
import pytest
import torch

import fastvid
import fastvid.ops.recurrent as ops_recurrent
from fastvid.reference import recurrent as ref

from conftest import TRITON_DEVICE, requires_cuda
from _isa import cpu_isa  # noqa: F401 (fixture: every CPU ISA path)
from _recurrent_samples import (
    CELL_CONFIGS, CELL_LAYOUTS, DTYPES, GRU_CONFIGS, LSTM_CONFIGS, SEQ_CONFIGS, SEQ_LAYOUTS, STRATEGIES,
    LOW_PRECISION, CellConfig, SeqConfig, acc_dtype, assert_parity, channels_last_frames, dtype_id,
    make_cell_sample, make_seq_sample, upstream_grads,
)

pytestmark = pytest.mark.skipif(not fastvid.info()["cpu_kernels"], reason="fastvid._C is not built")

OPS = torch.ops.fastvid


def _grads(outputs, tensors: dict, grad_outputs) -> dict:
    """d(Σ outputs·grad_outputs)/d(every present tensor)."""
    names = [k for k, v in tensors.items() if v is not None]
    grads = torch.autograd.grad(outputs, [tensors[k] for k in names], grad_outputs)
    return dict(zip(names, grads))


def _assert_dtype(t, dtype, what):
    actual = t.dtype
    assert actual == dtype, f"{what} has dtype {actual}, expected {dtype}"


def _with_grads(run, tensors: dict, grad_outputs):
    outputs = run(tensors)
    return outputs, _grads(outputs, tensors, [g.to(o.dtype) for g, o in zip(grad_outputs, outputs)])


# ====================================================================================== sequences
@pytest.mark.parametrize("layout", SEQ_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("config", SEQ_CONFIGS, ids=SeqConfig.id)
def test_sequence_matches_reference(config, reverse, strategy, dtype, layout):
    """fastvid.ops.convlstm / convgru: outputs, final states and the gradients w.r.t. every input
    (random upstream gradients on output, h_n and c_n) equal the float64 reference."""
    check_sequence(config, reverse, strategy, dtype, layout)


def check_sequence(config, reverse, strategy, dtype, layout, shape=None):
    sample = make_seq_sample(config, reverse, dtype, layout, shape)
    leaves = sample.leaves()
    ours = sample.run_ops(leaves, strategy)
    grad_outputs = upstream_grads(ours)
    ours_grads = _grads(ours, leaves, grad_outputs)

    oracle, oracle_grads = _with_grads(sample.run_reference, sample.converted(torch.float64), grad_outputs)
    comparator, comparator_grads = [None] * len(oracle), {}
    if dtype in LOW_PRECISION:
        comparator, comparator_grads = _with_grads(sample.run_reference, sample.converted(dtype), grad_outputs)

    names = ["output", "h_n", "c_n"][:len(oracle)]
    for name, a, o, c in zip(names, ours, oracle, comparator):
        _assert_dtype(a, acc_dtype(dtype) if name == "c_n" else dtype, name)
        assert_parity(a, o, dtype, name, c)
    for name in sample.names:
        _assert_dtype(ours_grads[name], leaves[name].dtype, f"grad {name}")
        assert_parity(ours_grads[name], oracle_grads[name], dtype, f"grad {name}", comparator_grads.get(name),
                      grad=True)

    # Inference path (no autograd: the op runs with save=False and keeps no caches).
    with torch.no_grad():
        ours_nograd = sample.run_ops(sample.tensors, strategy)
    for name, a, o, c in zip(names, ours_nograd, oracle, comparator):
        assert_parity(a, o, dtype, f"{name} (no_grad)", c)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("strategy", ["hoisted", "concat"])
@pytest.mark.parametrize("config", SEQ_CONFIGS, ids=SeqConfig.id)
def test_sequence_backward_chunk_boundaries(config, strategy, T, reverse):
    """The oneDNN strategies' backward sums its weight gradients over chunks of at least two steps
    (backward_chunk_steps in csrc/recurrent/recurrent_ops.cpp): a sequence shorter than a chunk (T = 1)
    and one whose last chunk is partial (T = 5: 2 + 2 + 1 steps) equal the float64 reference."""
    check_sequence(config, reverse, strategy, torch.float64, "contiguous", shape=(2, T, 3, 4, 5, 6))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("config", SEQ_CONFIGS, ids=SeqConfig.id)
def test_sequence_fp16_on_cpu(config, strategy, layout):
    """fp16 CPU tensors (dispatched to the CPU kernels, never tested before): outputs, final states and
    every gradient against the float64 reference by the flash-attention rule, the reference run in
    fp16 as yardstick; reverse for the concat strategy, forward for hoisted (both are in the bf16 grid)."""
    check_sequence(config, strategy == "concat", strategy, torch.float16, layout)


@pytest.mark.parametrize("config", CELL_CONFIGS, ids=CellConfig.id)
def test_cell_fp16_on_cpu(config):
    check_cell(config, torch.float16, "contiguous")


@pytest.mark.parametrize("layout", SEQ_LAYOUTS)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("config", SEQ_CONFIGS, ids=SeqConfig.id)
def test_sequence_grad_of_output_only(config, strategy, layout):
    """The usual training case: the loss uses only the output sequence (no gradient flows into h_n
    or c_n, so the backward op gets grad_h_n = grad_c_n = None)."""
    sample = make_seq_sample(config, reverse=False, dtype=torch.float32, layout=layout)
    leaves = sample.leaves()
    output = sample.run_ops(leaves, strategy)[0]
    (grad_output,) = upstream_grads([output])
    ours = _grads([output], leaves, [grad_output])
    t64 = sample.converted(torch.float64)
    expected = _grads([sample.run_reference(t64)[0]], t64, [grad_output.double()])
    for name in sample.names:
        assert_parity(ours[name], expected[name], torch.float32, f"grad {name}")


def test_channels_last_sequence_output_keeps_layout():
    """channels_last frames in, channels_last frames out (the layout the op itself allocates for
    channels-last input): the kernels' channels-last path must be taken for B > 1 and T > 1 too,
    not only when a single frame x[:, t] happens to be channels_last-contiguous (B = 1 or T = 1)."""
    for config in (LSTM_CONFIGS[0], GRU_CONFIGS[0]):
        sample = make_seq_sample(config, dtype=torch.float32, layout="channels_last")
        assert sample.tensors["x"].shape[0] > 1 and sample.tensors["x"].shape[1] > 1
        with torch.no_grad():
            output = sample.run_ops(sample.tensors, "hoisted")[0]
        assert output.permute(0, 1, 3, 4, 2).is_contiguous(), (
            f"{config.kind}: channels_last input gave output strides {output.stride()} "
            f"(expected channels-last frames like {channels_last_frames(output).stride()})")


# ========================================================================================= cells
@pytest.mark.parametrize("layout", CELL_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("config", CELL_CONFIGS, ids=CellConfig.id)
def test_cell_matches_reference(config, dtype, layout, cpu_isa):
    """torch.ops.fastvid.<cell> outputs (incl. the gates / cache it saves for backward) and the
    gradients of fastvid.ops.<cell> w.r.t. every input equal the float64 reference, on every CPU ISA
    path."""
    check_cell(config, dtype, layout)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_cells_saturate_and_propagate_nan(dtype, layout, cpu_isa):
    """Pre-activations far outside exp's clamped range (±1e4, ±88), zeros and NaN (also in the states)
    through lstm_cell and gru_cell (the CPU rows run vectors of 8 / 16 lanes and a scalar tail: 37
    pixels per row, 19 channels): NaN exactly where the float64 reference has NaN (a NaN cell state
    reaches c and h but not the gates of a cell without peepholes), every other value within fp32 /
    bf16 rounding of it, on every ISA path. (No ±inf: fp64's sigmoid reaches exactly 0 where float's
    stops at ~1e-38, so 0·inf is NaN in the reference only.)"""
    gen = torch.Generator().manual_seed(3)
    B, C, H, W = 2, 19, 1, 37
    special = torch.tensor([1e4, -1e4, 88.0, -88.0, 0.0, float("nan")])

    def frames(channels, specials=special):
        t = torch.randn(B, channels, H, W, generator=gen) * 3
        flat = t.view(-1)
        where = torch.randperm(flat.numel(), generator=gen)[: flat.numel() // 4]
        flat[where] = specials[torch.arange(where.numel()) % specials.numel()]
        t = t.to(dtype)
        return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t

    states = torch.tensor([0.0, float("nan")])
    gates, c_prev = frames(4 * C), frames(C, states).float()
    x_gates, h_gates, h_prev = frames(3 * C), frames(3 * C), frames(C, states)
    cases = [("lstm_cell", torch.ops.fastvid.lstm_cell(gates, c_prev, None),
              ref.lstm_cell(gates.double(), c_prev.double())),
             ("gru_cell", torch.ops.fastvid.gru_cell(x_gates, h_gates, h_prev, True),
              ref.gru_cell(x_gates.double(), h_gates.double(), h_prev.double()))]
    rtol = 1e-5 if dtype == torch.float32 else 1e-2
    for op, ours, oracle in cases:
        for i, (a, o) in enumerate(zip(ours, oracle)):
            a, o = a.double(), o.double()
            assert torch.equal(a.isnan(), o.isnan()), f"{op} output {i}: NaN at other places than the reference"
            finite = ~o.isnan()
            torch.testing.assert_close(a[finite], o[finite], rtol=rtol, atol=rtol,
                                       msg=lambda m: f"{op} output {i} ({dtype}, {layout}): {m}")


def check_cell(config, dtype, layout):
    sample = make_cell_sample(config, dtype, layout)
    raw = sample.op()(*sample.op_args(sample.tensors))
    raw = raw if isinstance(raw, (tuple, list)) else (raw,)
    t64 = sample.converted(torch.float64)
    oracle = sample.run_reference(t64)
    comparator = [None] * len(oracle)
    if dtype in LOW_PRECISION:
        t_lp = sample.converted(dtype)
        comparator = sample.run_reference(t_lp)
    assert len(raw) == len(oracle)
    for i, (a, o, c) in enumerate(zip(raw, oracle, comparator)):
        _assert_dtype(a, acc_dtype(dtype) if (config.op == "lstm_cell" and i == 1) else dtype, f"output {i}")
        assert_parity(a, o, dtype, f"{config.op} output {i}", c)

    leaves = sample.leaves()
    ours = sample.run_ops(leaves)
    n = sample.num_public_outputs
    assert len(ours) == n
    grad_outputs = upstream_grads(ours)
    ours_grads = _grads(ours, leaves, grad_outputs)
    oracle_grads = _grads(oracle[:n], t64, [g.double() for g in grad_outputs])
    comparator_grads = {}
    if dtype in LOW_PRECISION:
        comparator_grads = _grads(comparator[:n], t_lp, [g.to(o.dtype) for g, o in zip(grad_outputs, comparator)])
    for name in sample.names:
        _assert_dtype(ours_grads[name], leaves[name].dtype, f"grad {name}")
        assert_parity(ours_grads[name], oracle_grads[name], dtype, f"grad {name}", comparator_grads.get(name),
                      grad=True)


def test_lstm_cell_grad_of_c_only():
    """Backward with only c used (grad_h is None inside the op) still gives the reference gradients."""
    sample = make_cell_sample(CELL_CONFIGS[1])
    leaves, t64 = sample.leaves(), sample.converted(torch.float64)
    _, c = fastvid.ops.lstm_cell(leaves["gates_pre"], leaves["c_prev"], leaves["peephole"])
    _, c_ref, _ = ref.lstm_cell(t64["gates_pre"], t64["c_prev"], t64["peephole"])
    g = upstream_grads([c])[0]
    ours = torch.autograd.grad(c, [leaves[k] for k in sample.names], g)
    expected = torch.autograd.grad(c_ref, [t64[k] for k in sample.names], g)
    for name, a, e in zip(sample.names, ours, expected):
        assert_parity(a, e, torch.float64, f"grad {name}")


# ===================================================================================== gradcheck
TINY = (1, 2, 2, 2, 3, 4)  # B, T, C_in, C, H, W


def _gradcheck(fn, tensors: dict):
    names = [k for k, v in tensors.items() if v is not None]

    def f(*args):
        return fn(dict(tensors, **dict(zip(names, args))))

    assert torch.autograd.gradcheck(f, [tensors[k] for k in names], eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("config", [c for c in CELL_CONFIGS if c.op != "lstm_cell" or c.peephole], ids=CellConfig.id)
def test_gradcheck_cells(config):
    sample = make_cell_sample(config, torch.float64, shape=(2, 2, 2, 3))
    _gradcheck(sample.run_ops, sample.leaves())


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("config,reverse", [(LSTM_CONFIGS[0], False), (LSTM_CONFIGS[0], True),
                                            (GRU_CONFIGS[0], True), (GRU_CONFIGS[2], False)],
                         ids=lambda v: v.id() if isinstance(v, SeqConfig) else ("reverse" if v else "forward"))
def test_gradcheck_sequences(config, reverse, strategy):
    sample = make_seq_sample(config, reverse, torch.float64, shape=TINY)
    _gradcheck(lambda t: sample.run_ops(t, strategy), sample.leaves())


# ======================================================================================= opcheck
def _opcheck(op, args):
    result = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous"])
@pytest.mark.parametrize("config", CELL_CONFIGS, ids=CellConfig.id)
def test_opcheck_cell_forward(config, layout):
    sample = make_cell_sample(config, torch.float64, layout)
    _opcheck(sample.op(), sample.op_args(sample.leaves()))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("config", CELL_CONFIGS, ids=CellConfig.id)
def test_opcheck_cell_backward(config, layout):
    sample = make_cell_sample(config, torch.float64, layout)
    t = sample.tensors
    out = sample.op()(*sample.op_args(t))
    if config.op == "lstm_cell":
        h, c, gates = out
        grad_h, grad_c = upstream_grads([h, c])
        _opcheck(OPS.lstm_cell_backward.default, (grad_h, grad_c, gates, t["c_prev"], c, t["peephole"]))
        _opcheck(OPS.lstm_cell_backward.default, (None, grad_c, gates, t["c_prev"], c, t["peephole"]))
    elif config.op == "gru_cell":
        h, cache = out
        (grad_h,) = upstream_grads([h])
        _opcheck(OPS.gru_cell_backward.default, (grad_h, cache, t["h_prev"], config.reset_after))
    else:
        (grad,) = upstream_grads([out])
        _opcheck(OPS.gru_reset_hidden_backward.default, (grad, t["x_r"], t["h_r"], t["h_prev"]))


def _seq_op(config, backward=False):
    name = ("convlstm_sequence" if config.kind == "lstm" else "convgru_sequence") + ("_backward" if backward else "")
    return getattr(OPS, name).default


# Every (strategy, reverse) pair for every config (the product, not reverse tied to the strategy); the
# frame layouts rotate over the configs so each (strategy, reverse, layout) triple is covered too.
OPCHECK_LAYOUTS = ("contiguous", "channels_last", "channels_last_b1", "noncontiguous")
SEQ_OPCHECK_CASES = [(c, s, r, save, OPCHECK_LAYOUTS[(i + s) % len(OPCHECK_LAYOUTS)])
                     for i, c in enumerate(SEQ_CONFIGS) for s in (0, 1) for r in (False, True) for save in (True, False)]


@pytest.mark.parametrize("config,strategy,reverse,save,layout", SEQ_OPCHECK_CASES,
                         ids=[f"{c.id()}-s{s}-{'reverse' if r else 'forward'}-{'save' if save else 'nosave'}-{layout}"
                              for c, s, r, save, layout in SEQ_OPCHECK_CASES])
def test_opcheck_sequence_forward(config, strategy, reverse, save, layout):
    """save=True with inputs requiring grad (autograd is exercised); save=False without (its
    backward refuses to run by design)."""
    sample = make_seq_sample(config, reverse=reverse, dtype=torch.float64, layout=layout)
    tensors = sample.leaves() if save else sample.tensors
    _opcheck(_seq_op(config), sample.op_args(tensors, strategy, save))


SEQ_BACKWARD_OPCHECK_CASES = [(c, s, r, ("contiguous", "channels_last", "channels_last_b1")[(i + s + r) % 3])
                              for i, c in enumerate(SEQ_CONFIGS) for s in (0, 1) for r in (False, True)]


@pytest.mark.parametrize("config,strategy,reverse,layout", SEQ_BACKWARD_OPCHECK_CASES,
                         ids=[f"{c.id()}-s{s}-{'reverse' if r else 'forward'}-{layout}"
                              for c, s, r, layout in SEQ_BACKWARD_OPCHECK_CASES])
def test_opcheck_sequence_backward(config, strategy, reverse, layout):
    sample = make_seq_sample(config, reverse=reverse, dtype=torch.float64, layout=layout)
    forward = _seq_op(config)(*sample.op_args(sample.tensors, strategy, True))
    n_states = 3 if config.kind == "lstm" else 2
    grads = upstream_grads(forward[:n_states])
    _opcheck(_seq_op(config, True), sample.backward_op_args(sample.tensors, strategy, grads, forward))
    # Optional upstream gradients: only the output's, then only the final state's.
    only_output = (grads[0],) + (None,) * (n_states - 1)
    _opcheck(_seq_op(config, True), sample.backward_op_args(sample.tensors, strategy, only_output, forward))
    only_h_n = (None, grads[1]) + (None,) * (n_states - 2)
    _opcheck(_seq_op(config, True), sample.backward_op_args(sample.tensors, strategy, only_h_n, forward))


def test_opcheck_cases_cover_reverse_times_strategy():
    """The opcheck grids hold every (config, strategy, reverse) combination, each layout for each
    (strategy, reverse) pair (the old grid tied reverse to the strategy)."""
    for cases in (SEQ_OPCHECK_CASES, SEQ_BACKWARD_OPCHECK_CASES):
        combos = {(c, s, r) for c, s, r, *_ in cases}
        assert combos == {(c, s, r) for c in SEQ_CONFIGS for s in (0, 1) for r in (False, True)}
    assert {(s, r, layout) for _, s, r, _, layout in SEQ_OPCHECK_CASES} == \
        {(s, r, layout) for s in (0, 1) for r in (False, True) for layout in OPCHECK_LAYOUTS}
    assert {(s, r, layout) for _, s, r, layout in SEQ_BACKWARD_OPCHECK_CASES} == \
        {(s, r, layout) for s in (0, 1) for r in (False, True) for layout in ("contiguous", "channels_last",
                                                                              "channels_last_b1")}


def test_sequence_backward_op_optional_grads_match_reference():
    """convlstm_sequence_backward with grad_output / grad_c_n omitted equals the reference gradient of
    the remaining terms (None must mean zero, not garbage)."""
    config = LSTM_CONFIGS[0]
    sample = make_seq_sample(config, reverse=False, dtype=torch.float64)
    for strategy in (0, 1):
        forward = OPS.convlstm_sequence(*sample.op_args(sample.tensors, strategy, True))
        (grad_h_n,) = upstream_grads([forward[1]])
        got = OPS.convlstm_sequence_backward(*sample.backward_op_args(sample.tensors, strategy,
                                                                      (None, grad_h_n, None), forward))
        t64 = sample.converted(torch.float64)
        _, h_n, _ = sample.run_reference(t64)
        expected = torch.autograd.grad(h_n, [t64[k] for k in sample.names], grad_h_n)
        order = ["x", "weight_ih", "weight_hh", "bias", "h0", "c0", "peephole"]
        for name, e in zip(sample.names, expected):
            assert_parity(got[order.index(name)], e, torch.float64, f"strategy {strategy}: grad {name}")


# =============================================================================== double backward
def _double_backward_cases():
    def lstm_cell():
        s = make_cell_sample(CELL_CONFIGS[1])
        t = s.leaves()
        h, c = fastvid.ops.lstm_cell(t["gates_pre"], t["c_prev"], t["peephole"])
        return (h.sum() + c.sum()), t["gates_pre"]

    def gru_cell():
        s = make_cell_sample(CELL_CONFIGS[2])
        t = s.leaves()
        return fastvid.ops.gru_cell(t["x_gates"], t["h_gates"], t["h_prev"]).sum(), t["x_gates"]

    def gru_reset_hidden():
        s = make_cell_sample(CELL_CONFIGS[4])
        t = s.leaves()
        return fastvid.ops.gru_reset_hidden(t["x_r"], t["h_r"], t["h_prev"]).pow(2).sum(), t["h_prev"]

    def convlstm(strategy):
        def case():
            s = make_seq_sample(LSTM_CONFIGS[0])
            t = s.leaves()
            out, h, c = s.run_ops(t, strategy)
            return out.pow(2).sum() + c.sum(), t["x"]
        return case

    def convgru(strategy):
        def case():
            s = make_seq_sample(GRU_CONFIGS[2])
            t = s.leaves()
            out, h = s.run_ops(t, strategy)
            return out.pow(2).sum(), t["x"]
        return case

    return {"lstm_cell_backward": lstm_cell, "gru_cell_backward": gru_cell,
            "gru_reset_hidden_backward": gru_reset_hidden,
            "convlstm_sequence_backward-hoisted": convlstm("hoisted"),
            "convlstm_sequence_backward-concat": convlstm("concat"),
            "convgru_sequence_backward-hoisted": convgru("hoisted"),
            "convgru_sequence_backward-concat": convgru("concat")}


DOUBLE_BACKWARD_CASES = _double_backward_cases()


@pytest.mark.parametrize("case", list(DOUBLE_BACKWARD_CASES))
def test_double_backward_raises(case):
    """The backward ops' autograd raises instead of returning wrong second derivatives."""
    loss, wrt = DOUBLE_BACKWARD_CASES[case]()
    (grad,) = torch.autograd.grad(loss, wrt, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(grad.pow(2).sum(), wrt)


@pytest.mark.parametrize("config", [CELL_CONFIGS[1], CELL_CONFIGS[2], CELL_CONFIGS[4]], ids=CellConfig.id)
def test_backward_op_called_with_grad_inputs_refuses_backward(config):
    """Calling a *_backward op directly on inputs that require grad, then differentiating it."""
    sample = make_cell_sample(config)
    t = sample.tensors
    out = sample.op()(*sample.op_args(t))
    if config.op == "lstm_cell":
        h, c, gates = out
        grads = OPS.lstm_cell_backward(torch.ones_like(h).requires_grad_(), None, gates, t["c_prev"], c,
                                       t["peephole"])
    elif config.op == "gru_cell":
        grads = OPS.gru_cell_backward(torch.ones_like(out[0]).requires_grad_(), out[1], t["h_prev"], True)
    else:
        grads = OPS.gru_reset_hidden_backward(torch.ones_like(out).requires_grad_(), t["x_r"], t["h_r"], t["h_prev"])
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        sum(g.sum() for g in grads).backward()


def test_sequence_backward_op_called_with_grad_inputs_refuses_backward():
    for config in (LSTM_CONFIGS[0], GRU_CONFIGS[0]):
        sample = make_seq_sample(config)
        forward = _seq_op(config)(*sample.op_args(sample.tensors, 0, True))
        n_states = 3 if config.kind == "lstm" else 2
        grads = tuple(g.requires_grad_() for g in upstream_grads(forward[:n_states]))
        result = _seq_op(config, True)(*sample.backward_op_args(sample.tensors, 0, grads, forward))
        with pytest.raises(RuntimeError, match="double backward is not supported"):
            result[0].sum().backward()


def test_backward_after_save_false_raises():
    """A forward run without caches (save=False) cannot be differentiated: a clear error, not zeros."""
    sample = make_seq_sample(LSTM_CONFIGS[0])
    t = sample.leaves()
    output = OPS.convlstm_sequence(*sample.op_args(t, 0, False))[0]
    with pytest.raises(RuntimeError, match="save=False"):
        output.sum().backward()


# ===================================================================================== bad input
def _lstm_inputs(**overrides):
    s = make_seq_sample(LSTM_CONFIGS[0], dtype=torch.float32)
    t = dict(s.tensors)
    t.update(overrides)
    return t


def _convlstm(t, **kw):
    return fastvid.ops.convlstm(t["x"], t["weight_ih"], t["weight_hh"], t.get("bias"), t.get("h0"), t.get("c0"),
                                t.get("peephole"), **kw)


def _gru_inputs(**overrides):
    s = make_seq_sample(GRU_CONFIGS[0], dtype=torch.float32)
    t = dict(s.tensors)
    t.update(overrides)
    return t


def _convgru(t, **kw):
    return fastvid.ops.convgru(t["x"], t["weight_ih"], t["weight_hh"], t.get("bias_ih"), t.get("bias_hh"),
                               t.get("h0"), **kw)


def _x():
    return _lstm_inputs()["x"]


BAD_INPUTS = {
    # name: (callable, exception types, regex the message must match (names the argument))
    "lstm-x-rank-4": (lambda: _convlstm(_lstm_inputs(x=_x()[:, 0])), (ValueError,), r"\bx\b.*\[B, T, C_in, H, W\]"),
    "gru-x-rank-6": (lambda: _convgru(_gru_inputs(x=_x()[None])), (ValueError,), r"\bx\b.*\[B, T, C_in, H, W\]"),
    "lstm-channel-mismatch": (lambda: _convlstm(_lstm_inputs(x=_x()[:, :, :2])), (ValueError,),
                              r"weight_ih.*C_in"),
    "gru-channel-mismatch": (lambda: _convgru(_gru_inputs(x=torch.randn(2, 3, 5, 5, 6))), (ValueError,),
                             r"weight_ih.*C_in"),
    "lstm-weight_hh-mismatch": (lambda: _convlstm(_lstm_inputs(weight_hh=torch.randn(16, 5, 3, 3))),
                                (ValueError,), r"weight_hh"),
    "lstm-h0-shape": (lambda: _convlstm(_lstm_inputs(h0=torch.zeros(2, 5, 5, 6))), (ValueError,), r"\bh0\b"),
    "lstm-c0-shape": (lambda: _convlstm(_lstm_inputs(c0=torch.zeros(2, 4, 5, 7))), (ValueError,), r"\bc0\b"),
    "gru-h0-shape": (lambda: _convgru(_gru_inputs(h0=torch.zeros(3, 4, 5, 6))), (ValueError,), r"\bh0\b"),
    "lstm-peephole-shape": (lambda: _convlstm(_lstm_inputs(peephole=torch.zeros(3, 5))), (ValueError,),
                            r"peephole"),
    "lstm-bias-shape": (lambda: _convlstm(_lstm_inputs(bias=torch.zeros(12))), (ValueError,), r"\bbias\b"),
    "gru-bias_hh-shape": (lambda: _convgru(_gru_inputs(bias_hh=torch.zeros(16))), (ValueError,), r"bias_hh"),
    "lstm-x-int": (lambda: _convlstm(_lstm_inputs(x=_x().to(torch.int32))), (TypeError, ValueError),
                   r"\bx\b.*floating"),
    "gru-x-int": (lambda: _convgru(_gru_inputs(x=_x().to(torch.int64))), (TypeError, ValueError),
                  r"\bx\b.*floating"),
    "lstm-h0-int": (lambda: _convlstm(_lstm_inputs(h0=torch.zeros(2, 4, 5, 6, dtype=torch.int32))),
                    (TypeError, ValueError), r"\bh0\b"),
    "lstm-weight-dtype": (lambda: _convlstm(_lstm_inputs(weight_ih=torch.randn(16, 3, 3, 3, dtype=torch.float64))),
                          (TypeError, ValueError), r"weight_ih.*dtype"),
    "lstm-T-0": (lambda: _convlstm(_lstm_inputs(x=_x()[:, :0])), (ValueError,), r"T = 0|sequence length"),
    "gru-T-0": (lambda: _convgru(_gru_inputs(x=_x()[:, :0])), (ValueError,), r"T = 0|sequence length"),
    "lstm-T-0-hoisted": (lambda: _convlstm(_lstm_inputs(x=_x()[:, :0]), strategy="hoisted"), (ValueError,),
                         r"T = 0|sequence length"),
    "lstm-even-kernel": (lambda: _convlstm(_lstm_inputs(weight_ih=torch.randn(16, 3, 2, 2),
                                                        weight_hh=torch.randn(16, 4, 2, 2))),
                         (ValueError,), r"odd kernel"),
    "gru-even-kernel": (lambda: _convgru(_gru_inputs(weight_ih=torch.randn(12, 3, 3, 4),
                                                     weight_hh=torch.randn(12, 4, 3, 4))),
                        (ValueError,), r"odd kernel"),
    "lstm-unknown-strategy": (lambda: _convlstm(_lstm_inputs(), strategy="fastest"), (ValueError,),
                              r"strategy.*'fastest'"),
    "gru-unknown-strategy": (lambda: _convgru(_gru_inputs(), strategy="fused"), (ValueError,), r"strategy.*'fused'"),
    "set_strategy-unknown": (lambda: fastvid.ops.set_strategy("quick"), (ValueError,), r"strategy.*'quick'"),
    "cell-gates-int": (lambda: fastvid.ops.lstm_cell(torch.zeros(2, 16, 5, 6, dtype=torch.int32),
                                                     torch.zeros(2, 4, 5, 6)), (TypeError, ValueError),
                       r"gates_pre.*floating"),
    "cell-gates-channels": (lambda: fastvid.ops.lstm_cell(torch.zeros(2, 15, 5, 6), torch.zeros(2, 4, 5, 6)),
                            (ValueError,), r"gates_pre.*multiple of 4"),
    "cell-c_prev-shape": (lambda: fastvid.ops.lstm_cell(torch.zeros(2, 16, 5, 6), torch.zeros(2, 4, 6, 6)),
                          (ValueError,), r"c_prev"),
    "cell-gates-rank": (lambda: fastvid.ops.lstm_cell(torch.zeros(2, 16, 5), torch.zeros(2, 4, 5)),
                        (ValueError,), r"gates_pre"),
    "gru-cell-h_prev-shape": (lambda: fastvid.ops.gru_cell(torch.zeros(2, 12, 5, 6), torch.zeros(2, 12, 5, 6),
                                                           torch.zeros(2, 5, 5, 6)), (ValueError,), r"h_prev"),
    "gru-cell-h_gates-dtype": (lambda: fastvid.ops.gru_cell(torch.zeros(2, 12, 5, 6),
                                                            torch.zeros(2, 12, 5, 6, dtype=torch.float64),
                                                            torch.zeros(2, 4, 5, 6)), (TypeError, ValueError),
                               r"h_gates"),
    "reset-hidden-h_r-shape": (lambda: fastvid.ops.gru_reset_hidden(torch.zeros(2, 4, 5, 6), torch.zeros(2, 4, 5, 5),
                                                                    torch.zeros(2, 4, 5, 6)), (ValueError,), r"h_r"),
}


@pytest.mark.parametrize("op", ["lstm", "gru"])
def test_empty_batch_gives_empty_results_and_zero_weight_gradients(op):
    """B = 0 runs as in nn.LSTM / nn.GRU: output [0, T, C, H, W], states [0, C, H, W], every weight and bias
    gradient zero (before: 'x has batch size B = 0')."""
    inputs = _lstm_inputs(x=_x()[:0], h0=None, c0=None) if op == "lstm" else _gru_inputs(x=_x()[:0], h0=None)
    leaves = {name: t.detach().requires_grad_() for name, t in inputs.items()
              if isinstance(t, torch.Tensor) and t.is_floating_point()}
    results = (_convlstm if op == "lstm" else _convgru)({**inputs, **leaves})
    B, T, _, H, W = leaves["x"].shape
    C = leaves["weight_hh"].shape[1]
    assert results[0].shape == (0, T, C, H, W) and all(r.shape == (0, C, H, W) for r in results[1:])
    sum(r.sum() for r in results).backward()
    for name, t in leaves.items():
        assert t.grad is not None and torch.equal(t.grad, torch.zeros_like(t)), name


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_clear_error(case):
    fn, exceptions, pattern = BAD_INPUTS[case]
    with pytest.raises(exceptions, match=pattern):
        fn()


def test_unknown_backend_name():
    with pytest.raises(ValueError, match=r"backend.*'gpu'"):
        fastvid.set_backend("gpu")
    with pytest.raises(ValueError, match=r"backend.*'fast'"):
        with fastvid.backend("fast"):
            pass
    assert fastvid.get_backend() == "auto"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks forcing 'cuda' on a machine without a GPU")
def test_forcing_cuda_backend_on_cpu_tensors():
    t = _lstm_inputs()
    with fastvid.backend("cuda"):
        with pytest.raises(RuntimeError, match=r"'cuda'.*CUDA tensors"):
            _convlstm(t)
        with pytest.raises(RuntimeError, match=r"'cuda'.*CUDA tensors"):
            fastvid.ops.gru_cell(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2), torch.zeros(1, 1, 2, 2))


@pytest.mark.parametrize("which", ["weight_hh", "h0", "c0", "peephole"])
def test_mixed_devices_public_api(which):
    """One tensor on another device (meta stands in for a GPU here): a RuntimeError naming the devices."""
    t = _lstm_inputs()
    t[which] = t[which].to("meta")
    with pytest.raises(RuntimeError, match=r"device.*(cpu.*meta|meta.*cpu)"):
        _convlstm(t)


def test_mixed_devices_public_api_cells():
    with pytest.raises(RuntimeError, match=r"device.*(cpu.*meta|meta.*cpu)"):
        fastvid.ops.lstm_cell(torch.zeros(2, 16, 5, 6), torch.zeros(2, 4, 5, 6, device="meta"))
    with pytest.raises(RuntimeError, match=r"device.*(cpu.*meta|meta.*cpu)"):
        fastvid.ops.gru_cell(torch.zeros(2, 12, 5, 6), torch.zeros(2, 12, 5, 6, device="meta"),
                             torch.zeros(2, 4, 5, 6))


def test_mixed_devices_raw_ops_raise():
    """torch.ops.fastvid.* called directly with CPU and meta tensors must raise like ATen ops do
    ("Tensor on device meta is not on the expected device cpu"), not return uninitialised CPU tensors."""
    with pytest.raises(RuntimeError):
        torch.add(torch.zeros(2), torch.zeros(2, device="meta"))  # the ATen behaviour
    with pytest.raises(RuntimeError, match="meta"):
        OPS.lstm_cell(torch.randn(2, 16, 5, 6), torch.zeros(2, 4, 5, 6, device="meta"), None)
    t = _lstm_inputs()
    sample = make_seq_sample(LSTM_CONFIGS[0], dtype=torch.float32)
    args = list(sample.op_args(t, 0, False))
    args[2] = args[2].to("meta")  # weight_hh
    with pytest.raises(RuntimeError, match="meta"):
        OPS.convlstm_sequence(*args)


# ===================================================================================== strategy
@pytest.fixture
def restore_strategy():
    saved = ops_recurrent._default_strategy
    yield
    fastvid.ops.set_strategy(saved)


@pytest.mark.parametrize("config", [LSTM_CONFIGS[0], GRU_CONFIGS[2]], ids=SeqConfig.id)
def test_auto_strategy_is_timed_once_and_cached(config, restore_strategy, monkeypatch):
    fastvid.ops.set_strategy("auto")
    assert fastvid.ops.chosen_strategies() == {}
    timer_calls = []
    real_perf_counter = ops_recurrent.time.perf_counter

    def counting_perf_counter():
        timer_calls.append(1)
        return real_perf_counter()

    monkeypatch.setattr(ops_recurrent.time, "perf_counter", counting_perf_counter)
    sample = make_seq_sample(config, dtype=torch.float32)
    first = sample.run_ops(sample.tensors, None)
    chosen = fastvid.ops.chosen_strategies()
    assert len(chosen) == 1 and list(chosen.values())[0] in fastvid.ops.STRATEGIES, chosen
    key = list(chosen)[0]
    B, _, C_in, H, W = sample.tensors["x"].shape
    assert key[:6] == ("cpu", torch.float32, B, C_in, H, W), key  # per-step geometry, not T (test_strategy_cache.py)
    calls_after_first = len(timer_calls)
    assert calls_after_first >= 2  # both strategies were timed

    second = sample.run_ops(sample.tensors, None)
    assert len(timer_calls) == calls_after_first, "the cached choice was timed again"
    assert fastvid.ops.chosen_strategies() == chosen

    # A different shape gets its own entry.
    other = make_seq_sample(config, dtype=torch.float32, shape=(1, 2, 3, 4, 5, 6))
    other.run_ops(other.tensors, None)
    assert len(fastvid.ops.chosen_strategies()) == 2

    oracle = sample.run_reference(sample.converted(torch.float64, requires_grad=False))
    for outputs, what in ((first, "auto (first call)"), (second, "auto (cached)"),
                          (sample.run_ops(sample.tensors, "hoisted"), "hoisted"),
                          (sample.run_ops(sample.tensors, "concat"), "concat")):
        for a, o in zip(outputs, oracle):
            assert_parity(a, o, torch.float32, what)

    fastvid.ops.set_strategy("hoisted")
    assert fastvid.ops.chosen_strategies() == {}  # set_strategy clears the cache
    sample.run_ops(sample.tensors, None)
    assert fastvid.ops.chosen_strategies() == {}  # a fixed strategy is not timed


def test_default_strategy_is_auto():
    assert ops_recurrent._default_strategy == "auto"


# ===================================================================================== autocast
@pytest.mark.parametrize("config", [LSTM_CONFIGS[0], GRU_CONFIGS[0], GRU_CONFIGS[2]], ids=SeqConfig.id)
def test_autocast_bf16(config):
    """Under CPU bf16 autocast the sequence runs in bf16 (c_n stays fp32); values and parameter
    gradients are as close to the fp64 result as the reference under the same autocast."""
    sample = make_seq_sample(config, dtype=torch.float32)
    leaves = sample.leaves()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = sample.run_ops(leaves, None)
    _assert_dtype(ours[0], torch.bfloat16, "output")
    _assert_dtype(ours[1], torch.bfloat16, "h_n")
    if config.kind == "lstm":
        _assert_dtype(ours[2], torch.float32, "c_n")
    grad_outputs = upstream_grads(ours)
    ours_grads = _grads(ours, leaves, grad_outputs)
    for name in sample.names:
        _assert_dtype(ours_grads[name], torch.float32, f"grad {name}")

    oracle, oracle_grads = _with_grads(sample.run_reference, sample.converted(torch.float64), grad_outputs)
    # Comparator: the pure-PyTorch reference backend under the same autocast (bf16 convs, fp32 gate math).
    comparator_inputs = sample.converted(torch.float32)
    with fastvid.backend("reference"), torch.autocast("cpu", dtype=torch.bfloat16):
        comparator, comparator_grads = _with_grads(lambda t: sample.run_ops(t, None), comparator_inputs,
                                                   grad_outputs)
    _assert_dtype(comparator[0], torch.bfloat16, "reference output under autocast")
    for i, (a, o, c) in enumerate(zip(ours, oracle, comparator)):
        assert_parity(a, o, torch.bfloat16, f"output {i}", c)
    for name in sample.names:
        assert_parity(ours_grads[name], oracle_grads[name], torch.bfloat16, f"grad {name}", comparator_grads[name],
                      grad=True)


# ========================================================================================== CUDA
def _to_cuda(tensors: dict) -> dict:
    return {k: None if v is None else v.detach().cuda().requires_grad_() for k, v in tensors.items()}


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("config", SEQ_CONFIGS, ids=SeqConfig.id)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_sequence_matches_cpu_reference(config, strategy, dtype, layout):
    sample = make_seq_sample(config, reverse=True, dtype=dtype, layout=layout)
    leaves = _to_cuda(sample.tensors)
    if layout == "channels_last":
        leaves["x"] = channels_last_frames(leaves["x"].detach()).requires_grad_()
    with fastvid.backend("cuda"):
        ours = sample.run_ops(leaves, strategy)
    assert all(o.is_cuda for o in ours)
    grad_outputs = upstream_grads(ours)
    ours_grads = _grads(ours, leaves, [g.cuda() for g in grad_outputs])
    oracle, oracle_grads = _with_grads(sample.run_reference, sample.converted(torch.float64), grad_outputs)
    comparator, comparator_grads = [None] * len(oracle), {}
    if dtype == torch.bfloat16:
        comparator, comparator_grads = _with_grads(sample.run_reference, sample.converted(dtype), grad_outputs)
    for i, (a, o, c) in enumerate(zip(ours, oracle, comparator)):
        assert_parity(a.cpu(), o, dtype, f"output {i}", c)
    for name in sample.names:
        assert_parity(ours_grads[name].cpu(), oracle_grads[name], dtype, f"grad {name}", comparator_grads.get(name),
                      grad=True)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("config", CELL_CONFIGS, ids=CellConfig.id)
def test_cuda_cells_match_cpu_reference(config, dtype):
    sample = make_cell_sample(config, dtype)
    raw = sample.op()(*sample.op_args({k: None if v is None else v.cuda() for k, v in sample.tensors.items()}))
    raw = raw if isinstance(raw, (tuple, list)) else (raw,)
    oracle = sample.run_reference(sample.converted(torch.float64, requires_grad=False))
    comparator = sample.run_reference(sample.converted(dtype, requires_grad=False)) if dtype == torch.bfloat16 \
        else [None] * len(oracle)
    for i, (a, o, c) in enumerate(zip(raw, oracle, comparator)):
        assert a.is_cuda
        assert_parity(a.cpu(), o, dtype, f"{config.op} output {i}", c)


@requires_cuda
def test_cuda_opcheck_sequences():
    for config in (LSTM_CONFIGS[0], GRU_CONFIGS[2]):
        sample = make_seq_sample(config, dtype=torch.float32)
        for strategy in (0, 1):
            _opcheck(_seq_op(config), sample.op_args(_to_cuda(sample.tensors), strategy, True))


@requires_cuda
def test_cuda_mixed_devices_raise():
    t = _lstm_inputs()
    t["weight_hh"] = t["weight_hh"].cuda()
    with pytest.raises(RuntimeError, match=r"device"):
        _convlstm(t)


# ======================================================================== Triton through the API
@pytest.fixture
def triton_spy(monkeypatch):
    """Counts calls of the Triton cell and fused-sequence launchers (so a silent fallback to the reference
    fails)."""
    pytest.importorskip("triton")
    if not fastvid.info()["triton_available"]:
        pytest.skip("triton not usable here (needs a GPU or TRITON_INTERPRET=1)")
    tk = ops_recurrent._triton()
    calls = {}
    for name in ("lstm_cell", "gru_cell", "gru_reset_hidden"):
        fn = getattr(tk, name)

        def spy(*args, _fn=fn, _name=name):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*args)

        monkeypatch.setattr(tk, name, spy)
    tc = ops_recurrent._triton_conv()  # whole sequences: the fused hidden conv + cell
    for name in ("convlstm", "convgru"):
        fn = getattr(tc, name)

        def spy(*args, _fn=fn, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(tc, name, spy)
    return calls


def _module_grads(module, x, state, grad_outputs):
    module.zero_grad()
    x = x.detach().requires_grad_()
    output, states = module(x, state)
    outs = [output] + (list(states) if isinstance(states, tuple) else [states])
    torch.autograd.backward(outs, grad_outputs)
    return outs, {"x": x.grad, **{n: p.grad.clone() for n, p in module.named_parameters()}}


@pytest.mark.parametrize("kind", ["lstm-peephole-bidirectional", "gru-reset_after", "gru-ballas-2layers"])
def test_triton_backend_modules_match_reference_backend(kind, triton_spy):
    """fastvid.backend('triton') (Triton cells on the GPU, or under the interpreter) equals the reference
    backend for a ConvLSTM / ConvGRU module, forward and backward."""
    torch.manual_seed(0)
    B, T, C_in, C, H, W = 1, 2, 2, 3, 4, 4
    if kind.startswith("lstm"):
        module = fastvid.nn.ConvLSTM(C_in, C, 3, bidirectional=True, peephole=True)
        with torch.no_grad():
            for name, p in module.named_parameters():
                if name.startswith("peephole"):
                    p.normal_(0, 0.5)
    elif kind == "gru-reset_after":
        module = fastvid.nn.ConvGRU(C_in, C, 3, reset_after=True)
    else:
        module = fastvid.nn.ConvGRU(C_in, C, 3, num_layers=2, reset_after=False)
    module, x = module.to(TRITON_DEVICE), torch.randn(B, T, C_in, H, W).to(TRITON_DEVICE)
    with torch.no_grad():
        probe = module(x)
    outs_probe = [probe[0]] + (list(probe[1]) if isinstance(probe[1], tuple) else [probe[1]])
    grad_outputs = [torch.randn_like(o) for o in outs_probe]

    with fastvid.backend("triton"):
        ours, ours_grads = _module_grads(module, x, None, grad_outputs)
    assert sum(triton_spy.values()) > 0, "the triton backend did not call the Triton kernels"
    with fastvid.backend("reference"):
        expected, expected_grads = _module_grads(module, x, None, grad_outputs)
    for i, (a, e) in enumerate(zip(ours, expected)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, msg=lambda m: f"output {i}: {m}")
    for name in expected_grads:
        torch.testing.assert_close(ours_grads[name], expected_grads[name], rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"grad {name}: {m}")


# ======================================================================== the same errors on every backend
def _every_backend_cases(device):
    """name -> (call, exception type, message regex); tensors on ``device``."""
    B, T, C_in, C, H, W = 2, 3, 2, 3, 3, 4
    r = lambda *shape, dtype=torch.float32: torch.randn(*shape, dtype=dtype, device=device)  # noqa: E731
    x, w_ih4, w_hh4, w_ih3, w_hh3 = r(B, T, C_in, H, W), r(4 * C, C_in, 3, 3), r(4 * C, C, 3, 3), r(3 * C, C_in, 3, 3), \
        r(3 * C, C, 3, 3)
    g4, g3, g1 = r(4 * C), r(3 * C), r(C)
    ops = fastvid.ops
    return {
        "lstm-T-0": (lambda: ops.convlstm(x[:, :0], w_ih4, w_hh4), ValueError, r"convlstm: x has sequence length T = 0"),
        "gru-T-0": (lambda: ops.convgru(x[:, :0], w_ih3, w_hh3), ValueError, r"convgru: x has sequence length T = 0"),
        "lstm-ln-T-0": (lambda: ops.convlstm_ln(x[:, :0], w_ih4, w_hh4, None, None, None, g4, g4, g1, g1), ValueError,
                        r"convlstm_ln: x has sequence length T = 0"),
        "gru-ln-T-0": (lambda: ops.convgru_ln(x[:, :0], w_ih3, w_hh3, None, None, None, g3, g3), ValueError,
                       r"convgru_ln: x has sequence length T = 0"),
        "lstm-even-kernel": (lambda: ops.convlstm(x, r(4 * C, C_in, 2, 2), r(4 * C, C, 2, 2)), ValueError,
                             r"keep its H x W: need an odd kernel .* got kernel 2"),
        "lstm-padding-0": (lambda: ops.convlstm(x, w_ih4, w_hh4, padding=0), ValueError,
                           r"keep its H x W: .* got kernel 3, padding 0"),
        "lstm-padding-empty": (lambda: ops.convlstm(x, w_ih4, w_hh4, padding=()), ValueError,
                               r"convlstm: padding must be one int or an \(H, W\) pair, got \(\)"),
        "lstm-ln-padding-0": (lambda: ops.convlstm_ln(x, w_ih4, w_hh4, None, None, None, g4, g4, g1, g1, padding=0),
                              ValueError, r"keep its H x W: .* got kernel 3, padding 0"),
        "lstm-h0-width": (lambda: ops.convlstm(x, w_ih4, w_hh4, None, r(B, C, H, W + 1)), ValueError,
                          r"convlstm: h0 must be \[B, C, H, W\] = \(2, 3, 3, 4\), got \(2, 3, 3, 5\)"),
        "lstm-c0-width": (lambda: ops.convlstm(x, w_ih4, w_hh4, None, None, r(B, C, H, W + 1)), ValueError,
                          r"convlstm: c0 must be \[B, C, H, W\]"),
        "lstm-ln-c0-width": (lambda: ops.convlstm_ln(x, w_ih4, w_hh4, None, None, r(B, C, H, W + 1), g4, g4, g1, g1),
                             ValueError, r"convlstm_ln: c0 must be \[B, C, H, W\]"),
        "gru-ln-h0-channels": (lambda: ops.convgru_ln(x, w_ih3, w_hh3, None, None, r(B, C + 1, H, W), g3, g3),
                               ValueError, r"convgru_ln: h0 must be \[B, C, H, W\] = \(2, 3, 3, 4\)"),
        "gru-cell-x_gates-fp64": (lambda: ops.gru_cell(r(B, 3 * C, H, W, dtype=torch.float64), r(B, 3 * C, H, W),
                                                       r(B, C, H, W)), TypeError,
                                  r"gru_cell: h_gates has dtype torch.float32 but x_gates has dtype torch.float64"),
        "gru-cell-h_gates-bf16": (lambda: ops.gru_cell(r(B, 3 * C, H, W), r(B, 3 * C, H, W, dtype=torch.bfloat16),
                                                       r(B, C, H, W)), TypeError, r"gru_cell: h_gates has dtype torch.bfloat16"),
        "reset-hidden-x_r-fp64": (lambda: ops.gru_reset_hidden(r(B, C, H, W, dtype=torch.float64), r(B, C, H, W),
                                                               r(B, C, H, W)), TypeError, r"gru_reset_hidden: h_r has dtype"),
    }


@pytest.mark.parametrize("backend", ["auto", "reference", "triton"])
@pytest.mark.parametrize("case", list(_every_backend_cases("cpu")))
def test_bad_input_same_error_on_every_backend(case, backend):
    """Found by probing backend("triton"): T = 0 returned h0 there (the layer-norm ops failed in torch.stack);
    a kernel or padding that changes H×W was reported as a wrong h0 the caller never passed, a wrong h0 as a
    wrong c0, and on the layer-norm ops as a convolution's channel error; the GRU cells computed operands of
    mixed dtypes. Each is now the C++ op's error on every backend."""
    device = "cpu"
    if backend == "triton":
        pytest.importorskip("triton")
        if not fastvid.info()["triton_available"]:
            pytest.skip("triton not usable here (needs a GPU or TRITON_INTERPRET=1)")
        device = TRITON_DEVICE
    fn, exception, pattern = _every_backend_cases(device)[case]
    with fastvid.backend(backend), pytest.raises(exception, match=pattern):
        fn()


def test_triton_convgru_refuses_a_bias_of_another_dtype():
    """An fp64 bias_hh beside fp32 x: the C++ op raises; the Triton sequence computed it in fp32 (and
    autograd returned its gradient as fp64)."""
    pytest.importorskip("triton")
    if not fastvid.info()["triton_available"]:
        pytest.skip("triton not usable here (needs a GPU or TRITON_INTERPRET=1)")
    t = {k: v.to(TRITON_DEVICE) if isinstance(v, torch.Tensor) else v for k, v in _gru_inputs().items()}
    t["bias_hh"] = t["bias_hh"].double()
    for backend in ("auto", "triton"):
        if backend == "auto" and TRITON_DEVICE != "cpu":
            continue  # (the C++ CUDA op is tested by the GPU run)
        with fastvid.backend(backend), pytest.raises(TypeError, match=r"bias_hh has dtype"):
            _convgru(t)
