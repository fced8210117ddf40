"""``fastvid.convert(model, to="reference")``: every fastvid layer becomes plain PyTorch with the same
parameters (same state-dict keys) and the same outputs and gradients, and the converted model runs
with every fastvid op unavailable.

Round trip: a "native" model (a depthwise ``nn.Conv3d`` next to fastvid recurrent layers, since
PyTorch has no ConvLSTM of its own) → ``convert(to="fastvid")`` → ``convert(to="reference")``."""
from __future__ import annotations

import pytest
import torch
import torch.nn.utils.prune
from torch import nn

import fastvid
import fastvid.ops
from fastvid.models import build
from fastvid.nn import (AttentionConvLSTM, Conv2Plus1d, ConvGRU, ConvGRUCell, ConvLSTM, ConvLSTMCell,
                        DepthwiseConv3d, SeparableConv3d)

CONFIGS = {
    # many options at once: layers of different widths (states come back as lists), bidirectional,
    # peephole, dropout between layers (train mode), Ballas GRU with input_to_all_layers, dilation
    "deep": dict(lstm=dict(hidden_channels=[4, 3], num_layers=2, bidirectional=True, peephole=True, dropout=0.3,
                           kernel_size=[3, (1, 3)]),
                 gru=dict(hidden_channels=3, num_layers=2, bidirectional=True, reset_after=False,
                          input_to_all_layers=True, dropout=0.2, dilation=[1, 2]),
                 lstm_cell=dict(peephole=True), gru_cell=dict(reset_after=False), batch_first=True),
    # time-major, no biases, nn.GRU formula, unit_forget_bias off
    "time_major": dict(lstm=dict(hidden_channels=4, num_layers=1, bias=False, unit_forget_bias=False),
                       gru=dict(hidden_channels=3, num_layers=2, bias=False, reset_after=True),
                       lstm_cell=dict(bias=False), gru_cell=dict(reset_after=True, kernel_size=1),
                       batch_first=False),
}


class Mixed(nn.Module):
    """Depthwise / separable / (2+1)D convs, then ConvLSTM → ConvGRU over time, the two cells on the
    last frame and an AttentionConvLSTM on the ConvLSTM's output: every fastvid layer in one model."""

    def __init__(self, lstm, gru, lstm_cell, gru_cell, batch_first, channels=3):
        super().__init__()
        self.batch_first = batch_first
        self.depthwise = nn.Conv3d(channels, 2 * channels, 3, padding=1, groups=channels)
        self.separable = SeparableConv3d(2 * channels, 4, (3, 3, 3), padding=1, norm=nn.BatchNorm3d(2 * channels),
                                         activation=nn.ReLU())
        self.factorised = Conv2Plus1d(4, 4, 3)
        self.convlstm = ConvLSTM(4, batch_first=batch_first, **lstm)
        lstm_out = self.convlstm.hidden_channels[-1] * self.convlstm.num_directions
        self.convgru = ConvGRU(lstm_out, batch_first=batch_first, **gru)
        gru_out = self.convgru.hidden_channels[-1] * self.convgru.num_directions
        self.lstm_cell = ConvLSTMCell(gru_out, 3, **lstm_cell)
        self.gru_cell = ConvGRUCell(3, 2, **gru_cell)
        self.attention = AttentionConvLSTM(lstm_out, 3, attention_channels=2, batch_first=batch_first)

    def forward(self, video):  # [B, C, T, H, W]
        x = self.factorised(self.separable(self.depthwise(video)))
        seq = x.transpose(1, 2) if self.batch_first else x.permute(2, 0, 1, 3, 4)
        lstm_out, (h_n, c_n) = self.convlstm(seq)
        gru_out, gru_h = self.convgru(lstm_out)
        last = gru_out[:, -1] if self.batch_first else gru_out[-1]
        h, c = self.lstm_cell(last)
        h, c = self.lstm_cell(last, (h, c))
        g = self.gru_cell(h, self.gru_cell(h))
        att_out, (att_h, att_c), att_maps = self.attention(lstm_out)
        return [lstm_out, gru_out, h, c, g, att_out, att_c, att_maps, h_n, c_n, gru_h]


def flat(outputs):
    """All tensors of a nested tuple/list, flattened and concatenated."""
    if isinstance(outputs, torch.Tensor):
        return outputs.reshape(-1)
    return torch.cat([flat(o) for o in outputs])


# fastvid.nn composites that only chain their children (torch.nn modules and fastvid layers): they call
# no op themselves, so the conversion keeps them and converts their children
COMPOSITES = (SeparableConv3d, Conv2Plus1d)


def fastvid_layer_modules(model):
    """Modules of a fastvid.nn class other than the composites: the layers that call fastvid ops."""
    return [type(m).__name__ for m in model.modules()
            if type(m).__module__.startswith("fastvid.nn") and not isinstance(m, COMPOSITES)]


def leaf_modules_outside_torch_nn(model):
    return [type(m).__name__ for m in model.modules()
            if not list(m.children()) and not type(m).__module__.startswith("torch.nn")]


def forward_backward(model, clip, seed):
    """Outputs and gradients (input and every parameter, by name) for one seeded pass."""
    clip = clip.clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same dropout masks in every model
    out = flat(model(clip))
    weights = torch.linspace(-1, 1, out.numel())
    (out * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return out.detach(), clip.grad, grads


@pytest.fixture
def block_fastvid_ops(monkeypatch):
    """Makes every fastvid op unreachable: ``torch.ops.fastvid.<op>`` lookups and the ``fastvid.ops``
    functions the layers call raise. Yields a function that activates the block."""
    def activate():
        class Blocked:
            def __getattr__(self, name):
                raise RuntimeError(f"blocked: torch.ops.fastvid.{name}")

        monkeypatch.setattr(torch.ops, "fastvid", Blocked())
        for name, value in list(vars(fastvid.ops).items()):
            if callable(value) and getattr(value, "__module__", "").startswith("fastvid.ops"):
                def blocked(*args, _name=name, **kwargs):
                    raise RuntimeError(f"blocked: fastvid.ops.{_name}")
                monkeypatch.setattr(fastvid.ops, name, blocked)
    return activate


@pytest.mark.parametrize("config", CONFIGS)
def test_round_trip_native_fastvid_reference(config, block_fastvid_ops):
    native = Mixed(**CONFIGS[config]).train()
    with torch.no_grad():  # peephole weights start at 0: give every parameter a value that matters
        for p in native.parameters():
            p.uniform_(-0.6, 0.6)
    fast = fastvid.convert(native)
    ref = fastvid.convert(fast, to="reference")
    assert isinstance(fast.depthwise, DepthwiseConv3d) and isinstance(native.depthwise, nn.Conv3d)
    assert fastvid_layer_modules(ref) == []
    assert set(fastvid_layer_modules(fast)) == {"DepthwiseConv3d", "ConvLSTM", "ConvGRU", "ConvLSTMCell",
                                                 "ConvGRUCell", "AttentionConvLSTM"}
    assert type(ref.depthwise) is nn.Conv3d and type(ref.separable.depthwise) is nn.Conv3d
    # what is left of fastvid is the plain-PyTorch twins (fastvid.convert_reference) over torch.nn leaves
    assert set(leaf_modules_outside_torch_nn(ref)) == {"ReferenceConvLSTM", "ReferenceConvGRU",
                                                       "ReferenceConvLSTMCell", "ReferenceConvGRUCell"}

    # the same parameters under the same names, in the same order
    keys = list(native.state_dict())
    assert list(fast.state_dict()) == keys and list(ref.state_dict()) == keys
    for key, value in native.state_dict().items():
        assert torch.equal(ref.state_dict()[key], value), key
    # ... so state dicts load both ways
    ref.load_state_dict(fast.state_dict())
    fast.load_state_dict(ref.state_dict())

    clip = torch.randn(2, 3, 4, 6, 5)
    results = {name: forward_backward(model, clip, seed=7) for name, model in
               (("native", native), ("fastvid", fast), ("reference", ref))}
    out, grad_in, grads = results["fastvid"]
    for name in ("native", "reference"):
        other_out, other_grad_in, other_grads = results[name]
        torch.testing.assert_close(other_out, out, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(other_grad_in, grad_in, rtol=1e-4, atol=1e-5, msg=name)
        assert other_grads.keys() == grads.keys()
        for key in grads:
            torch.testing.assert_close(other_grads[key], grads[key], rtol=1e-4, atol=1e-5, msg=f"{name} {key}")

    # with every fastvid op gone, the fastvid model fails and the converted one still runs
    block_fastvid_ops()
    with pytest.raises(RuntimeError, match="blocked"):
        fast(clip)
    with torch.no_grad():
        torch.manual_seed(7)
        blocked_out = flat(ref(clip))
    torch.testing.assert_close(blocked_out, out)


def test_block_also_catches_the_reference_backend(block_fastvid_ops):
    """The block is on fastvid.ops itself, so even fastvid's own reference backend cannot slip through."""
    layer = ConvLSTM(3, 4)
    block_fastvid_ops()
    with fastvid.backend("reference"), pytest.raises(RuntimeError, match="blocked: fastvid.ops.convlstm"):
        layer(torch.randn(1, 2, 3, 4, 4))


def test_converted_cells_and_sequences_keep_initial_states():
    for module, args in ((ConvLSTM(3, 4, num_layers=2), lambda x: (torch.randn(2, 2, 4, 5, 5),) * 2),
                         (ConvGRU(3, 4, num_layers=2), lambda x: torch.randn(2, 2, 4, 5, 5)),
                         (ConvLSTMCell(3, 4), lambda x: (torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5))),
                         (ConvGRUCell(3, 4), lambda x: torch.randn(2, 4, 5, 5))):
        ref = fastvid.convert(module, to="reference")
        cell = isinstance(module, (ConvLSTMCell, ConvGRUCell))
        x = torch.randn(2, 3, 5, 5) if cell else torch.randn(2, 3, 3, 5, 5)
        state = args(x)
        torch.testing.assert_close(flat(ref(x, state)), flat(module(x, state)))
        assert not torch.allclose(flat(ref(x, state)), flat(ref(x)))  # the state was used


@pytest.mark.parametrize("cls", [ConvLSTM, ConvGRU])
def test_twins_take_lengths_and_stream(cls, block_fastvid_ops):
    """The plain-PyTorch twins take the layers' ``lengths=`` and ``stream()`` (before: "unexpected keyword
    argument 'lengths'" / no attribute 'stream'): outputs, final states and input gradients equal the fastvid
    layer's (fp64; two layers, bidirectional for lengths), and bidirectional twins refuse to stream."""
    torch.manual_seed(0)
    layer = cls(3, 4, num_layers=2, bidirectional=True).double()
    one_way = cls(3, 4, num_layers=2).double()
    x = torch.randn(3, 5, 3, 6, 6, dtype=torch.float64)
    lengths = torch.tensor([5, 2, 4])

    def run(module, *args, **kwargs):
        clip = x.clone().requires_grad_()
        out = module(clip, *args, **kwargs)
        flat(out).sum().backward()
        return flat(out).detach(), clip.grad

    expected = run(layer, lengths=lengths)
    chunks = [one_way.stream(x[:, :2]), None]
    chunks[1] = one_way.stream(x[:, 2:], chunks[0][1])
    twin, twin_one_way = fastvid.convert(layer, to="reference"), fastvid.convert(one_way, to="reference")
    block_fastvid_ops()
    torch.testing.assert_close(run(twin, lengths=lengths), expected, rtol=1e-12, atol=1e-12)
    first = twin_one_way.stream(x[:, :2])
    second = twin_one_way.stream(x[:, 2:], first[1])
    torch.testing.assert_close([flat(first), flat(second)], [flat(chunks[0]), flat(chunks[1])], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="bidirectional module cannot run chunk by chunk"):
        twin.stream(x)



@pytest.mark.parametrize("how", ["weight_norm", "prune"])
@pytest.mark.parametrize("cls", [ConvLSTM, ConvGRU])
def test_recurrent_twins_run_parametrized_weights(cls, how, block_fastvid_ops):
    """weight_norm or pruning applied to a twin's weight, as users apply them to nn.LSTM's: the twin runs with
    the computed weight, giving the outputs of a twin that holds that weight as a plain parameter (before:
    KeyError 'weight_ih_l0' / "conv2d() received an invalid combination of arguments": the twins read their
    parameters from the module's parameter table, where a parametrized weight is not)."""
    torch.manual_seed(0)
    twin = fastvid.convert(cls(3, 4, num_layers=2, bidirectional=True, norm="layer" if how == "prune" else None),
                           to="reference")
    plain = fastvid.convert(cls(3, 4, num_layers=2, bidirectional=True, norm="layer" if how == "prune" else None),
                            to="reference")
    name = "weight_ih_l1_reverse"
    if how == "weight_norm":
        torch.nn.utils.parametrizations.weight_norm(twin, name)
    else:
        torch.nn.utils.prune.l1_unstructured(twin, name, amount=0.3)
    plain.load_state_dict({k: v for k, v in twin.state_dict().items() if k in plain.state_dict()}, strict=False)
    with torch.no_grad():
        getattr(plain, name).copy_(getattr(twin, name))  # the weight the parametrization computes
    block_fastvid_ops()
    x = torch.randn(2, 3, 3, 5, 5)
    assert torch.equal(flat(twin(x)), flat(plain(x)))

def test_convert_at_the_top_level_and_bf16_state_dtype():
    cell = ConvLSTMCell(3, 4).to(torch.bfloat16)
    ref = fastvid.convert(cell, to="reference")
    assert fastvid_layer_modules(ref) == []
    x = torch.randn(2, 3, 5, 5, dtype=torch.bfloat16)
    (h, c), (h_ref, c_ref) = cell(x), ref(x)
    assert c.dtype == c_ref.dtype == torch.float32 and h_ref.dtype == torch.bfloat16
    torch.testing.assert_close(h_ref, h)
    torch.testing.assert_close(c_ref, c)


@pytest.mark.parametrize("module", [ConvLSTM(3, 4, num_layers=2), ConvGRU(3, 4, reset_after=False)],
                         ids=["convlstm", "convgru"])
def test_twins_follow_autocast_like_the_fastvid_ops(module):
    """Under bf16 autocast fastvid casts the conv inputs to bf16 (the LSTM cell state stays fp32)."""
    ref = fastvid.convert(module, to="reference")
    x = torch.randn(2, 3, 3, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, states = module(x)
        out_ref, states_ref = ref(x)
    assert out.dtype == out_ref.dtype == torch.bfloat16
    assert [s.dtype for s in flat_list(states)] == [s.dtype for s in flat_list(states_ref)]
    torch.testing.assert_close(out_ref, out, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("make", [lambda: ConvLSTMCell(3, 4, peephole=True), lambda: ConvGRUCell(3, 4),
                                  lambda: ConvGRUCell(3, 4, reset_after=False), lambda: ConvGRUCell(3, 4, norm="layer")],
                         ids=["lstm_cell", "gru_cell", "gru_cell_ballas", "gru_cell_layer_norm"])
@pytest.mark.parametrize("given_state", [False, True])
def test_cell_twins_follow_autocast_like_the_fastvid_cells(make, given_state):
    """The cells' twins return the cells' dtypes under bf16 autocast (before: the ConvGRUCell twin returned
    fp32 where the cell returns bf16: its fp32 h promoted the update; 7.5e-3 apart)."""
    torch.manual_seed(0)
    cell = make()
    twin = fastvid.convert(cell, to="reference")
    x, h = torch.randn(2, 3, 5, 5), torch.randn(2, 4, 5, 5)
    state = None if not given_state else (h, torch.randn(2, 4, 5, 5)) if isinstance(cell, ConvLSTMCell) else h
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = flat_list(cell(x, state)), flat_list(twin(x, state))
    assert [t.dtype for t in ours] == [t.dtype for t in theirs]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2)


def flat_list(states):
    return [states] if isinstance(states, torch.Tensor) else [t for s in states for t in flat_list(s)]


TINY = dict(num_classes=4, cnn_widths=(4, 8), height=16, width=16)


@pytest.mark.parametrize("name, kwargs", [
    ("lrcn", dict(recurrent="convlstm", hidden_size=3)),
    ("convgru_rcn", dict(hidden_channels=3, stacked=True)),
    ("videolstm", dict(hidden_channels=3)),
])
def test_recurrent_models_convert_to_reference(name, kwargs, block_fastvid_ops):
    model = build(name, **TINY, **kwargs).eval()
    ref = fastvid.convert(model, to="reference")
    assert fastvid_layer_modules(model) and fastvid_layer_modules(ref) == []
    assert list(ref.state_dict()) == list(model.state_dict())
    clip = torch.randn(2, 3, 5, 16, 16)
    inputs = (clip, torch.randn(2, 2, 5, 16, 16)) if name == "videolstm" else (clip,)
    expected = model(*inputs)
    block_fastvid_ops()
    got = ref(*inputs)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_convert_leaves_depthwise_convs_the_kernels_cannot_run():
    """fastvid.convert must not turn a working model into a failing one: depthwise convs with a kernel
    beyond the kernels' limit (fastvid.ops.depthwise3d.MAX_KERNEL_SIZE along any of T, H, W) or
    non-floating weights stay nn.Conv3d; the others convert; the model's output is unchanged."""
    limit = 7  # kMaxKernel in csrc/depthwise3d, MAX_KERNEL in triton_kernels/depthwise3d.py
    model = nn.Sequential(nn.Conv3d(4, 4, (3, limit + 2, 3), padding=(1, 4, 1), groups=4),
                          nn.Conv3d(4, 8, limit, padding=limit // 2, groups=4),
                          nn.Conv3d(8, 8, (1, 1, limit + 4), padding=(0, 0, 5), groups=8))
    fast = fastvid.convert(model)
    assert [type(m) for m in fast] == [nn.Conv3d, DepthwiseConv3d, nn.Conv3d]
    x = torch.randn(1, 4, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))
