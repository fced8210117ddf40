"""fastvid.nn ConvLSTM / ConvGRU modules: shapes, nn.LSTM-style parameters, state dicts, states,
dropout, initialisation, the Ballas stacked GRU, cells, from_concat_conv, torch.compile, info()."""
import copy
import re

import pytest
import torch
from torch import nn

import fastvid
from fastvid.nn import ConvGRU, ConvGRUCell, ConvLSTM, ConvLSTMCell
from fastvid.reference import recurrent as ref

from _recurrent_samples import assert_parity, channels_last_frames

B, T, C_IN, C, H, W = 2, 3, 3, 4, 5, 6


def _states(result):
    """output, (h_n, c_n) | output, h_n -> [output, h_n(, c_n)]; per-layer state lists (layers of
    different widths) are flattened. A cell's h, c -> [h, c]; its lone h -> [h]."""
    if isinstance(result, torch.Tensor):
        return [result]
    output, states = result
    flat = []
    for s in (states if isinstance(states, tuple) else (states,)):
        flat.extend(s if isinstance(s, list) else [s])
    return [output] + flat


def _randomize(module, scale=0.3):
    """Parameters ~ N(0, scale²) (peepholes included, which start at 0) so nothing is trivially zero."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, scale)
    return module


def _run_with_grads(module, x, state=None, grad_seed=1):
    """Forward + backward with random upstream gradients on every output; returns
    (outputs, {'x': dx, 'h_0': ..., parameter name: grad})."""
    module.zero_grad()
    x = x.detach().requires_grad_()
    leaves = {}
    if state is not None:
        state = tuple(s.detach().requires_grad_() for s in state) if isinstance(state, tuple) \
            else state.detach().requires_grad_()
        for i, s in enumerate(state if isinstance(state, tuple) else (state,)):
            leaves[f"state{i}"] = s
    outputs = _states(module(x, state))
    gen = torch.Generator().manual_seed(grad_seed)
    grad_outputs = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in outputs]
    torch.autograd.backward(outputs, grad_outputs)
    grads = {"x": x.grad, **{k: v.grad for k, v in leaves.items()}}
    grads.update({n: p.grad.clone() for n, p in module.named_parameters()})
    return [o.detach() for o in outputs], grads


def _assert_all_close(actual, expected, what, **tol):
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, **tol, msg=lambda m: f"{what}[{i}]: {m}")


# ========================================================================================== shapes
@pytest.mark.parametrize("cls", [ConvLSTM, ConvGRU])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_output_and_state_shapes(cls, num_layers, bidirectional, batch_first):
    m = cls(C_IN, C, 3, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first)
    D = 2 if bidirectional else 1
    x = torch.randn(B, T, C_IN, H, W) if batch_first else torch.randn(T, B, C_IN, H, W)
    with torch.no_grad():
        outs = _states(m(x))
    expected_output = (B, T, D * C, H, W) if batch_first else (T, B, D * C, H, W)
    assert tuple(outs[0].shape) == expected_output
    for s in outs[1:]:
        assert tuple(s.shape) == (num_layers * D, B, C, H, W)
    assert len(outs) == (3 if cls is ConvLSTM else 2)


@pytest.mark.parametrize("cls", [ConvLSTM, ConvGRU])
def test_per_layer_hidden_channels_and_kernel_sizes(cls):
    hidden, kernels = [3, 5, 2], [3, (1, 3), 5]
    m = cls(C_IN, hidden, kernels, num_layers=3, bidirectional=True)
    G = 4 if cls is ConvLSTM else 3
    expected_in = [C_IN, 2 * 3, 2 * 5]
    k = [(3, 3), (1, 3), (5, 5)]
    for layer in range(3):
        for suffix in (f"_l{layer}", f"_l{layer}_reverse"):
            assert tuple(getattr(m, "weight_ih" + suffix).shape) == (G * hidden[layer], expected_in[layer], *k[layer])
            assert tuple(getattr(m, "weight_hh" + suffix).shape) == (G * hidden[layer], hidden[layer], *k[layer])
    x = torch.randn(B, T, C_IN, H, W)
    with torch.no_grad():
        output, states = m(x)
    assert tuple(output.shape) == (B, T, 2 * hidden[-1], H, W)
    for per_layer in (states if cls is ConvLSTM else (states,)):
        # widths differ: a list of per-layer, per-direction states
        assert [tuple(s.shape) for s in per_layer] == [(B, c, H, W) for c in hidden for _ in range(2)]


def test_per_layer_list_of_wrong_length_raises():
    with pytest.raises(ValueError, match="hidden_channels"):
        ConvLSTM(C_IN, [4, 4], 3, num_layers=3)
    with pytest.raises(ValueError, match="kernel_size"):
        ConvGRU(C_IN, 4, [3, 3], num_layers=1)


# ====================================================================================== parameters
@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, True), (3, False)])
@pytest.mark.parametrize("cls,native", [(ConvLSTM, nn.LSTM), (ConvGRU, nn.GRU)])
@pytest.mark.parametrize("bias", [True, False])
def test_parameter_names_and_shapes_follow_nn_lstm(cls, native, num_layers, bidirectional, bias):
    """Names (and their order) exactly as nn.LSTM / nn.GRU; shapes = nn's [G*C, C_in] + [kH, kW]."""
    ours = cls(C_IN, C, (3, 5), num_layers=num_layers, bidirectional=bidirectional, bias=bias)
    theirs = native(C_IN, C, num_layers=num_layers, bidirectional=bidirectional, bias=bias)
    ours_params = list(ours.named_parameters())
    theirs_params = list(theirs.named_parameters())
    assert [n for n, _ in ours_params] == [n for n, _ in theirs_params]
    for (name, p), (_, q) in zip(ours_params, theirs_params):
        expected = tuple(q.shape) + ((3, 5) if name.startswith("weight") else ())
        assert tuple(p.shape) == expected, name


def test_peephole_parameters():
    m = ConvLSTM(C_IN, C, 3, num_layers=2, bidirectional=True, peephole=True)
    names = {n: tuple(p.shape) for n, p in m.named_parameters() if n.startswith("peephole")}
    assert names == {f"peephole_l{l}{s}": (3, C) for l in range(2) for s in ("", "_reverse")}


@pytest.mark.parametrize("cls,kwargs", [(ConvLSTM, dict(peephole=True)), (ConvGRU, dict(reset_after=False))])
def test_state_dict_round_trip(cls, kwargs):
    torch.manual_seed(0)
    m1 = _randomize(cls(C_IN, C, 3, num_layers=2, bidirectional=True, **kwargs))
    torch.manual_seed(1)
    m2 = _randomize(cls(C_IN, C, 3, num_layers=2, bidirectional=True, **kwargs))
    x = torch.randn(B, T, C_IN, H, W)
    with torch.no_grad():
        before = _states(m2(x))
        expected = _states(m1(x))
    assert not torch.allclose(before[0], expected[0]), "two differently initialised modules agree"
    missing_unexpected = m2.load_state_dict(m1.state_dict())
    assert not missing_unexpected.missing_keys and not missing_unexpected.unexpected_keys
    with torch.no_grad():
        after = _states(m2(x))
    _assert_all_close(after, expected, "after load_state_dict", rtol=0, atol=0)


def test_state_dict_loads_into_nn_lstm_for_1x1_kernels():
    """With 1x1 kernels and H = W = 1 a ConvLSTM is an nn.LSTM: the state dict moves across
    (squeezing the kernel dims) and gives the same outputs."""
    torch.manual_seed(0)
    ours = _randomize(ConvLSTM(C_IN, C, 1, num_layers=2, bidirectional=True)).double()
    native = nn.LSTM(C_IN, C, num_layers=2, bidirectional=True, batch_first=True).double()
    native.load_state_dict({k: v.reshape(v.shape[:2]) if v.dim() == 4 else v for k, v in ours.state_dict().items()})
    x = torch.randn(B, T, C_IN, dtype=torch.float64)
    with torch.no_grad():
        out, (h, c) = ours(x[..., None, None])
        out_n, (h_n, c_n) = native(x)
    _assert_all_close([out[..., 0, 0], h[..., 0, 0], c[..., 0, 0]], [out_n, h_n, c_n], "ConvLSTM vs nn.LSTM",
                      rtol=1e-10, atol=1e-12)


def test_state_dict_loads_into_nn_gru_for_1x1_kernels():
    torch.manual_seed(0)
    ours = _randomize(ConvGRU(C_IN, C, 1, num_layers=2, bidirectional=True, reset_after=True)).double()
    native = nn.GRU(C_IN, C, num_layers=2, bidirectional=True, batch_first=True).double()
    native.load_state_dict({k: v.reshape(v.shape[:2]) if v.dim() == 4 else v for k, v in ours.state_dict().items()})
    x = torch.randn(B, T, C_IN, dtype=torch.float64)
    with torch.no_grad():
        out, h = ours(x[..., None, None])
        out_n, h_n = native(x)
    _assert_all_close([out[..., 0, 0], h[..., 0, 0]], [out_n, h_n], "ConvGRU vs nn.GRU", rtol=1e-10, atol=1e-12)


# ===================================================================== default vs reference backend
MODULE_CASES = {
    "lstm-2layers-bidir-peephole": lambda: ConvLSTM(C_IN, C, 3, num_layers=2, bidirectional=True, peephole=True),
    "lstm-widths-kernels-nobias": lambda: ConvLSTM(C_IN, [3, 5], [3, (3, 1)], num_layers=2, bias=False),
    "lstm-dilation": lambda: ConvLSTM(C_IN, C, 3, dilation=2),
    "gru-2layers-bidir": lambda: ConvGRU(C_IN, C, 3, num_layers=2, bidirectional=True),
    "gru-ballas-bidir": lambda: ConvGRU(C_IN, C, 3, num_layers=2, bidirectional=True, reset_after=False),
    "gru-input_to_all_layers": lambda: ConvGRU(C_IN, [4, 3], 3, num_layers=2, reset_after=False,
                                               input_to_all_layers=True),
}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", list(MODULE_CASES))
def test_default_backend_matches_reference_backend(case, dtype, batch_first, layout):
    """The module on the default backend (compiled kernels) equals the same module on
    fastvid.backend('reference'): outputs, states, and the gradients of x and every parameter."""
    torch.manual_seed(0)
    m = _randomize(MODULE_CASES[case]()).to(dtype)
    m.batch_first = batch_first
    x = torch.randn(B, T, C_IN, H, W, dtype=dtype)
    if layout == "channels_last":
        x = channels_last_frames(x)
    if not batch_first:
        x = x.transpose(0, 1)
    ours, ours_grads = _run_with_grads(m, x)
    with fastvid.backend("reference"):
        expected, expected_grads = _run_with_grads(m, x)
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    _assert_all_close(ours, expected, "outputs", **tol)
    assert set(ours_grads) == set(expected_grads)
    for name in expected_grads:
        torch.testing.assert_close(ours_grads[name], expected_grads[name], **tol, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("cls", [ConvLSTM, ConvGRU])
def test_bidirectional_output_keeps_channels_last_frames(cls, batch_first):
    """Each direction's output keeps channels-last frames; the bidirectional layer's concatenation of
    the two returned them contiguous (torch.cat does not keep that 5-D layout). Values as for the
    contiguous input."""
    m = _randomize(cls(C_IN, C, 3, num_layers=2, bidirectional=True, batch_first=batch_first)).double()
    x = torch.randn(B, T, C_IN, H, W, dtype=torch.float64)
    if not batch_first:
        x = x.transpose(0, 1)
    out = m(channels_last_frames(x) if batch_first else channels_last_frames(x.transpose(0, 1)).transpose(0, 1))[0]
    frames = (out if batch_first else out.transpose(0, 1)).flatten(0, 1)  # [B·T, 2C, H, W]
    assert frames.shape[1] == 2 * C and frames.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, m(x.contiguous())[0], rtol=1e-12, atol=1e-12)


# ================================================================================== initial states
@pytest.mark.parametrize("cls", [ConvLSTM, ConvGRU])
def test_initial_states_are_used(cls):
    torch.manual_seed(0)
    L, D = 2, 2
    m = _randomize(cls(C_IN, C, 3, num_layers=L, bidirectional=True)).double()
    x = torch.randn(B, T, C_IN, H, W, dtype=torch.float64)
    h0 = torch.randn(L * D, B, C, H, W, dtype=torch.float64)
    state = (h0, torch.randn(L * D, B, C, H, W, dtype=torch.float64)) if cls is ConvLSTM else h0
    with torch.no_grad():
        zero_state = _states(m(x))
    ours, ours_grads = _run_with_grads(m, x, state)
    for i in range(len(ours)):
        assert not torch.allclose(ours[i], zero_state[i]), f"output {i} ignores the initial state"
    with fastvid.backend("reference"):
        expected, expected_grads = _run_with_grads(m, x, state)
    _assert_all_close(ours, expected, "outputs", rtol=1e-9, atol=1e-10)
    for name in expected_grads:  # includes the gradients of the initial states
        torch.testing.assert_close(ours_grads[name], expected_grads[name], rtol=1e-9, atol=1e-10,
                                   msg=lambda msg: f"grad {name}: {msg}")
    # Each layer/direction starts from its own slice: the reverse direction of layer 1 sees state[3].
    assert ours_grads["state0"][3].abs().sum() > 0


def test_initial_state_matches_hand_written_layers():
    """ConvLSTM with h_0/c_0 equals the reference layers run with state[layer * D + direction]."""
    torch.manual_seed(0)
    m = _randomize(ConvLSTM(C_IN, C, 3, num_layers=2, bidirectional=True)).double()
    x = torch.randn(B, T, C_IN, H, W, dtype=torch.float64)
    h0 = torch.randn(4, B, C, H, W, dtype=torch.float64)
    c0 = torch.randn(4, B, C, H, W, dtype=torch.float64)
    with torch.no_grad():
        out, (h_n, c_n) = m(x, (h0, c0))
        inp, hs, cs = x, [], []
        for layer in range(2):
            outs = []
            for d, suffix in enumerate((f"_l{layer}", f"_l{layer}_reverse")):
                p = {n: getattr(m, n + suffix) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
                o, h, c = ref.convlstm_sequence(inp, p["weight_ih"], p["weight_hh"], p["bias_ih"] + p["bias_hh"],
                                                h0[2 * layer + d], c0[2 * layer + d], None, (1, 1), (1, 1),
                                                reverse=d == 1)
                outs.append(o)
                hs.append(h)
                cs.append(c)
            inp = torch.cat(outs, 2)
    _assert_all_close([out, h_n, c_n], [inp, torch.stack(hs), torch.stack(cs)], "ConvLSTM vs hand-written",
                      rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("cls", [ConvLSTM, ConvGRU])
def test_initial_state_of_wrong_shape_raises(cls):
    m = cls(C_IN, C, 3, num_layers=2)
    x = torch.randn(B, T, C_IN, H, W)
    bad = torch.zeros(1, B, C, H, W)  # needs num_layers * num_directions = 2
    state = (bad, bad) if cls is ConvLSTM else bad
    with pytest.raises(ValueError, match=r"h_0"):
        m(x, state)
    bad = torch.zeros(2, B, C, H, W + 1)
    state = (torch.zeros(2, B, C, H, W), bad) if cls is ConvLSTM else bad
    with pytest.raises(ValueError, match=r"c_0" if cls is ConvLSTM else r"h_0"):
        m(x, state)


@pytest.mark.parametrize("cls", [ConvLSTM, ConvGRU])
def test_module_bad_input_raises(cls):
    m = cls(C_IN, C, 3)
    with pytest.raises(ValueError, match="in_channels"):
        m(torch.randn(B, T, C_IN + 1, H, W))
    with pytest.raises(ValueError, match="5-D"):
        m(torch.randn(T, C_IN, H, W))
    with pytest.raises(ValueError, match="empty time dimension"):
        m(torch.randn(B, 0, C_IN, H, W))  # (an empty batch runs: test_empty_batch_runs_as_nn_lstm)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        cls(C_IN, C, 4)
    with pytest.raises(ValueError, match="num_layers"):
        cls(C_IN, C, 3, num_layers=0)
    with pytest.raises(ValueError, match="dropout"):
        cls(C_IN, C, 3, dropout=1.5)


# ========================================================================================= dropout
@pytest.mark.parametrize("cls", [ConvLSTM, ConvGRU])
def test_dropout_between_layers_only_in_training(cls):
    torch.manual_seed(0)
    m = _randomize(cls(C_IN, C, 3, num_layers=2, dropout=0.5))
    plain = cls(C_IN, C, 3, num_layers=2, dropout=0.0)
    plain.load_state_dict(m.state_dict())
    x = torch.randn(B, T, C_IN, H, W)
    with torch.no_grad():
        expected = _states(plain(x))
        m.eval()
        _assert_all_close(_states(m(x)), expected, "eval with dropout", rtol=0, atol=0)
        m.train()
        train1, train2 = _states(m(x)), _states(m(x))
    assert not torch.allclose(train1[0], expected[0]), "dropout had no effect in training"
    assert not torch.allclose(train1[0], train2[0]), "dropout masks do not change between calls"
    # Layer 0 sees no dropout (it acts between layers): its final state equals the plain module's.
    torch.testing.assert_close(train1[1][0], expected[1][0], rtol=0, atol=0)


def test_dropout_not_applied_to_last_layer_output():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers > 1"):  # as nn.LSTM warns
        m = _randomize(ConvLSTM(C_IN, C, 3, num_layers=1, dropout=0.5)).train()
    x = torch.randn(B, T, C_IN, H, W)
    with torch.no_grad():
        train = _states(m(x))
        expected = _states(m.eval()(x))
    _assert_all_close(train, expected, "one layer, training", rtol=0, atol=0)


# ===================================================================================== forget bias
def test_unit_forget_bias():
    m = ConvLSTM(C_IN, [C, 3], 3, num_layers=2, bidirectional=True, unit_forget_bias=True)
    for layer, c in ((0, C), (1, 3)):
        for suffix in (f"_l{layer}", f"_l{layer}_reverse"):
            forget = getattr(m, "bias_ih" + suffix)[c:2 * c] + getattr(m, "bias_hh" + suffix)[c:2 * c]
            torch.testing.assert_close(forget, torch.ones(c), rtol=0, atol=0)
            others = torch.cat([getattr(m, "bias_ih" + suffix)[:c], getattr(m, "bias_ih" + suffix)[2 * c:]])
            assert not torch.all(others == 1) and others.abs().max() > 0
    m = ConvLSTM(C_IN, C, 3, unit_forget_bias=False)
    forget = m.bias_ih_l0[C:2 * C] + m.bias_hh_l0[C:2 * C]
    assert not torch.allclose(forget, torch.ones(C))
    cell = ConvLSTMCell(C_IN, C, 3)  # unit_forget_bias=True by default
    torch.testing.assert_close(cell.bias_ih[C:2 * C] + cell.bias_hh[C:2 * C], torch.ones(C), rtol=0, atol=0)


def test_unit_forget_bias_survives_reset_parameters():
    m = ConvLSTM(C_IN, C, 3)
    _randomize(m)
    m.reset_parameters()
    torch.testing.assert_close(m.bias_ih_l0[C:2 * C] + m.bias_hh_l0[C:2 * C], torch.ones(C), rtol=0, atol=0)


# ============================================================================ Ballas stacked ConvGRU
def _ballas_reference(m, x):
    """Hand-written stacked ConvGRU of Ballas et al.: layer l > 0 reads cat([x, output_{l-1}])."""
    inp, h_n = x, []
    for layer in range(m.num_layers):
        if layer > 0:
            inp = torch.cat([x, inp], 2)
        outs = []
        for d, suffix in enumerate(m._suffixes(layer)):
            w_ih, w_hh = getattr(m, "weight_ih" + suffix), getattr(m, "weight_hh" + suffix)
            b_ih, b_hh = getattr(m, "bias_ih" + suffix, None), getattr(m, "bias_hh" + suffix, None)
            k = w_hh.shape[2:]
            h0 = x.new_zeros(x.shape[0], w_hh.shape[1], x.shape[3], x.shape[4])
            o, h = ref.convgru_sequence(inp, w_ih, w_hh, b_ih, b_hh, h0, (k[0] // 2, k[1] // 2), (1, 1),
                                        reset_after=m.reset_after, reverse=d == 1)
            outs.append(o)
            h_n.append(h)
        inp = torch.cat(outs, 2)
    return inp, h_n


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("reset_after", [False, True])
def test_input_to_all_layers(reset_after, bidirectional):
    torch.manual_seed(0)
    hidden = [4, 3, 2]
    m = _randomize(ConvGRU(C_IN, hidden, [3, 1, 3], num_layers=3, reset_after=reset_after,
                           bidirectional=bidirectional, input_to_all_layers=True)).double()
    D = 2 if bidirectional else 1
    assert tuple(m.weight_ih_l0.shape) == (12, C_IN, 3, 3)
    assert tuple(m.weight_ih_l1.shape) == (9, C_IN + D * 4, 1, 1)
    assert tuple(m.weight_ih_l2.shape) == (6, C_IN + D * 3, 3, 3)
    x = torch.randn(B, T, C_IN, H, W, dtype=torch.float64)
    with torch.no_grad():
        out, h_n = m(x)
        expected_out, expected_h = _ballas_reference(m, x)
    assert tuple(out.shape) == (B, T, D * 2, H, W)
    torch.testing.assert_close(out, expected_out, rtol=1e-9, atol=1e-10)
    assert len(h_n) == len(expected_h) == 3 * D
    for i, (a, e) in enumerate(zip(h_n, expected_h)):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10, msg=lambda msg: f"h_n[{i}]: {msg}")


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("make", [lambda bf: ConvLSTM(C_IN, C, 3, num_layers=2, bidirectional=True, peephole=True,
                                                      batch_first=bf),
                                  lambda bf: ConvLSTM(C_IN, C, 3, norm="layer", batch_first=bf),
                                  lambda bf: ConvGRU(C_IN, C, 3, num_layers=2, reset_after=False, batch_first=bf),
                                  lambda bf: ConvGRU(C_IN, C, 3, norm="layer", batch_first=bf)],
                         ids=["lstm", "lstm_layer_norm", "gru_ballas", "gru_layer_norm"])
def test_empty_batch_runs_as_nn_lstm(make, batch_first):
    """A batch of 0 clips gives empty outputs and states and zero weight gradients, as nn.LSTM / nn.GRU do
    and as the plain-PyTorch twin computes (before: 'input has an empty batch or time dimension'). An empty
    time dimension still raises, as in nn.LSTM."""
    module = _randomize(make(batch_first))
    twin = fastvid.convert(module, to="reference")
    shape = (0, T, C_IN, H, W) if batch_first else (T, 0, C_IN, H, W)
    results = []
    for m in (module, twin):
        m.zero_grad()
        x = torch.randn(shape, requires_grad=True)
        outputs = _states(m(x))
        sum(o.sum() for o in outputs).backward()
        results.append(([o.shape for o in outputs], x.grad.shape, {n: p.grad for n, p in m.named_parameters()}))
    (shapes, x_grad, grads), (twin_shapes, twin_x_grad, twin_grads) = results
    assert shapes == twin_shapes and x_grad == twin_x_grad == shape
    assert all(0 in s for s in shapes), shapes
    assert grads.keys() == twin_grads.keys()
    for name, g in grads.items():
        assert g is not None and torch.equal(g, torch.zeros_like(g)) and torch.equal(twin_grads[name], g), name
    if isinstance(module, ConvLSTM) and module.norm is None:
        lengths = torch.zeros(0, dtype=torch.int64)
        assert module(torch.randn(shape), lengths=lengths)[0].shape == shapes[0]
    empty_time = (2, 0, C_IN, H, W) if batch_first else (0, 2, C_IN, H, W)
    with pytest.raises(ValueError, match="input has an empty time dimension"):
        module(torch.randn(empty_time))


# =========================================================================================== cells
@pytest.mark.parametrize("peephole", [False, True])
def test_convlstm_cell_equals_module_at_t1(peephole):
    torch.manual_seed(0)
    m = _randomize(ConvLSTM(C_IN, C, (3, 5), peephole=peephole, dilation=(1, 2))).double()
    cell = ConvLSTMCell(C_IN, C, (3, 5), peephole=peephole, dilation=(1, 2)).double()
    with torch.no_grad():
        for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh") + (("peephole",) if peephole else ()):
            getattr(cell, n).copy_(getattr(m, n + "_l0"))
    x = torch.randn(B, 1, C_IN, H, W, dtype=torch.float64)
    h0 = torch.randn(1, B, C, H, W, dtype=torch.float64)
    c0 = torch.randn(1, B, C, H, W, dtype=torch.float64)
    with torch.no_grad():
        out, (h_n, c_n) = m(x, (h0, c0))
        h, c = cell(x[:, 0], (h0[0], c0[0]))
        out_zero, (h_zero, c_zero) = m(x)
        h_z, c_z = cell(x[:, 0])
    _assert_all_close([h, c, h], [h_n[0], c_n[0], out[:, 0]], "cell vs module", rtol=1e-9, atol=1e-10)
    _assert_all_close([h_z, c_z], [h_zero[0], c_zero[0]], "cell vs module (zero state)", rtol=1e-9, atol=1e-10)
    with fastvid.backend("reference"), torch.no_grad():
        expected = cell(x[:, 0], (h0[0], c0[0]))
    _assert_all_close([h, c], list(expected), "cell vs reference backend", rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("reset_after", [False, True])
def test_convgru_cell_equals_module_at_t1(reset_after):
    torch.manual_seed(0)
    m = _randomize(ConvGRU(C_IN, C, 3, reset_after=reset_after)).double()
    cell = ConvGRUCell(C_IN, C, 3, reset_after=reset_after).double()
    with torch.no_grad():
        for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, n).copy_(getattr(m, n + "_l0"))
    x = torch.randn(B, 1, C_IN, H, W, dtype=torch.float64)
    h0 = torch.randn(1, B, C, H, W, dtype=torch.float64)
    with torch.no_grad():
        out, h_n = m(x, h0)
        h = cell(x[:, 0], h0[0])
        _, h_zero = m(x)
        h_z = cell(x[:, 0])
    _assert_all_close([h, h, h_z], [h_n[0], out[:, 0], h_zero[0]], "cell vs module", rtol=1e-9, atol=1e-10)
    with fastvid.backend("reference"), torch.no_grad():
        expected = cell(x[:, 0], h0[0])
    torch.testing.assert_close(h, expected, rtol=1e-9, atol=1e-10)


def test_cells_gradients_match_reference_backend():
    torch.manual_seed(0)
    for cell in (_randomize(ConvLSTMCell(C_IN, C, 3, peephole=True)), _randomize(ConvGRUCell(C_IN, C, 3,
                                                                                            reset_after=False))):
        cell = cell.double()
        x = torch.randn(B, C_IN, H, W, dtype=torch.float64)
        h = torch.randn(B, C, H, W, dtype=torch.float64)
        state = (h, torch.randn(B, C, H, W, dtype=torch.float64)) if isinstance(cell, ConvLSTMCell) else h
        results = []
        for backend in ("auto", "reference"):
            cell.zero_grad()
            xx = x.clone().requires_grad_()
            with fastvid.backend(backend):
                out = cell(xx, state)
            out = list(out) if isinstance(out, tuple) else [out]
            torch.autograd.backward(out, [torch.ones_like(o) * (i + 1) for i, o in enumerate(out)])
            results.append([o.detach() for o in out] + [xx.grad] + [p.grad.clone() for p in cell.parameters()])
        _assert_all_close(results[0], results[1], type(cell).__name__, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("given_state", [False, True], ids=["zero_state", "given_state"])
@pytest.mark.parametrize("make", [lambda: ConvLSTMCell(C_IN, C, 3, peephole=True),
                                  lambda: ConvLSTMCell(C_IN, C, 3, norm="layer"), lambda: ConvGRUCell(C_IN, C, 3),
                                  lambda: ConvGRUCell(C_IN, C, 3, reset_after=False)],
                         ids=["lstm_peephole", "lstm_layer_norm", "gru", "gru_ballas"])
def test_cells_take_an_unbatched_step(make, given_state):
    """x [C_in, H, W] and states [C, H, W], as nn.LSTMCell and nn.Conv2d take one sample (before: 'input must
    be one time step [B, C_in, H, W]'): outputs and gradients against the plain-PyTorch twin
    (convert(to='reference')) on the batch of one; a batched state with an unbatched x is named."""
    torch.manual_seed(0)
    cell = _randomize(make()).double()
    twin = fastvid.convert(cell, to="reference")
    lstm = isinstance(cell, ConvLSTMCell)
    x = torch.randn(C_IN, H, W, dtype=torch.float64)
    state = None
    if given_state:
        state = tuple(torch.randn(2, C, H, W, dtype=torch.float64).unbind()) if lstm else torch.randn(C, H, W,
                                                                                                     dtype=torch.float64)
    batched_state = None if state is None else tuple(s[None] for s in state) if lstm else state[None]
    ours, ours_grads = _run_with_grads(cell, x, state)
    expected, expected_grads = _run_with_grads(twin, x[None], batched_state)
    assert [tuple(o.shape) for o in ours] == [(C, H, W)] * len(ours)
    _assert_all_close(ours, [e[0] for e in expected], "unbatched outputs", rtol=1e-9, atol=1e-10)
    with torch.no_grad():  # the twin takes the unbatched step too
        _assert_all_close(_states(twin(x, state)), ours, "twin's unbatched outputs", rtol=1e-9, atol=1e-10)
    assert ours_grads.keys() == expected_grads.keys()
    for name in ours_grads:
        want = expected_grads[name]
        want = want[0] if ours_grads[name].dim() == want.dim() - 1 else want  # x's and the states' batch of one
        _assert_all_close([ours_grads[name]], [want], f"grad {name}", rtol=1e-9, atol=1e-10)
    batched_h = torch.randn(1, C, H, W, dtype=torch.float64)
    with pytest.raises(ValueError, match=re.escape(f"h must be [C, H, W] = ({C}, {H}, {W}) for an unbatched input, "
                                                   f"got (1, {C}, {H}, {W})")):
        cell(x, (batched_h, torch.randn(C, H, W, dtype=torch.float64)) if lstm else batched_h)


@pytest.mark.parametrize("norm", [None, "layer"])
def test_lstm_cell_broadcasts_a_batch_one_h_with_or_without_norm(norm):
    """A batched h of batch 1 (a learned initial state) broadcasts over the batch in ConvLSTMCell; with
    norm="layer" the cell raised an error of the sequence op it runs (naming an h0 the caller never
    passed). Both against the cell given h expanded, values and h's gradient (summed over the batch)."""
    torch.manual_seed(0)
    cell = _randomize(ConvLSTMCell(C_IN, C, 3, norm=norm)).double()
    x, c = torch.randn(B, C_IN, H, W, dtype=torch.float64), torch.randn(B, C, H, W, dtype=torch.float64)
    h1 = torch.randn(1, C, H, W, dtype=torch.float64, requires_grad=True)
    h_expanded = h1.detach().expand(B, -1, -1, -1).clone().requires_grad_()
    ours, expected = cell(x, (h1, c)), cell(x, (h_expanded, c))
    _assert_all_close(list(ours), list(expected), "outputs", rtol=1e-12, atol=1e-12)
    sum(o.sum() for o in ours).backward()
    sum(o.sum() for o in expected).backward()
    _assert_all_close([h1.grad], [h_expanded.grad.sum(0, keepdim=True)], "grad h", rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("c_dtype", [torch.float64, torch.bfloat16])
def test_a_cell_state_of_another_dtype_is_refused(c_dtype):
    """c0 (c_prev) must have x's dtype or the fp32 the cell state is kept in beside bf16 / fp16, as h0 must
    have x's: an fp64 or bf16 c0 beside fp32 x was cast silently (the fp64 one lost its precision)."""
    x, h = torch.randn(B, T, C_IN, H, W), torch.randn(1, B, C, H, W)
    c = torch.randn(1, B, C, H, W, dtype=c_dtype)
    with pytest.raises(TypeError, match=f"c0 has dtype {c_dtype} but x has dtype torch.float32"):
        ConvLSTM(C_IN, C, 3, batch_first=True)(x, (h, c))
    with pytest.raises(TypeError, match=f"c0 has dtype {c_dtype} but x has dtype torch.float32"):
        ConvLSTM(C_IN, C, 3, batch_first=True, norm="layer")(x, (h, c))
    with pytest.raises(TypeError, match=f"c_prev has dtype {c_dtype} but gates_pre has dtype torch.float32"):
        ConvLSTMCell(C_IN, C, 3)(x[:, 0], (h[0], c[0]))
    # fp32 beside bf16 is the cell state's own dtype there
    out, (_, c_n) = ConvLSTM(C_IN, C, 3, batch_first=True).bfloat16()(x.bfloat16(), (h.bfloat16(), c.float()))
    assert out.dtype == torch.bfloat16 and c_n.dtype == torch.float32


@pytest.mark.parametrize("given_state", [False, True], ids=["zero_state", "fp32_state"])
@pytest.mark.parametrize("make", [lambda: ConvLSTMCell(C_IN, C, 3, peephole=True),
                                  lambda: ConvGRUCell(C_IN, C, 3), lambda: ConvGRUCell(C_IN, C, 3, reset_after=False)],
                         ids=["lstm_peephole", "gru", "gru_ballas"])
def test_cells_train_under_autocast(make, given_state):
    """A cell under CPU bf16 autocast with an fp32 state (its default zeros or one given) runs in bf16 and
    trains: output and the gradients of x, the state and every parameter against the fp64 cell on the
    values autocast rounded (x, parameters, h; the LSTM's c stays fp32), by the flash-attention rule with
    the reference backend under the same autocast as yardstick. (ConvGRUCell raised a dtype mismatch
    here: its fp32 h met the bf16 conv outputs.)"""
    torch.manual_seed(0)
    cell = _randomize(make())
    lstm = isinstance(cell, ConvLSTMCell)
    x = torch.randn(B, C_IN, H, W)
    state = None
    if given_state:
        state = (torch.randn(B, C, H, W), torch.randn(B, C, H, W)) if lstm else torch.randn(B, C, H, W)
    runs = {}
    for backend in ("auto", "reference"):
        with fastvid.backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
            runs[backend] = _run_with_grads(cell, x, state)
    (ours, ours_grads), (comparator, comparator_grads) = runs["auto"], runs["reference"]
    assert ours[0].dtype == torch.bfloat16, f"h: {ours[0].dtype}"

    oracle_cell = copy.deepcopy(cell).double()
    with torch.no_grad():
        for p in oracle_cell.parameters():
            p.copy_(p.bfloat16().double())
    rounded_state = state  # h as the convs and gru_cell round it; the LSTM's c stays as given
    if state is not None:
        rounded_state = (state[0].bfloat16().double(), state[1].double()) if lstm else state.bfloat16().double()
    with fastvid.backend("reference"):
        oracle, oracle_grads = _run_with_grads(oracle_cell, x.bfloat16().double(), rounded_state)
    for i, (a, o, c) in enumerate(zip(ours, oracle, comparator)):
        assert_parity(a, o, torch.bfloat16, f"output {i}", c)
    assert ours_grads.keys() == oracle_grads.keys()
    for name in ours_grads:
        assert ours_grads[name].dtype == torch.float32, f"grad {name}: {ours_grads[name].dtype}"
        assert_parity(ours_grads[name], oracle_grads[name], torch.bfloat16, f"grad {name}", comparator_grads[name],
                      grad=True)


# ================================================================================ from_concat_conv
def _hand_written_step(conv, x, h, c, gate_order):
    """The common per-step ConvLSTM: conv(cat([x, h])) -> split in `gate_order` -> sigmoid/tanh."""
    chunks = dict(zip(gate_order, torch.split(conv(torch.cat([x, h], 1)), h.shape[1], dim=1)))
    i, f, o = torch.sigmoid(chunks["i"]), torch.sigmoid(chunks["f"]), torch.sigmoid(chunks["o"])
    g = torch.tanh(chunks["g"])
    c = f * c + i * g
    return o * torch.tanh(c), c


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("gate_order", ["ifgo", "ifog", "gifo", "oigf"])
def test_from_concat_conv(gate_order, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(C_IN + C, 4 * C, (3, 5), padding=(2, 4), dilation=(2, 2), bias=bias)
    with torch.no_grad():
        conv.weight.normal_(0, 0.3)
        if bias:
            conv.bias.normal_(0, 0.5)
    cell = ConvLSTMCell.from_concat_conv(conv, C, gate_order)
    xs = torch.randn(3, B, C_IN, H, W)
    h = c = torch.zeros(B, C, H, W)
    h_cell = c_cell = None
    with torch.no_grad():
        for t in range(3):
            h, c = _hand_written_step(conv, xs[t], h, c, gate_order)
            h_cell, c_cell = cell(xs[t], None if t == 0 else (h_cell, c_cell))
            torch.testing.assert_close(h_cell, h, rtol=1e-5, atol=1e-6, msg=lambda m: f"h at step {t}: {m}")
            torch.testing.assert_close(c_cell, c, rtol=1e-5, atol=1e-6, msg=lambda m: f"c at step {t}: {m}")



def test_from_concat_conv_leaves_the_global_random_state_alone():
    conv = nn.Conv2d(C_IN + C, 4 * C, 3, padding=1)
    before = torch.get_rng_state()
    ConvLSTMCell.from_concat_conv(conv, C)
    assert torch.equal(torch.get_rng_state(), before)

def test_from_concat_conv_keeps_dtype():
    """A float64 conv gives a float64 cell equal to the float64 hand-written step (weights are not
    silently rounded to float32)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(C_IN + C, 4 * C, 3, padding=1).double()
    cell = ConvLSTMCell.from_concat_conv(conv, C, "ifog")
    weight_dtype = cell.weight_ih.dtype
    assert weight_dtype == torch.float64, f"cell weights are {weight_dtype}"
    x = torch.randn(B, C_IN, H, W, dtype=torch.float64)
    h = c = torch.zeros(B, C, H, W, dtype=torch.float64)
    with torch.no_grad():
        expected = _hand_written_step(conv, x, h, c, "ifog")
        got = cell(x, (h, c))
    _assert_all_close(list(got), list(expected), "float64 cell", rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("kernel,dilation,padding", [(3, 1, "same"), ((3, 5), (2, 1), "same"), (1, 1, "valid")])
def test_from_concat_conv_takes_string_paddings(kernel, dilation, padding):
    """nn.Conv2d's padding='same' (symmetric: odd kernels) and 'valid' (a 1×1 conv) are the cell's padding
    (before: "conv padding same is not 'same' padding (1, 1)"); the cell equals the float64 step."""
    torch.manual_seed(0)
    conv = nn.Conv2d(C_IN + C, 4 * C, kernel, padding=padding, dilation=dilation).double()
    cell = ConvLSTMCell.from_concat_conv(conv, C)
    x = torch.randn(B, C_IN, H, W, dtype=torch.float64)
    h, c = torch.randn(B, C, H, W, dtype=torch.float64), torch.randn(B, C, H, W, dtype=torch.float64)
    with torch.no_grad():
        _assert_all_close(list(cell(x, (h, c))), list(_hand_written_step(conv, x, h, c, "ifgo")), "cell",
                          rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("conv_kwargs,message", [
    (dict(kernel_size=3, padding=1, padding_mode="reflect"), "zero-pad.*padding_mode='reflect'"),
    (dict(kernel_size=(2, 3), padding="same"), "padding 'same' is not the cell's"),
    (dict(kernel_size=3, padding="valid"), "padding 'valid' is not the cell's")])
def test_from_concat_conv_refuses_other_paddings(conv_kwargs, message):
    """A conv padding other than the cell's zero 'same' padding is refused, saying why (a reflect-padded conv
    was accepted and the cell computed zero-padded gates: h off by ~0.2)."""
    with pytest.raises(ValueError, match=message):
        ConvLSTMCell.from_concat_conv(nn.Conv2d(C_IN + C, 4 * C, **conv_kwargs), C)


def test_from_concat_conv_rejects_bad_convs():
    with pytest.raises(ValueError, match="gate_order"):
        ConvLSTMCell.from_concat_conv(nn.Conv2d(C_IN + C, 4 * C, 3, padding=1), C, "ifgx")
    with pytest.raises(ValueError, match="4 \\* |map|channels"):
        ConvLSTMCell.from_concat_conv(nn.Conv2d(C_IN + C, 3 * C, 3, padding=1), C)
    with pytest.raises(ValueError, match="padding"):
        ConvLSTMCell.from_concat_conv(nn.Conv2d(C_IN + C, 4 * C, 3, padding=0), C)
    with pytest.raises(ValueError, match="stride|groups"):
        ConvLSTMCell.from_concat_conv(nn.Conv2d(C_IN + C, 4 * C, 3, padding=1, stride=2), C)


# ================================================================================== torch.compile
@pytest.mark.parametrize("cls", [ConvLSTM, ConvGRU])
def test_one_layer_final_state_is_a_view_of_the_last_step(cls):
    """One layer, one direction: h_n [1, B, C, H, W] is the last output frame, kept in the frames' layout
    (channels_last here: a view of the op's h_n, no copy), and gradients flow through it as through
    the output."""
    m = _randomize(cls(C_IN, C, 3)).double()
    x = channels_last_frames(torch.randn(B, T, C_IN, H, W, dtype=torch.float64)).requires_grad_(True)
    out, states = m(x)
    h_n = states[0] if cls is ConvLSTM else states
    assert h_n.shape == (1, B, C, H, W)
    assert h_n._is_view() and h_n[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(h_n[0], out[:, -1], rtol=0, atol=0)
    grad_via_state = torch.autograd.grad(h_n.sum(), x, retain_graph=True)[0]
    grad_via_output = torch.autograd.grad(out[:, -1].sum(), x)[0]
    torch.testing.assert_close(grad_via_state, grad_via_output, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("cls", [ConvLSTM])
def test_torch_compile_fullgraph_matches_eager(cls, layout):
    """torch.compile(fullgraph=True) with inductor: forward and backward equal eager (the custom
    ops stay opaque, so this checks their fake kernels and autograd under AOTAutograd; inductor
    asserts that real outputs have the strides the fake kernels promised)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = _randomize(cls(C_IN, C, 3, num_layers=2, bidirectional=True, peephole=True))
    x = torch.randn(B, T, C_IN, H, W)
    if layout == "channels_last":
        x = channels_last_frames(x)
    compiled = torch.compile(m, fullgraph=True, backend="inductor")
    expected, expected_grads = _run_with_grads(m, x)
    ours, ours_grads = _run_with_grads(compiled, x)
    _assert_all_close(ours, expected, "compiled outputs", rtol=1e-5, atol=1e-6)
    for name in expected_grads:
        key = name if name in ours_grads else "_orig_mod." + name
        torch.testing.assert_close(ours_grads[key], expected_grads[name], rtol=1e-5, atol=1e-5,
                                   msg=lambda msg: f"grad {name}: {msg}")
    # And against the reference backend, so a shared mistake of eager and compiled cannot pass.
    with fastvid.backend("reference"):
        reference, reference_grads = _run_with_grads(m, x)
    _assert_all_close(ours, reference, "compiled vs reference", rtol=1e-5, atol=1e-6)
    for name in reference_grads:
        key = name if name in ours_grads else "_orig_mod." + name
        torch.testing.assert_close(ours_grads[key], reference_grads[name], rtol=1e-5, atol=1e-5,
                                   msg=lambda msg: f"grad {name} vs reference: {msg}")


# ========================================================================================== info()
def test_info():
    info = fastvid.info()
    for key in ("version", "torch", "cpu_kernels", "cuda_compiled", "cuda_available", "triton_available"):
        assert key in info, key
    assert info["version"] == fastvid.__version__ and isinstance(info["version"], str)
    assert info["torch"] == torch.__version__
    for key in ("cpu_kernels", "cuda_compiled", "cuda_available", "triton_available"):
        assert isinstance(info[key], bool), key
    assert info["cpu_kernels"] == hasattr(torch.ops.fastvid, "lstm_cell")
    if info["cuda_available"]:
        assert info["cuda_compiled"] and torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert info["cuda_available"] is False


@pytest.mark.parametrize("make_state,got", [(lambda h: (h,), "a tuple of 1"), (lambda h: (h, None), "(Tensor, None)"),
                                            (lambda h: h, "Tensor")])
def test_a_malformed_lstm_state_is_named(make_state, got):
    """(h0,), (h0, None) or a bare tensor as the LSTM state failed inside the layer with an IndexError or an
    AttributeError ('NoneType' object has no attribute 'dim'); now a ValueError saying what the state must be."""
    x, h = torch.randn(B, T, C_IN, H, W), torch.randn(1, B, C, H, W)
    with pytest.raises(ValueError, match=re.escape(f"ConvLSTM: the state must be None or the pair (h_0, c_0), got {got}")):
        ConvLSTM(C_IN, C, 3, batch_first=True)(x, make_state(h))
    with pytest.raises(ValueError, match=re.escape(f"ConvLSTMCell: the state must be None or the pair (h, c), got {got}")):
        ConvLSTMCell(C_IN, C, 3)(x[:, 0], make_state(h[0]))
