"""What a user does with any layer besides calling it: every fastvid.nn module under
torch.inference_mode, through torch.save/load, pickle and state_dict round trips; degenerate shapes
(T = 1 with backward, H = W = 1, C = 1) against the float64 reference backend; and memory that does
not grow over 100 training steps."""
import copy
import gc
import io
import os
import pickle

import pytest
import torch

import fastvid
from fastvid import nn as fnn
from _tolerances import assert_full_precision

pytestmark = pytest.mark.skipif(not fastvid.info()["cpu_kernels"], reason="fastvid._C is not built")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _randomize(module, seed):
    """Every parameter ~ N(0, 0.3²) (γ = 0 nonlocal norms and zero peepholes included) so no output is trivial."""
    g = _gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


# name -> (constructor, inputs(B, T, C, H, W) -> tuple of input tensors). C is the layer's input channels.
MODULES = {
    "ConvLSTM": (lambda c: fnn.ConvLSTM(c, 3, 3, num_layers=2, bidirectional=True, peephole=True),
                 lambda s: (torch.randn(s[0], s[1], s[2], s[3], s[4], generator=_gen(1)),)),
    "ConvGRU": (lambda c: fnn.ConvGRU(c, 3, 3, reset_after=False),
                lambda s: (torch.randn(s[0], s[1], s[2], s[3], s[4], generator=_gen(1)),)),
    "ConvLSTMCell": (lambda c: fnn.ConvLSTMCell(c, 3, 3, peephole=True),
                     lambda s: (torch.randn(s[0], s[2], s[3], s[4], generator=_gen(1)),)),
    "ConvGRUCell": (lambda c: fnn.ConvGRUCell(c, 3, 3, reset_after=False),
                    lambda s: (torch.randn(s[0], s[2], s[3], s[4], generator=_gen(1)),)),
    "DepthwiseConv3d": (lambda c: fnn.DepthwiseConv3d(c, 3, padding=1, channel_multiplier=2),
                        lambda s: (torch.randn(s[0], s[2], s[1], s[3], s[4], generator=_gen(1)),)),
    "SeparableConv3d": (lambda c: fnn.SeparableConv3d(c, 4, 3, padding=1),
                        lambda s: (torch.randn(s[0], s[2], s[1], s[3], s[4], generator=_gen(1)),)),
    "Conv2Plus1d": (lambda c: fnn.Conv2Plus1d(c, 4, 3),
                    lambda s: (torch.randn(s[0], s[2], s[1], s[3], s[4], generator=_gen(1)),)),
    "NonLocalBlock": (lambda c: fnn.NonLocalBlock(c, max(1, c // 2), sub_sample=False),
                      lambda s: (torch.randn(s[0], s[2], s[1], s[3], s[4], generator=_gen(1)),)),
    "TemporalAttention": (lambda c: fnn.TemporalAttention(c, score="general"),
                          lambda s: (torch.randn(s[0], s[2], generator=_gen(1)),
                                     torch.randn(s[0], s[1], s[2], generator=_gen(2)))),
    "AttentionConvLSTM": (lambda c: fnn.AttentionConvLSTM(c, 3),
                          lambda s: (torch.randn(s[0], s[1], s[2], s[3], s[4], generator=_gen(1)),)),
    "NetVLAD": (lambda c: fnn.NetVLAD(c, clusters=3),
                lambda s: (torch.randn(s[0], s[1] * s[3] * s[4], s[2], generator=_gen(1)),)),
    "ContextGating": (lambda c: fnn.ContextGating(c),
                      lambda s: (torch.randn(s[0], s[2], generator=_gen(1)),)),
}
SHAPE = (2, 3, 4, 5, 6)  # B, T, C, H, W


def test_every_public_module_is_covered():
    public = {name for name in fnn.__all__ if isinstance(getattr(fnn, name), type)}
    assert public == set(MODULES), f"add the new modules to MODULES: {public ^ set(MODULES)}"


def _flat(result):
    if isinstance(result, torch.Tensor):
        return [result]
    out = []
    for r in result:
        out.extend(_flat(r) if r is not None else [])
    return out


def _build(name, channels=SHAPE[2], seed=0):
    make, _ = MODULES[name]
    torch.manual_seed(seed)
    return _randomize(make(channels), seed)


def _inputs(name, shape=SHAPE):
    return MODULES[name][1](shape)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_save_load_pickle_and_state_dict_round_trips(name):
    """torch.save/load and pickle of the whole module, and its state_dict loaded into a module built
    with another seed, give bit-identical outputs (nothing lives outside the state and parameters)."""
    module = _build(name).eval()
    inputs = _inputs(name)
    with torch.no_grad():
        expected = _flat(module(*inputs))
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    copies = {"torch.save": torch.load(buffer, weights_only=False), "pickle": pickle.loads(pickle.dumps(module))}
    other = _build(name, seed=1).eval()
    with torch.no_grad():
        assert any(not torch.equal(a, b) for a, b in zip(_flat(other(*inputs)), expected)), "seeds give one module"
    state = io.BytesIO()
    torch.save(module.state_dict(), state)
    state.seek(0)
    other.load_state_dict(torch.load(state, weights_only=True))
    copies["state_dict"] = other
    for how, twin in copies.items():
        assert type(twin) is type(module)
        with torch.no_grad():
            got = _flat(twin(*inputs))
        assert len(got) == len(expected)
        for a, e in zip(got, expected):
            assert torch.equal(a, e), f"{how}: outputs differ"


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("name", sorted(MODULES))
def test_meta_device_gives_the_shapes(name, train):
    """On the meta device (shape inference and MAC counting without memory, as for nn.Conv3d) every module
    and its to='reference' twin return outputs of the shapes, dtypes and order of a CPU call; before, every
    layer that runs a fastvid op raised "unknown device type for autocast" (and NonLocalBlock "unsupported
    scalarType")."""
    module = _build(name).train(train)
    inputs = _inputs(name)
    expected = [(o.shape, o.dtype) for o in _flat(module(*inputs))]
    for twin in (module, fastvid.convert(module, to="reference")):
        meta = copy.deepcopy(twin).to("meta")
        outputs = _flat(meta(*[x.to("meta") for x in inputs]))
        assert all(o.device.type == "meta" for o in outputs)
        assert [(o.shape, o.dtype) for o in outputs] == expected


@pytest.mark.parametrize("name", sorted(MODULES))
def test_inference_mode(name):
    """Under torch.inference_mode every module runs (no autograd state is touched) and gives the
    no_grad outputs bit for bit."""
    module = _build(name).eval()
    inputs = _inputs(name)
    with torch.no_grad():
        expected = _flat(module(*inputs))
    with torch.inference_mode():
        got = _flat(module(*inputs))
    for a, e in zip(got, expected):
        assert a.is_inference()
        assert torch.equal(a, e)


class _HoldsOne(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


class _HoldsTwo(_HoldsOne):  # TemporalAttention's (query, keys)
    def forward(self, x, y):
        return self.layer(x, y)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_torch_fx_traces_a_model_that_holds_the_module(name):
    """torch.fx.symbolic_trace (what torchvision's feature extraction and FX quantization run) of a model
    holding the layer gives a GraphModule with bit-identical outputs; a layer whose forward checks shapes or
    picks its kernel in Python is one call_module node, as nn.LSTM is, and tracing it alone says so. Before,
    every such layer raised TraceError ("symbolically traced variables cannot be used as inputs to control
    flow"), and so did any model converted to hold one."""
    module = _build(name).eval()
    inputs = _inputs(name)
    model = (_HoldsOne if len(inputs) == 1 else _HoldsTwo)(module)
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        expected, got = _flat(model(*inputs)), _flat(traced(*inputs))
    assert len(got) == len(expected)
    for a, e in zip(got, expected):
        assert torch.equal(a, e)
    called = {node.target for node in traced.graph.nodes if node.op == "call_module"}
    if name in ("SeparableConv3d", "Conv2Plus1d"):  # compositions of layers: traced into their parts
        assert "layer" not in called and called
    else:
        assert called == {"layer"}
        with pytest.raises(TypeError, match="as a leaf"):
            torch.fx.symbolic_trace(module)


def test_torch_compile_of_many_module_classes_in_one_process():
    """torch.compile caches compiled frames per code object, at most torch._dynamo.config.recompile_limit (8)
    each: every fastvid module class has its own forward (a forward shared by all, as a first version of the
    fx leaf support had, failed at the ninth class with fullgraph=True). Checked with the limit at 1 and two
    classes; the eager backend keeps it cheap."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=1):
        for name in ("ContextGating", "NetVLAD"):
            module = _build(name).eval()
            inputs = _inputs(name)
            compiled = torch.compile(module, backend="eager", fullgraph=True)
            with torch.no_grad():
                for a, e in zip(_flat(compiled(*inputs)), _flat(module(*inputs))):
                    torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_fp64_module_ignores_autocast(name):
    """Autocast leaves fp64 tensors alone for PyTorch's own ops, so an fp64 model runs in fp64 under it; so
    does every fastvid module: the same outputs and gradients as outside autocast (before: the kernels'
    inputs were cast to bf16, DepthwiseConv3d and the sequence layers returned bf16 and SeparableConv3d raised
    'Input type (BFloat16) and bias type (double)')."""
    module = _build(name).double()
    inputs = [x.double() for x in _inputs(name)]
    def run():
        outputs, grads = _outputs_and_grads(module, inputs)
        return outputs + [g for g in grads if g is not None]
    expected = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run()
    assert [t.dtype for t in got] == [t.dtype for t in expected] == [torch.float64] * len(expected)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


# ============================================================================ degenerate shapes
DEGENERATE = {"T=1": (2, 1, 4, 5, 6), "H=W=1": (2, 3, 4, 1, 1), "C=1": (2, 3, 1, 5, 6), "B=1,T=1,H=W=1": (1, 1, 2, 1, 1)}
KERNEL_MODULES = ["ConvLSTM", "ConvGRU", "ConvLSTMCell", "ConvGRUCell", "DepthwiseConv3d", "NonLocalBlock",
                  "TemporalAttention", "AttentionConvLSTM"]  # the modules that run fastvid kernels


def _outputs_and_grads(module, inputs):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    outputs = _flat(module(*leaves))
    g = _gen(3)
    grads_out = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outputs]
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad(outputs, leaves + params, grads_out, allow_unused=True)
    return outputs, grads


@pytest.mark.parametrize("shape", list(DEGENERATE), ids=list(DEGENERATE))
@pytest.mark.parametrize("name", KERNEL_MODULES)
def test_degenerate_shapes_forward_backward_match_reference(name, shape):
    """T = 1, H = W = 1, C = 1 (and all at once): outputs and the gradients of the inputs and every
    parameter equal the same module in float64 on the reference backend."""
    shape = DEGENERATE[shape]
    module = _build(name, channels=shape[2]).train()
    if name == "NonLocalBlock" and shape[0] * shape[1] * shape[3] * shape[4] == 1:
        module.eval()  # its training BatchNorm refuses one value per channel, as nn.BatchNorm (test_nonlocal_nn)
    inputs = _inputs(name, shape)
    ours, ours_grads = _outputs_and_grads(module, inputs)
    module64 = copy.deepcopy(module).double()
    with fastvid.backend("reference"):
        oracle, oracle_grads = _outputs_and_grads(module64, [x.double() for x in inputs])
    assert len(ours) == len(oracle)
    for i, (a, e) in enumerate(zip(ours, oracle)):
        assert_full_precision(a, e, f"output {i}", ulps=2.0 ** 9)
    scale = max(e.abs().max().item() for e in oracle_grads if e is not None)
    for i, (a, e) in enumerate(zip(ours_grads, oracle_grads)):
        assert (a is None) == (e is None), f"gradient {i}: None on one side only"
        if e is not None:  # φ's bias etc. cancel to ~0: judged on the scale of all the gradients
            assert_full_precision(a, e, f"gradient {i}", ulps=2.0 ** 9, scale=scale)


# ============================================================================ memory
def _live_tensors():
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))  # type(): no __class__ lookups


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _EveryFamily(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.recurrent = fnn.ConvLSTM(3, 6, 3, peephole=True)
        self.gru = fnn.ConvGRU(6, 6, 3, reset_after=False)
        self.depthwise = fnn.DepthwiseConv3d(6, 3, padding=1)
        self.nonlocal_block = fnn.NonLocalBlock(6, 3)

    def forward(self, x):  # [B, T, C, H, W]
        y, _ = self.recurrent(x)
        y, _ = self.gru(y)
        y = y.transpose(1, 2)
        return self.nonlocal_block(self.depthwise(y)).square().mean()


def test_memory_does_not_grow_over_100_training_steps():
    """Live tensors (counted through gc) are no more after 100 steps than after warm-up, and the
    process RSS grows by less than 16 MiB (measured: 0.1 MiB), where leaking one step's gate
    caches (the ConvLSTM's alone are B·T·4C·H·W floats = 83 KiB) would add over 8 MiB per layer."""
    torch.manual_seed(0)
    model = _EveryFamily()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(2, 3, 3, 12, 12)

    def step():
        optimizer.zero_grad()
        model(x).backward()
        optimizer.step()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is ~15x faster than two on a loaded 2-core runner
    try:
        # Counted with the gradients dropped: the last step's .grad tensors, made in C++ and read by the
        # optimizer, are in gc's view at some counts and not at others; and a count may only fall (after
        # test_compile.py, 3 of its leftover tensors were freed during the 100 steps): a leak adds >= 100.
        for _ in range(10):
            step()
        optimizer.zero_grad()
        tensors, rss = _live_tensors(), _rss_bytes()
        for _ in range(100):
            step()
        optimizer.zero_grad()
        assert _live_tensors() <= tensors, "tensors are kept alive across training steps"
        grown = _rss_bytes() - rss
    finally:
        torch.set_num_threads(threads)
    assert grown < 16 * 2 ** 20, f"RSS grew by {grown / 2 ** 20:.1f} MiB over 100 steps"
