"""torch.func transforms and forward-mode AD through the fastvid ops.

Forward mode (torch.func.jvp / jacfwd, torch.autograd.forward_ad): the kernels' autograd is backward-only,
and PyTorch runs an op registered with torch.library.register_autograd (the cells, the attention op, every
Triton op) without its autograd when no input requires grad: the result came back with no tangent, read as
zero, a silently wrong jvp. Reverse-mode transforms (torch.func.grad / vjp / jacrev, and vmap of them:
per-sample gradients) cannot run the kernels' autograd at all (PyTorch raised "functorch transforms";
the NonLocalBlock's Python autograd functions "setup_context" until they took the setup_context form). Inputs
that carry a tangent or that a gradient transform traces now take the reference backend under 'auto' (pure
PyTorch), and a forced kernel backend refuses them; the NonLocalBlock's fused steps have their own jvp rules. Forward mode is checked
against central finite differences in float64, reverse mode against torch.autograd through the kernels."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

import fastvid
from fastvid.nn import ConvLSTMCell
from test_convert_reference import flat

pytestmark = pytest.mark.skipif(not fastvid.info()["cpu_kernels"], reason="fastvid._C is not built")

OPS = fastvid.ops


def _randn(*shape, seed):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# op name -> (function of tensors only, its inputs)
CASES = {
    "lstm_cell": (OPS.lstm_cell, lambda: (_randn(1, 8, 3, 3, seed=1), _randn(1, 2, 3, 3, seed=2))),
    "gru_cell": (OPS.gru_cell, lambda: (_randn(1, 6, 3, 3, seed=1), _randn(1, 6, 3, 3, seed=2),
                                        _randn(1, 2, 3, 3, seed=3))),
    "gru_reset_hidden": (OPS.gru_reset_hidden, lambda: tuple(_randn(1, 2, 3, 3, seed=s) for s in (1, 2, 3))),
    "nonlocal_attention": (lambda q, k, v: OPS.nonlocal_attention(q, k, v, 0.5),
                           lambda: (_randn(2, 5, 4, seed=1), _randn(2, 6, 4, seed=2), _randn(2, 6, 3, seed=3))),
    "depthwise_conv3d": (lambda x, w: OPS.depthwise_conv3d(x, w, None, 1, 1),
                         lambda: (_randn(1, 2, 3, 4, 4, seed=1), _randn(2, 1, 3, 3, 3, seed=2))),
    "convlstm": (lambda x, w_ih, w_hh: OPS.convlstm(x, w_ih, w_hh),
                 lambda: (_randn(1, 3, 2, 4, 4, seed=1), _randn(8, 2, 3, 3, seed=2) * 0.3,
                          _randn(8, 2, 3, 3, seed=3) * 0.3)),
    "convgru": (lambda x, w_ih, w_hh: OPS.convgru(x, w_ih, w_hh),
                lambda: (_randn(1, 3, 2, 4, 4, seed=1), _randn(6, 2, 3, 3, seed=2) * 0.3,
                         _randn(6, 2, 3, 3, seed=3) * 0.3)),
}


def _finite_difference(f, inputs, tangents, eps=1e-6):
    plus = f(*[x + eps * t for x, t in zip(inputs, tangents)])
    minus = f(*[x - eps * t for x, t in zip(inputs, tangents)])
    return (flat(plus) - flat(minus)) / (2 * eps)


def _assert_tangent(got, expected):
    assert got.abs().max() > 0.1, "no tangent"  # what the kernels' autograd returned before
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())


@pytest.mark.parametrize("name", sorted(CASES))
def test_jvp_matches_finite_differences(name):
    f, make = CASES[name]
    inputs = make()
    tangents = tuple(_randn(*x.shape, seed=10 + i) for i, x in enumerate(inputs))
    outputs, jvp = torch.func.jvp(f, inputs, tangents)
    torch.testing.assert_close(flat(outputs), flat(f(*inputs)), rtol=1e-12, atol=1e-12)
    _assert_tangent(flat(jvp), _finite_difference(f, inputs, tangents))


def test_forward_ad_dual_tensors_through_the_lstm_cell():
    """torch.autograd.forward_ad's own API (the probe's case: the tangent of h was None)."""
    gates, c = CASES["lstm_cell"][1]()
    tangent = _randn(*gates.shape, seed=11)
    with fwAD.dual_level():
        h, c_next = OPS.lstm_cell(fwAD.make_dual(gates, tangent), c)
        got = torch.cat([fwAD.unpack_dual(h).tangent.reshape(-1), fwAD.unpack_dual(c_next).tangent.reshape(-1)])
    _assert_tangent(got, _finite_difference(lambda g: OPS.lstm_cell(g, c), (gates,), (tangent,)))


def test_jacfwd_of_a_module():
    cell = ConvLSTMCell(2, 2, 3).double()
    x = _randn(1, 2, 3, 3, seed=1)
    jacobian = torch.func.jacfwd(lambda x: cell(x)[0])(x).reshape(-1, x.numel())
    for column in (0, 7, 17):
        direction = torch.zeros(x.numel(), dtype=torch.float64)
        direction[column] = 1
        expected = _finite_difference(lambda x: cell(x)[0], (x,), (direction.reshape(x.shape),))
        torch.testing.assert_close(jacobian[:, column], expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["lstm_cell", "nonlocal_attention", "depthwise_conv3d"])
def test_a_forced_kernel_backend_refuses_tangents(name):
    f, make = CASES[name]
    inputs = make()
    with fastvid.backend("cpu"), pytest.raises(RuntimeError, match="forward-mode AD tangents.*'reference'"):
        torch.func.jvp(f, inputs, tuple(torch.ones_like(x) for x in inputs))


@pytest.mark.parametrize("name", sorted(CASES))
def test_grad_transform_matches_autograd_through_the_kernels(name):
    f, make = CASES[name]
    inputs = make()

    def loss(*args):
        out = f(*args)
        return flat(out).square().sum()

    got = torch.func.grad(loss, argnums=tuple(range(len(inputs))))(*inputs)
    leaves = [x.clone().requires_grad_() for x in inputs]
    expected = torch.autograd.grad(loss(*leaves), leaves)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10 * e.abs().max().item())


@pytest.mark.parametrize("make", [lambda: fastvid.nn.DepthwiseConv3d(3, 3, padding=1),
                                  lambda: fastvid.nn.ConvLSTM(3, 4, 3)], ids=["DepthwiseConv3d", "ConvLSTM"])
def test_per_sample_gradients_with_vmap_of_grad(make):
    """The per-sample-gradient recipe (vmap over grad of functional_call), as differential privacy uses it."""
    torch.manual_seed(0)
    module = make().double()
    clips = _randn(3, 3, 2, 4, 4, seed=1)  # DepthwiseConv3d: [B, C, T, H, W]; ConvLSTM: [B, T, C, H, W]
    if isinstance(module, fastvid.nn.ConvLSTM):
        clips = clips.transpose(1, 2).contiguous()
    parameters = {name: p.detach() for name, p in module.named_parameters()}

    def loss(params, clip):
        out = torch.func.functional_call(module, params, (clip.unsqueeze(0),))
        return (out[0] if isinstance(out, tuple) else out).square().sum()  # ConvLSTM: (output, (h, c))

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(parameters, clips)
    for i, clip in enumerate(clips):
        expected = torch.autograd.grad(loss(dict(module.named_parameters()), clip), list(module.parameters()))
        for name, e in zip(parameters, expected):
            torch.testing.assert_close(per_sample[name][i], e, rtol=1e-10, atol=1e-10 * e.abs().max().item())


@pytest.mark.parametrize("mode", ["embedded_gaussian", "dot_product", "concatenation"])
def test_nonlocal_block_grad_and_per_sample_gradients(mode):
    """The NonLocalBlock's fused steps (Python autograd functions) take torch.func: grad in training mode
    (BatchNorm on batch statistics) and vmap(grad) per-sample gradients in eval mode, against autograd.
    Before, they were old-style functions (forward(ctx, ...)): PyTorch raised "must override the
    setup_context staticmethod"."""
    torch.manual_seed(0)
    block = fastvid.nn.NonLocalBlock(4, mode=mode).double()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, dtype=p.dtype) * 0.3)
    x = _randn(3, 4, 2, 4, 4, seed=1)
    parameters = {name: p.detach() for name, p in block.named_parameters()}
    buffers = {name: b.detach() for name, b in block.named_buffers()}

    def loss(params, clips):
        state = {**params, **{name: b.clone() for name, b in buffers.items()}}  # training updates running stats
        return torch.func.functional_call(block, state, (clips,)).square().sum()

    for training in (True, False):
        block.train(training)
        got = torch.func.grad(loss)(parameters, x)
        expected = torch.autograd.grad(loss(dict(block.named_parameters()), x), list(block.parameters()))
        scale = max(e.abs().max().item() for e in expected)  # (φ's bias cancels to ~0 in the softmax)
        for name, e in zip(parameters, expected):
            torch.testing.assert_close(got[name], e, rtol=1e-10, atol=1e-12 * scale)
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(parameters, x.unsqueeze(1))
    for i in range(x.shape[0]):
        expected = torch.autograd.grad(loss(dict(block.named_parameters()), x[i:i + 1]), list(block.parameters()))
        scale = max(e.abs().max().item() for e in expected)
        for name, e in zip(parameters, expected):
            torch.testing.assert_close(per_sample[name][i], e, rtol=1e-10, atol=1e-12 * scale)


def _random_block(seed=0, **kwargs):
    torch.manual_seed(seed)
    block = fastvid.nn.NonLocalBlock(4, **kwargs).double()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, dtype=p.dtype) * 0.3)
    return block


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mode", ["embedded_gaussian", "dot_product", "concatenation", "gaussian"])
def test_nonlocal_block_jvp_matches_finite_differences(mode, training):
    """Forward mode through the NonLocalBlock's fused steps (their jvp rules: the φ/g max-pool, the pointwise
    projections, the folded BatchNorm's statistics and affine step), with tangents on the input and on every
    parameter, in training (batch statistics) and eval mode. Before: PyTorch's "implement the jvp function"."""
    block = _random_block(mode=mode).train(training)
    parameters = {name: p.detach() for name, p in block.named_parameters()}
    buffers = {name: b.detach() for name, b in block.named_buffers()}

    def f(x, *values):
        state = {**dict(zip(parameters, values)), **{name: b.clone() for name, b in buffers.items()}}
        return torch.func.functional_call(block, state, (x,))

    inputs = (_randn(3, 4, 2, 4, 4, seed=1), *parameters.values())
    tangents = tuple(_randn(*t.shape, seed=20 + i) for i, t in enumerate(inputs))
    output, jvp = torch.func.jvp(f, inputs, tangents)
    torch.testing.assert_close(output, f(*inputs), rtol=1e-12, atol=1e-12)  # (the attention op: reference there)
    _assert_tangent(flat(jvp), _finite_difference(f, inputs, tangents))


def test_nonlocal_block_forward_ad_in_one_dimension_and_jacfwd():
    """torch.autograd.forward_ad through a 1-D block (max_pool1d's result is a view of a 2-D pool's, which
    forward mode refused: "the tangent have the same layout as primal"), and jacfwd (vmap over the jvp
    rules) against the reverse-mode Jacobian."""
    block = _random_block(dims=1).train()
    x, tangent = _randn(2, 4, 8, seed=1), _randn(2, 4, 8, seed=2)
    state = {name: t.clone() for name, t in block.state_dict().items()}
    with fwAD.dual_level():
        got = fwAD.unpack_dual(block(fwAD.make_dual(x, tangent))).tangent
    block.load_state_dict(state)  # (training updated the running statistics)
    _assert_tangent(flat(got), _finite_difference(block, (x,), (tangent,)))
    block.eval()
    x = _randn(1, 4, 6, seed=3)
    jacobian = torch.func.jacfwd(block)(x)
    torch.testing.assert_close(jacobian, torch.autograd.functional.jacobian(block, x), rtol=1e-10, atol=1e-12)


def test_nonlocal_block_refuses_forward_over_reverse_with_its_own_message():
    """Second derivatives by forward mode over a gradient (torch.func.hessian, jvp of grad) raise the block's
    message naming the way out, as double backward does (before: PyTorch's "implement the jvp function")."""
    block = _random_block().eval()
    x = _randn(2, 4, 2, 4, 4, seed=1)
    with pytest.raises(RuntimeError, match="second derivatives.*to='reference'"):
        torch.func.hessian(lambda x: block(x).square().sum())(x)
    twin = fastvid.convert(block, to="reference")
    assert torch.func.hessian(lambda x: twin(x).square().sum())(x).shape == x.shape * 2


def test_a_forced_kernel_backend_refuses_a_grad_transform():
    f, make = CASES["depthwise_conv3d"]
    inputs = make()
    with fastvid.backend("cpu"), pytest.raises(RuntimeError, match="torch.func gradient transform.*'reference'"):
        torch.func.grad(lambda x: f(x, inputs[1]).sum())(inputs[0])
