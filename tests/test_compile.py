"""torch.compile(fullgraph=True, inductor) of the modules whose ops were never compiled in the suite
(ConvGRU, DepthwiseConv3d, NonLocalBlock; ConvLSTM is in test_recurrent_nn.py): outputs and every
gradient against a float64 oracle, not against the eager run of the same kernels. Shapes are tiny:
each compilation costs tens of seconds on these CPUs."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fastvid
from fastvid.nn import ConvGRU, DepthwiseConv3d, NonLocalBlock
from _tolerances import assert_full_precision

pytestmark = pytest.mark.skipif(not fastvid.info()["cpu_kernels"], reason="fastvid._C is not built")


def _randomize(module, scale=0.3):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, scale)
    return module


def _outputs_and_grads(fn, module, x, grad_seed=1):
    """Forward + backward with a random upstream gradient; returns (output, {'x': dx, param: grad})."""
    module.zero_grad()
    x = x.detach().requires_grad_()
    out = fn(x)
    out = out[0] if isinstance(out, tuple) else out
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    out.backward(grad.to(out.dtype))
    grads = {"x": x.grad, **{n: p.grad.clone() for n, p in module.named_parameters()}}
    return out.detach(), grads


def _compiled_matches(module, oracle_fn, x, ulps=2.0 ** 7):
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="inductor")
    ours, ours_grads = _outputs_and_grads(compiled, module, x)
    module64 = copy.deepcopy(module).double()
    expected, expected_grads = _outputs_and_grads(lambda t: oracle_fn(module64, t), module64, x.double())
    assert_full_precision(ours, expected, "compiled output", ulps)
    # a gradient that cancels to ~0 (φ's bias in a nonlocal block: the softmax ignores a shift per
    # query) is judged on the scale of all the gradients, the magnitude its rounding noise comes from
    scale = max(e.abs().max().item() for e in expected_grads.values())
    for name, e in expected_grads.items():
        assert_full_precision(ours_grads[name], e, f"compiled grad {name}", ulps, scale=scale)


def test_compile_convgru():
    """Oracle: the same module in float64 on the pure-PyTorch reference backend."""
    m = _randomize(ConvGRU(3, 4, 3, num_layers=2, bidirectional=True))
    x = torch.randn(2, 3, 3, 5, 6)

    def oracle(m64, x64):
        with fastvid.backend("reference"):
            return m64(x64)

    _compiled_matches(m, oracle, x, ulps=2.0 ** 8)  # 3 steps × 2 layers of recurrence


def test_compile_depthwise_conv3d_channels_last():
    """Oracle: F.conv3d(groups=C) in float64."""
    m = _randomize(DepthwiseConv3d(6, (3, 3, 3), stride=(1, 2, 1), padding=1, channel_multiplier=2))
    x = torch.randn(2, 6, 4, 7, 5).contiguous(memory_format=torch.channels_last_3d)

    def oracle(m64, x64):
        return F.conv3d(x64, m64.weight, m64.bias, m64.stride, m64.padding, m64.dilation, groups=6)

    _compiled_matches(m, oracle, x)


def test_compile_nonlocal_block_training():
    """Oracle: Wang et al.'s embedded-Gaussian block written out in float64,
    z = x + BN(W_z softmax(θ(x)ᵀ φ(pool x)) g(pool x)), BatchNorm with batch statistics (training)."""
    m = NonLocalBlock(8, 4, sub_sample=True)
    torch.nn.init.uniform_(m.norm.weight, 0.5, 1.5)
    torch.nn.init.uniform_(m.norm.bias, -0.2, 0.2)
    x = torch.randn(2, 8, 2, 4, 6)

    def oracle(m64, x64):
        B, C = x64.shape[:2]
        theta = m64.theta(x64).flatten(2)
        phi = F.max_pool3d(m64.phi(x64), (1, 2, 2)).flatten(2)
        g = F.max_pool3d(m64.g(x64), (1, 2, 2)).flatten(2)
        attention = torch.softmax(m64.scale * theta.transpose(1, 2) @ phi, dim=-1)
        y = (attention @ g.transpose(1, 2)).transpose(1, 2).reshape(B, -1, *x64.shape[2:])
        z = m64.out(y)
        z = F.batch_norm(z, None, None, m64.norm.weight, m64.norm.bias, training=True, eps=m64.norm.eps)
        return x64 + z

    _compiled_matches(m.train(), oracle, x)


@pytest.mark.parametrize("contextvar_guard", [True, False], ids=["contextvar_guard", "traced_constant"])
def test_compiled_graph_follows_the_backend_override(monkeypatch, contextvar_guard):
    """``with fastvid.backend(...)`` around a compiled call picks the implementation traced into the graph:
    the reference's aten ops under 'reference', the fastvid op otherwise. Both ways of reading the
    override while tracing run here: torch 2.14's ContextVar guard, and the trace-time constant that
    torch < 2.14 takes (its dynamo cannot trace ContextVar.get)."""
    if contextvar_guard and not torch.__version__ >= "2.14":
        pytest.skip("this torch's dynamo does not trace ContextVar.get")
    monkeypatch.setattr(fastvid._backend, "_DYNAMO_GUARDS_CONTEXTVARS", contextvar_guard)
    q, k, v = torch.randn(2, 12, 4), torch.randn(2, 10, 4), torch.randn(2, 10, 5)

    def traced_targets(backend_name):
        graphs = []

        def record(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        torch._dynamo.reset()
        with fastvid.backend(backend_name):
            out = torch.compile(lambda a, b, c: fastvid.ops.nonlocal_attention(a, b, c, 0.5), backend=record,
                                fullgraph=True)(q, k, v)
        targets = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
        return out, targets

    exact = torch.softmax(0.5 * q.double() @ k.double().transpose(1, 2), -1) @ v.double()
    for backend_name, fastvid_op_traced in (("reference", False), ("auto", True)):
        out, targets = traced_targets(backend_name)
        assert any("fastvid.nonlocal_attention" in t for t in targets) == fastvid_op_traced, (backend_name, targets)
        assert_full_precision(out, exact, f"compiled output ({backend_name})")
