"""Export of fastvid models.

* ``fastvid.convert(model, to="reference")`` → ``torch.export``: a graph of ATen ops only; the saved
  program runs in a fresh interpreter that never imports fastvid and gives the eager model's outputs;
  a dynamic batch dimension works.
* The same models → ONNX (``torch.onnx.export(..., dynamo=True)``), checked with onnx's reference
  evaluator; skipped where ``onnx`` / ``onnxscript`` are not installed.
* Models with fastvid layers export with ``torch.export`` too, keeping the ``torch.ops.fastvid`` ops
  (their fake kernels let it trace them): running those programs needs fastvid loaded, and ONNX has
  no translation for them.
* With dynamic sizes (batch, time, frame size as ``torch.export.Dim``) the programs run other sizes.
* ``torch.jit.trace`` records the same ops (the traced module saves, loads and takes another batch
  size), except the NonLocalBlock's fused steps, which raise an error that names the way out.
"""
import os
import subprocess
import sys
import warnings

import pytest
import torch

import fastvid
from fastvid.nn import AttentionConvLSTM, ConvGRU, ConvGRUCell, ConvLSTM, ConvLSTMCell, DepthwiseConv3d, NonLocalBlock

from test_convert_reference import CONFIGS, Mixed, flat


def _randomized(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    return module.eval()


CASES = {
    "depthwise": (lambda: DepthwiseConv3d(3, 3, padding=1, channel_multiplier=2), (2, 3, 4, 6, 6)),
    "nonlocal": (lambda: NonLocalBlock(4, 2), (2, 4, 3, 6, 6)),
    "nonlocal_concatenation": (lambda: NonLocalBlock(4, 2, mode="concatenation", dims=2), (2, 4, 6, 6)),
    "convlstm": (lambda: ConvLSTM(3, 4, 3, num_layers=2, bidirectional=True, peephole=True), (2, 4, 3, 6, 6)),
    "convgru": (lambda: ConvGRU(3, 4, 3, reset_after=False), (2, 4, 3, 6, 6)),
    "convlstm_cell": (lambda: ConvLSTMCell(3, 4), (2, 3, 6, 6)),
    "convgru_cell": (lambda: ConvGRUCell(3, 4), (2, 3, 6, 6)),
    "attention_convlstm": (lambda: AttentionConvLSTM(3, 4), (2, 4, 3, 6, 6)),
    "every_layer": (lambda: Mixed(**CONFIGS["deep"]), (2, 3, 4, 6, 5)),  # all but the nonlocal block
}


def _case(name):
    """(eager fastvid model, its reference twin, a seeded input, the eager outputs flattened)."""
    make, shape = CASES[name]
    model = _randomized(make())
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = flat(model(x))
    return model, fastvid.convert(model, to="reference"), x, expected


def _fastvid_ops(program):
    return {str(n.target) for n in program.graph.nodes if n.op == "call_function" and "fastvid" in str(n.target)}


@pytest.mark.parametrize("case", CASES)
def test_reference_model_exports(case):
    _, reference, x, expected = _case(case)
    program = torch.export.export(reference, (x,))
    assert _fastvid_ops(program) == set()
    torch.testing.assert_close(flat(program.module()(x)), expected)


_RUN_WITHOUT_FASTVID = """
import sys, torch
for program_path, inputs_path, output_path in zip(*[iter(sys.argv[1:])] * 3):
    torch.save(torch.export.load(program_path).module()(*torch.load(inputs_path)), output_path)
assert not any(name.startswith("fastvid") for name in sys.modules), "fastvid was imported"
"""


def test_exported_reference_programs_run_without_fastvid(tmp_path):
    """Saved programs of the reference twins of every layer, loaded and run by an interpreter that does
    not import fastvid."""
    arguments, expected = [], {}
    for case in ("every_layer", "nonlocal", "nonlocal_concatenation"):
        _, reference, x, expected[case] = _case(case)
        torch.export.save(torch.export.export(reference, (x,)), tmp_path / f"{case}.pt2")
        torch.save((x,), tmp_path / f"{case}.in.pt")
        arguments += [str(tmp_path / f"{case}{suffix}") for suffix in (".pt2", ".in.pt", ".out.pt")]
    result = subprocess.run([sys.executable, "-c", _RUN_WITHOUT_FASTVID, *arguments], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for case, values in expected.items():
        torch.testing.assert_close(flat(torch.load(tmp_path / f"{case}.out.pt")), values)


def test_reference_model_exports_with_a_dynamic_batch():
    model, reference, x, _ = _case("every_layer")
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(reference, (x,), dynamic_shapes=({0: batch},))
    other = torch.randn(3, *x.shape[1:])
    with torch.no_grad():
        torch.testing.assert_close(flat(program.module()(other)), flat(model(other)))


@pytest.mark.parametrize("case", ["depthwise", "nonlocal", "convlstm", "convgru", "every_layer"])
def test_fastvid_model_exports_with_its_ops(case):
    model, _, x, expected = _case(case)
    program = torch.export.export(model, (x,))
    assert _fastvid_ops(program)  # the kernels stay in the graph
    torch.testing.assert_close(flat(program.module()(x)), expected)


@pytest.mark.parametrize("case", ["depthwise", "nonlocal", "convlstm", "convgru"])
def test_fastvid_model_exports_with_dynamic_sizes(case):
    """Batch, time (or depth) and the frame size as export Dims: the program runs other sizes and matches
    the eager model (fp32 tolerance: the recurrent program runs the fixed 'hoisted' strategy, eager its timed
    choice). Before, the recurrent strategy's cache key pinned the sizes (or could not hash them)."""
    from torch.export import Dim
    model, _, x, _ = _case(case)
    frames = Dim("frames", min=2, max=64)
    half_h, half_w = Dim("half_h", min=1, max=128), Dim("half_w", min=1, max=128)  # the nonlocal pool halves H, W
    time_dim = 1 if case.startswith("conv") else 2
    sizes = {0: Dim("batch", min=1, max=64), time_dim: frames, x.dim() - 2: 2 * half_h, x.dim() - 1: 2 * half_w}
    program = torch.export.export(model, (x,), dynamic_shapes=(sizes,))
    other_shape = list(x.shape)
    for axis, grow in ((0, 1), (time_dim, 2), (x.dim() - 2, 2), (x.dim() - 1, 4)):
        other_shape[axis] += grow
    other = torch.randn(*other_shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, eager = flat(program.module()(other)), flat(model(other))
    scale = max(t.abs().max().item() for t in eager)  # the recurrent states' own scale: the LSTM's c_n is larger
    assert [t.shape for t in ours] == [t.shape for t in eager]
    for a, b in zip(ours, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("case", [c for c in CASES if c != "every_layer"])  # every_layer: ~30 s, same layers
def test_reference_model_exports_to_onnx(case):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from onnx.reference import ReferenceEvaluator
    _, reference, x, expected = _case(case)
    proto = torch.onnx.export(reference, (x,), dynamo=True, verbose=False).model_proto
    onnx.checker.check_model(proto)
    outputs = ReferenceEvaluator(proto).run(None, {proto.graph.input[0].name: x.numpy()})
    torch.testing.assert_close(flat([torch.from_numpy(o) for o in outputs]), expected)


@pytest.mark.parametrize("case", ["depthwise", "convlstm", "convgru", "convlstm_cell", "convgru_cell", "attention_convlstm"])
def test_fastvid_model_traces_with_torch_jit(case, tmp_path):
    """A fresh model's first call under torch.jit.trace (the auto strategy is not timed there: the timed
    runs would be recorded; before, the strategy key failed on the tracer's tensor sizes)."""
    model, _, x, expected = _case(case)
    fastvid.ops.set_strategy("auto")  # empties the strategy cache: the trace is the model's first call
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(model, x, check_trace=False)
    # the cells' and the depthwise conv's Python shape checks are skipped while tracing (booleans of traced
    # sizes warn, and a trace would freeze them); the sequence layers' checks still warn
    tracer = [f"{w.filename}:{w.lineno}" for w in caught
              if issubclass(w.category, torch.jit.TracerWarning) and f"{os.sep}fastvid{os.sep}" in w.filename]
    assert not tracer or case not in ("depthwise", "convlstm_cell", "convgru_cell"), tracer
    graph = str(traced.inlined_graph)
    assert "fastvid::" in graph
    sequence_calls = {"convlstm": ("fastvid::convlstm_sequence(", 4), "convgru": ("fastvid::convgru_sequence(", 1)}
    if case in sequence_calls:  # one per layer and direction: no timed run was recorded
        op, calls = sequence_calls[case]
        assert graph.count(op) == calls, graph
    torch.jit.save(traced, tmp_path / "traced.pt")
    loaded = torch.jit.load(tmp_path / "traced.pt")
    other = torch.randn(3, *x.shape[1:])
    with torch.no_grad():
        torch.testing.assert_close(flat(loaded(x)), expected)
        torch.testing.assert_close(flat(loaded(other)), flat(model(other)))


def test_nonlocal_block_under_torch_jit_trace_names_the_way_out():
    model, reference, x, expected = _case("nonlocal")
    with pytest.raises(RuntimeError, match=r"torch.jit.trace cannot record it .* to='reference'"):
        torch.jit.trace(model, x, check_trace=False)
    traced = torch.jit.trace(reference, x, check_trace=False)
    with torch.no_grad():
        torch.testing.assert_close(flat(traced(x)), expected)


def test_model_with_every_fastvid_layer_traces_with_torch_fx():
    """torch.fx.symbolic_trace of a model holding every fastvid layer (converted models look like it): each
    layer that checks shapes in Python is one call_module node (fastvid.nn._fx), and the GraphModule gives
    the eager outputs bit for bit (test_module_lifecycle checks each layer alone)."""
    model, _, x, expected = _case("every_layer")
    traced = torch.fx.symbolic_trace(model)
    called = {type(traced.get_submodule(n.target)) for n in traced.graph.nodes if n.op == "call_module"}
    assert {DepthwiseConv3d, ConvLSTM, ConvGRU, ConvLSTMCell, ConvGRUCell, AttentionConvLSTM} <= called
    with torch.no_grad():
        assert torch.equal(flat(traced(x)), expected)


class _CallsTheOps(torch.nn.Module):
    """A user's layer written with the functional ops, called as fastvid.ops.<op>."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.weight = torch.nn.Parameter(torch.randn(3, 1, 3, 3, 3, generator=g))
        self.weight_ih = torch.nn.Parameter(torch.randn(16, 3, 3, 3, generator=g) * 0.3)  # hidden 4 channels
        self.weight_hh = torch.nn.Parameter(torch.randn(16, 4, 3, 3, generator=g) * 0.3)

    def forward(self, x):  # [B, 3, T, H, W]
        y = fastvid.ops.depthwise_conv3d(x, self.weight, None, 1, 1)
        tokens = y.flatten(2).transpose(1, 2)  # [B, T·H·W, 3]
        y = y + fastvid.ops.nonlocal_attention(tokens, tokens, tokens, 0.5).transpose(1, 2).reshape(y.shape)
        out, _, _ = fastvid.ops.convlstm(y.transpose(1, 2), self.weight_ih, self.weight_hh)
        return out


def test_functional_ops_trace_with_torch_fx():
    """fastvid.ops.<op>(...) in a traced forward is one call_function node per op (each op's
    __torch_function__ check, fastvid/ops/__init__.py): before, the ops' Python checks raised TraceError."""
    model = _CallsTheOps()
    x = torch.randn(2, 3, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    traced = torch.fx.symbolic_trace(model)
    called = [n.target.__name__ for n in traced.graph.nodes if n.op == "call_function" and "fastvid" in n.target.__module__]
    assert called == ["depthwise_conv3d", "nonlocal_attention", "convlstm"]
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))


def _op_calls():
    """{op name: arguments} of a small call of every public fastvid op (the first argument a tensor)."""
    g = torch.Generator().manual_seed(3)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.5
    x = r(1, 2, 3, 4, 4)  # [B, T, C_in, H, W] for the sequence ops
    return {
        "depthwise_conv3d": (r(1, 2, 3, 4, 4), r(2, 1, 3, 3, 3), None, 1, 1),
        "nonlocal_attention": (r(1, 5, 3), r(1, 4, 3), r(1, 4, 2)),
        "dot_product_attention": (r(1, 5, 3), r(1, 4, 3), r(1, 4, 2)),
        "concatenation_attention": (r(1, 5), r(1, 4), r(1, 4, 2)),
        "lstm_cell": (r(1, 8, 3, 3), r(1, 2, 3, 3)),
        "gru_cell": (r(1, 6, 3, 3), r(1, 6, 3, 3), r(1, 2, 3, 3)),
        "gru_reset_hidden": (r(1, 2, 3, 3), r(1, 2, 3, 3), r(1, 2, 3, 3)),
        "convlstm": (x, r(8, 3, 3, 3), r(8, 2, 3, 3)),
        "convgru": (x, r(6, 3, 3, 3), r(6, 2, 3, 3)),
        "convlstm_ln": (x, r(8, 3, 3, 3), r(8, 2, 3, 3), None, None, None, 1 + r(8), 1 + r(8), 1 + r(2), r(2)),
        "convgru_ln": (x, r(6, 3, 3, 3), r(6, 2, 3, 3), None, None, None, 1 + r(6), 1 + r(6)),
    }


class _CallsOneOp(torch.nn.Module):
    """A user's layer that imported one op by name (``from fastvid.ops import convlstm``) and calls it on
    its input, the op's other arguments held as buffers."""

    def __init__(self, op, rest):
        super().__init__()
        self.op = op
        self.rest = [f"arg{i}" if isinstance(a, torch.Tensor) else a for i, a in enumerate(rest)]
        for name, a in zip(self.rest, rest):
            if isinstance(a, torch.Tensor):
                self.register_buffer(name, a)

    def forward(self, x):
        return self.op(x, *[getattr(self, a) if isinstance(a, str) else a for a in self.rest])


@pytest.mark.parametrize("name", sorted(_op_calls()))
def test_ops_imported_by_name_trace_with_torch_fx(name):
    """The op bound to a name of the user's module, not looked up in fastvid.ops at the call, is one
    call_function node too (torch.fx.wrap, used before, patched only fastvid.ops' namespace: the op got
    fx's Proxy and raised "input must be a Tensor, got Proxy")."""
    op = getattr(fastvid.ops, name)
    first, *rest = _op_calls()[name]
    model = _CallsOneOp(op, rest)
    traced = torch.fx.symbolic_trace(model)
    assert [n.target for n in traced.graph.nodes if n.op == "call_function"] == [op]
    with torch.no_grad():
        torch.testing.assert_close(flat(traced(first)), flat(model(first)), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(_op_calls()))
def test_torch_function_modes_see_each_op_as_one_call(name):
    """A TorchFunctionMode (the mechanism of torch.device contexts and of tools that record calls) gets the
    op itself, as it gets torch.nn.functional's, and its result is the op's."""
    op = getattr(fastvid.ops, name)
    args = _op_calls()[name]
    seen = []

    class Record(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with torch.no_grad():
        expected = flat(op(*args))
        with Record():
            result = op(*args)
    assert seen == [op]
    torch.testing.assert_close(flat(result), expected, rtol=0, atol=0)
