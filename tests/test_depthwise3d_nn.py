"""DepthwiseConv3d / SeparableConv3d / Conv2Plus1d modules and fastvid.convert."""
import copy

import pytest
import torch
import torch.nn.utils.prune
from torch import nn

import fastvid
from fastvid.nn import Conv2Plus1d, DepthwiseConv3d, SeparableConv3d, r2plus1d_mid_channels
from _tolerances import assert_full_precision



def _cl(x):
    return x.contiguous(memory_format=torch.channels_last_3d)


def _assert_matches_native(ours, native, x):
    """``ours`` on ``x`` against the fp64 ``native`` conv: the output, and the gradients of x, the weight and
    (where there is one) the bias for one random upstream gradient."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = ours(xa), native(xb)
    assert out.shape == expected.shape
    assert_full_precision(out, expected, "output")
    grad = torch.randn_like(expected)
    names = ["x", "weight"] + (["bias"] if native.bias is not None else [])
    ours_grads = torch.autograd.grad(out, [xa] + [getattr(ours, n) for n in names[1:]], grad)
    native_grads = torch.autograd.grad(expected, [xb] + [getattr(native, n) for n in names[1:]], grad)
    for name, a, b in zip(names, ours_grads, native_grads):
        assert_full_precision(a, b, f"grad {name}")


@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=(3, 5, 1), stride=(1, 2, 1), padding=(1, 2, 0)),
    dict(kernel_size=3, padding=2, dilation=2, channel_multiplier=2),
    dict(kernel_size=(5, 3, 3), stride=2, padding=0, bias=False),
])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
def test_depthwise_module_equals_grouped_conv3d(kwargs, layout):
    C, m = 6, kwargs.get("channel_multiplier", 1)
    native = nn.Conv3d(C, C * m, kwargs["kernel_size"], stride=kwargs.get("stride", 1),
                       padding=kwargs.get("padding", 0), dilation=kwargs.get("dilation", 1), groups=C,
                       bias=kwargs.get("bias", True)).double()
    ours = DepthwiseConv3d(C, **kwargs).double()
    ours.load_state_dict(native.state_dict())  # same names and shapes
    x = torch.randn(2, C, 7, 9, 8, dtype=torch.float64)
    _assert_matches_native(ours, native, _cl(x) if layout == "channels_last_3d" else x)


def test_numpy_integer_sizes_are_taken_as_nn_conv3d_takes_them():
    """Sizes computed with numpy are integers to nn.Conv3d; DepthwiseConv3d, the functional op, ConvLSTM and
    NonLocalBlock take them too and keep Python ints (before: "'numpy.int64' object is not iterable")."""
    np = pytest.importorskip("numpy")
    three, one = np.int64(3), np.int32(1)
    native = nn.Conv3d(4, 4, three, padding=(one, 1, one), groups=4).double()
    ours = DepthwiseConv3d(4, three, stride=one, padding=(one, 1, one)).double()
    assert ours.kernel_size == (3, 3, 3) and all(type(v) is int for v in ours.kernel_size + ours.padding + ours.stride)
    ours.load_state_dict(native.state_dict())
    x = torch.randn(2, 4, 3, 6, 5, dtype=torch.float64)
    _assert_matches_native(ours, native, x)
    torch.testing.assert_close(fastvid.ops.depthwise_conv3d(x, native.weight, native.bias, one, one), native(x))
    lstm = fastvid.nn.ConvLSTM(4, 4, three, dilation=one)
    assert lstm.kernel_size == [(3, 3)] and type(lstm.kernel_size[0][0]) is int
    assert lstm(torch.randn(2, 3, 4, 6, 5))[0].shape == (2, 3, 4, 6, 5)
    block = fastvid.nn.NonLocalBlock(4, pool_size=np.int64(2))
    assert block(torch.randn(2, 4, 3, 6, 6)).shape == (2, 4, 3, 6, 6)


@pytest.mark.parametrize("kwargs", [dict(kernel_size=3, padding=1), dict(kernel_size=(3, 1, 5), padding="same"),
                                    dict(kernel_size=3, padding="valid", stride=(1, 2, 2), channel_multiplier=2)])
def test_is_the_nn_conv3d_it_replaces(kwargs):
    """Code that walks a model for nn.Conv3d (initialisation loops, weight-decay groups, FLOP counters,
    fuse_conv_bn_eval) finds DepthwiseConv3d as the convolution it replaced: an nn.Conv3d with the same
    attributes and the same initialisation draws (before, isinstance loops skipped the converted layers)."""
    C, m = 4, kwargs.get("channel_multiplier", 1)
    conv_kwargs = {k: v for k, v in kwargs.items() if k != "channel_multiplier"}
    torch.manual_seed(0)
    native = nn.Conv3d(C, C * m, groups=C, **conv_kwargs)
    torch.manual_seed(0)
    ours = DepthwiseConv3d(C, **kwargs)
    assert isinstance(ours, nn.Conv3d)
    for name in ("in_channels", "out_channels", "groups", "kernel_size", "stride", "padding", "dilation", "transposed",
                 "output_padding", "padding_mode"):
        assert getattr(ours, name) == getattr(native, name), name
    assert list(ours._reversed_padding_repeated_twice) == list(native._reversed_padding_repeated_twice)
    assert torch.equal(ours.weight, native.weight) and torch.equal(ours.bias, native.bias)

    model = nn.Sequential(ours, nn.BatchNorm3d(C * m)).eval()
    for module in model.modules():  # a user's initialisation loop
        if isinstance(module, nn.Conv3d):
            nn.init.normal_(module.weight, std=0.5)
    assert not torch.equal(ours.weight, native.weight)
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        fused = torch.nn.utils.fusion.fuse_conv_bn_eval(ours, model[1])
        assert type(fused) is DepthwiseConv3d
        x = torch.randn(2, C, 5, 6, 7)
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)
    assert fastvid.convert(model, inplace=True)[0] is ours  # already converted: left as it is


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("kwargs", [dict(kernel_size=3, padding=1), dict(kernel_size=(3, 2, 3), padding="same"),
                                    dict(kernel_size=3, padding=(1, 2, 0), stride=2, channel_multiplier=2)])
def test_padding_modes_as_nn_conv3d(mode, kwargs):
    """nn.Conv3d's padding_mode, given to the constructor or set on the module afterwards (code that walks a
    model for nn.Conv3d may set it): the input padded so, then convolved by the kernels unpadded. Before,
    DepthwiseConv3d zero-padded whatever padding_mode said (1.1 from nn.Conv3d's output, silently)."""
    C, m = 3, kwargs.get("channel_multiplier", 1)
    native = nn.Conv3d(C, C * m, groups=C, padding_mode=mode,
                       **{k: v for k, v in kwargs.items() if k != "channel_multiplier"}).double()
    given = DepthwiseConv3d(C, padding_mode=mode, **kwargs).double()
    set_after = DepthwiseConv3d(C, **kwargs).double()
    set_after.padding_mode = mode
    x = torch.randn(2, C, 5, 6, 7, dtype=torch.float64)
    for ours in (given, set_after):
        ours.load_state_dict(native.state_dict())
        _assert_matches_native(ours, native, x)
    assert f"padding_mode='{mode}'" in repr(given)


def test_conversions_into_a_subclass_keep_its_own_state():
    """from_conv3d / from_concat_conv called on a user's subclass with state of its own: that state keeps its
    initial values (the conversions build fastvid's own classes without initialising them, since they set all
    of their state; a subclass is built by its constructor)."""
    class Scaled(DepthwiseConv3d):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.gain = nn.Parameter(torch.full((self.out_channels,), 2.0))

        def forward(self, x):
            return super().forward(x) * self.gain.view(-1, 1, 1, 1)

    conv = nn.Conv3d(4, 4, 3, padding=1, groups=4)
    converted = Scaled.from_conv3d(conv)
    assert torch.equal(converted.gain, torch.full((4,), 2.0))
    x = torch.randn(2, 4, 3, 5, 5)
    torch.testing.assert_close(converted(x), 2 * conv(x), rtol=1e-5, atol=1e-5)

    class Tempered(fastvid.nn.ConvLSTMCell):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_buffer("temperature", torch.tensor(1.5))

    cell = Tempered.from_concat_conv(nn.Conv2d(3 + 2, 8, 3, padding=1), hidden_channels=2)
    assert cell.temperature.item() == 1.5


def test_modules_pickled_before_it_was_an_nn_conv3d_load():
    """A DepthwiseConv3d pickled by an earlier fastvid (an nn.Module without nn.Conv3d's attributes) unpickles
    into the subclass with those attributes filled in, and runs."""
    for padding in (1, "same"):
        module = DepthwiseConv3d(3, (3, 3, 5), padding=padding, channel_multiplier=2)
        state = dict(module.__dict__)
        for name in ("in_channels", "out_channels", "groups", "transposed", "output_padding", "padding_mode",
                     "_reversed_padding_repeated_twice"):
            del state[name]  # what the earlier class kept: channels, channel_multiplier, sizes, parameters
        old = DepthwiseConv3d.__new__(DepthwiseConv3d)
        old.__setstate__(state)
        for name in ("in_channels", "out_channels", "groups", "transposed", "output_padding", "padding_mode"):
            assert getattr(old, name) == getattr(module, name), name
        assert list(old._reversed_padding_repeated_twice) == list(module._reversed_padding_repeated_twice)
        x = torch.randn(1, 3, 4, 5, 6)
        assert torch.equal(old(x), module(x))


def test_state_dict_loads_both_ways():
    native = nn.Conv3d(4, 8, 3, padding=1, groups=4)
    ours = DepthwiseConv3d(4, 3, padding=1, channel_multiplier=2)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in native.state_dict().items()}
    native.load_state_dict(ours.state_dict())
    x = torch.randn(1, 4, 3, 5, 5)
    torch.testing.assert_close(native(x), ours(x), rtol=1e-5, atol=1e-5)


def test_default_init_matches_conv3d_statistics():
    """Initialised like nn.Conv3d: weights within U(-1/sqrt(fan_in), 1/sqrt(fan_in)) bound."""
    ours = DepthwiseConv3d(64, 3)
    bound = 1 / 27 ** 0.5
    assert ours.weight.abs().max() <= bound + 1e-6 and ours.weight.std() > bound / 3


def test_separable_conv3d_is_depthwise_then_pointwise():
    sep = SeparableConv3d(4, 6, 3, padding=1, norm=nn.BatchNorm3d(4), activation=nn.ReLU()).eval()
    x = torch.randn(2, 4, 3, 6, 6)
    ref_dw = nn.Conv3d(4, 4, 3, padding=1, groups=4)
    ref_dw.load_state_dict(sep.depthwise.state_dict())
    expected = sep.pointwise(torch.relu(sep.norm(ref_dw(x))))
    torch.testing.assert_close(sep(x), expected, rtol=1e-5, atol=1e-5)
    assert sep(x).shape == (2, 6, 3, 6, 6)


@pytest.mark.parametrize("n_in,n_out,expected", [(64, 64, 144), (3, 64, 23), (128, 256, 460)])
def test_r2plus1d_mid_channels_formula(n_in, n_out, expected):
    # floor(t d^2 N_in N_out / (d^2 N_in + t N_out)) with t = d = 3, computed by hand
    assert r2plus1d_mid_channels(n_in, n_out, 3) == expected


def test_conv2plus1d_structure_and_parameter_budget():
    block = Conv2Plus1d(64, 64, 3, stride=2)
    spatial, norm, relu, temporal = block
    assert spatial.kernel_size == (1, 3, 3) and spatial.stride == (1, 2, 2) and spatial.out_channels == 144
    assert temporal.kernel_size == (3, 1, 1) and temporal.stride == (2, 1, 1)
    conv_params = spatial.weight.numel() + temporal.weight.numel()
    full = 64 * 64 * 27
    assert full - 64 * 9 <= conv_params <= full  # matches the t x d x d conv up to the floor in M
    y = block(torch.randn(1, 64, 8, 16, 16))
    assert y.shape == (1, 64, 4, 8, 8)


class _SqueezeExcite(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv3d(c, c // 4, 1), nn.Conv3d(c // 4, c, 1)

    def forward(self, x):
        s = x.mean((2, 3, 4), keepdim=True)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))


def _x3d_block(c_in=8, inner=18):
    """X3D-style bottleneck: pointwise -> channel-wise 3x3x3 -> SE -> swish -> pointwise."""
    return nn.Sequential(
        nn.Conv3d(c_in, inner, 1, bias=False), nn.BatchNorm3d(inner), nn.ReLU(),
        nn.Conv3d(inner, inner, 3, padding=1, groups=inner, bias=False), nn.BatchNorm3d(inner),
        _SqueezeExcite(inner), nn.SiLU(),
        nn.Conv3d(inner, c_in, 1, bias=False), nn.BatchNorm3d(c_in),
    ).eval()


def test_convert_replaces_only_depthwise_convs_and_keeps_outputs():
    model = _x3d_block()
    converted = fastvid.convert(model)
    kinds = [type(m) for m in converted]
    assert kinds[3] is DepthwiseConv3d
    assert sum(isinstance(m, DepthwiseConv3d) for m in converted.modules()) == 1
    assert type(converted[0]) is nn.Conv3d and type(converted[7]) is nn.Conv3d  # dense convs untouched
    assert type(model[3]) is nn.Conv3d  # inplace=False leaves the original alone
    x = torch.randn(2, 8, 4, 10, 10)
    torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(converted[3].weight, model[3].weight)


def test_convert_inplace_and_top_level_module():
    model = _x3d_block()
    same = fastvid.convert(model, inplace=True)
    assert same is model and type(model[3]) is DepthwiseConv3d
    single = nn.Conv3d(5, 5, 3, padding=1, groups=5)
    out = fastvid.convert(single)
    assert type(out) is DepthwiseConv3d and type(single) is nn.Conv3d


def test_module_takes_factory_arguments_and_reads_like_a_depthwise_conv3d():
    """device= / dtype= as nn.Conv3d takes them (a model built on the meta device raised TypeError), and
    the attributes code written for a depthwise nn.Conv3d reads (groups, padding_mode: AttributeError)."""
    meta = DepthwiseConv3d(4, 3, device="meta")
    assert meta.weight.is_meta and meta.bias.is_meta
    double = DepthwiseConv3d(4, 3, dtype=torch.float64, channel_multiplier=2)
    assert double.weight.dtype == double.bias.dtype == torch.float64 and double.weight.shape == (8, 1, 3, 3, 3)
    native = nn.Conv3d(4, 8, 3, groups=4)
    assert (double.groups, double.padding_mode) == (native.groups, native.padding_mode) == (4, "zeros")


def test_a_kernel_above_the_limit_is_refused_when_built():
    """Kernel sizes above the kernels' limit (7) were accepted by the constructor and failed at the first call."""
    with pytest.raises(ValueError, match=r"kernel_size must be at most 7 along each dim .* got \(8, 8, 8\)"):
        DepthwiseConv3d(2, 8)
    DepthwiseConv3d(2, (7, 1, 7))


def test_r2plus1d_middle_width_is_at_least_one():
    """Tran et al.'s M (144 for 64 -> 64 channels, 3x3x3) is 0 for a few channels and a 1-wide kernel: the
    block had a 0-channel middle conv and failed at its first call with PyTorch's weight-size error."""
    assert r2plus1d_mid_channels(64, 64, 3) == 144
    assert r2plus1d_mid_channels(1, 1, (3, 1, 1)) == 1
    block = Conv2Plus1d(1, 1, kernel_size=(3, 1, 1))
    assert block(torch.randn(1, 1, 4, 4, 4)).shape == (1, 1, 4, 4, 4)


def test_convert_keeps_a_shared_module_one_module():
    """A conv registered under two names of one parent (named_children() lists it once) kept the native
    layer under the second name; one in two parents became two modules. Now each is one replacement,
    wherever it is registered, and the parameters stay tied."""
    dw = nn.Conv3d(4, 4, 3, padding=1, groups=4)
    model = nn.Sequential(nn.Sequential(dw, nn.ReLU(), dw), nn.Sequential(dw))
    model.add_module("again", model[0])
    converted = fastvid.convert(model)
    replacements = {id(m) for m in (converted[0][0], converted[0][2], converted[1][0], converted.again[0])}
    assert len(replacements) == 1 and type(converted[0][0]) is DepthwiseConv3d
    assert converted.again is converted[0]
    x = torch.randn(1, 4, 3, 6, 6)
    torch.testing.assert_close(converted[0](x), model[0](x), rtol=1e-5, atol=1e-5)


def test_convert_leaves_the_global_random_stream_alone():
    """The replacements' constructors draw initial weights before taking the originals': a seeded run
    with a convert in it drew different dropout masks and data orders than without."""
    model = _x3d_block()
    torch.manual_seed(0)
    fastvid.convert(model)
    after_convert = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(after_convert, torch.rand(4))


@pytest.mark.parametrize("kernel_size,dilation,padding,expected", [
    (3, 1, "same", (1, 1, 1)), ((1, 3, 5), 1, "same", (0, 1, 2)), (3, (1, 2, 3), "same", (1, 2, 3)),
    ((2, 3, 3), (2, 1, 1), "same", (1, 1, 1)), (3, 1, "valid", (0, 0, 0)), ((2, 4, 3), 2, "valid", (0, 0, 0))])
def test_convert_takes_string_paddings(kernel_size, dilation, padding, expected):
    """padding='valid', and 'same' where its total d·(k - 1) is even in every dimension, convert with the
    numbers PyTorch pads; output and gradients match the fp64 native conv."""
    torch.manual_seed(0)
    native = nn.Conv3d(6, 12, kernel_size, padding=padding, dilation=dilation, groups=6).double()
    converted = fastvid.convert(native)
    assert type(converted) is DepthwiseConv3d and converted.padding == expected
    _assert_matches_native(converted, native, torch.randn(2, 6, 7, 9, 11, dtype=torch.float64))


@pytest.mark.parametrize("channels", [2, 4, 16])
def test_input_with_other_channels_raises_as_nn_conv3d(channels):
    """nn.Conv3d(8, 8, groups=8) refuses an input of 2, 4 or 16 channels; its drop-in ran 2 and 4 as channel
    multipliers 4 and 2 (F.conv3d(groups=2)'s numbers, no error)."""
    native = nn.Conv3d(8, 8, 3, padding=1, groups=8)
    x = torch.randn(1, channels, 4, 8, 8)
    with pytest.raises(RuntimeError, match="expected input.*to have 8 channels"):
        native(x)
    for module in (fastvid.convert(native), DepthwiseConv3d(8, 3, padding=1)):
        with pytest.raises(ValueError, match=rf"DepthwiseConv3d: expected input \[B, 8, T, H, W\] or \[8, T, H, W\], "
                                             rf"got \(1, {channels}, "):
            module(x)
        with pytest.raises(ValueError, match=rf"got \({channels}, 4, 8, 8\) \({channels} channels instead of 8\)"):
            module(x[0])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
@pytest.mark.parametrize("kernel_size,dilation,padding", [
    (3, 1, "same"), ((2, 4, 3), 1, "same"), (4, 2, "same"), ((2, 3, 3), (1, 1, 2), "same"), ((1, 3, 5), 1, "valid")])
def test_string_padding_as_nn_conv3d(kernel_size, dilation, padding, layout):
    """DepthwiseConv3d (and ops.depthwise_conv3d) take padding='same' / 'valid' as nn.Conv3d does, an odd
    'same' total included (its extra element after, as PyTorch pads it); before, the string was read as
    a tuple of its letters. Output and gradients against the fp64 native conv."""
    torch.manual_seed(0)
    native = nn.Conv3d(4, 8, kernel_size, padding=padding, dilation=dilation, groups=4).double()
    ours = DepthwiseConv3d(4, kernel_size, padding=padding, dilation=dilation, channel_multiplier=2).double()
    ours.load_state_dict(native.state_dict())
    assert ours.padding == padding
    x = torch.randn(2, 4, 5, 9, 11, dtype=torch.float64)
    _assert_matches_native(ours, native, _cl(x) if layout == "channels_last_3d" else x)
    assert fastvid.convert(ours, to="reference").padding == padding


@pytest.mark.parametrize("kwargs,message", [
    (dict(padding="full"), "padding must be 'same', 'valid', one int or a \\(T, H, W\\) triple, got 'full'"),
    (dict(padding="same", stride=2), "padding='same' is not supported for strided convolutions")])
def test_bad_string_padding_says_why(kwargs, message):
    with pytest.raises(ValueError, match="DepthwiseConv3d: " + message):
        DepthwiseConv3d(4, 3, **kwargs)
    with pytest.raises(ValueError, match="fastvid.depthwise_conv3d: " + message):
        fastvid.ops.depthwise_conv3d(torch.randn(1, 4, 3, 3, 3), torch.randn(4, 1, 3, 3, 3), **kwargs)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
def test_unbatched_input_as_nn_conv3d(layout):
    """nn.Conv3d takes an unbatched [C, T, H, W] input; so does its drop-in (before: 'input must be [B, C, T,
    H, W]' after fastvid.convert). Output and gradients against the fp64 native conv."""
    torch.manual_seed(0)
    native = nn.Conv3d(6, 12, 3, padding=1, groups=6).double()
    ours = fastvid.convert(native)
    x = torch.randn(1, 6, 4, 5, 7, dtype=torch.float64)
    x = (_cl(x) if layout == "channels_last_3d" else x)[0]
    assert native(x).shape == (12, 4, 5, 7)
    _assert_matches_native(ours, native, x)
    # the functional op too, as F.conv3d (before: 'input must be [B, C, T, H, W]')
    functional = lambda t: fastvid.ops.depthwise_conv3d(t, ours.weight, ours.bias, padding=1)  # noqa: E731
    functional.weight, functional.bias = ours.weight, ours.bias
    _assert_matches_native(functional, native, x)


def test_convert_keeps_the_hooks_of_replaced_modules():
    """Forward pre-hooks (with kwargs), forward hooks and full backward hooks registered on a converted conv
    run on its replacement, both ways (to fastvid and back to reference), with the replacement's tensors;
    the handles still remove them."""
    model = nn.Sequential(nn.Conv3d(4, 4, 3, padding=1, groups=4), nn.ReLU())
    calls = []
    handles = [
        model[0].register_forward_pre_hook(lambda m, args, kwargs: calls.append(("pre", type(m))), with_kwargs=True),
        model[0].register_forward_hook(lambda m, args, out: calls.append(("forward", type(m), out.detach().clone()))),
        model[0].register_full_backward_hook(lambda m, gin, gout: calls.append(("backward", type(m), gin[0].clone()))),
    ]
    x = torch.randn(2, 4, 3, 5, 5)
    for target, kind in (("fastvid", DepthwiseConv3d), ("reference", nn.Conv3d)):
        model = fastvid.convert(model, inplace=True, to=target)
        assert type(model[0]) is kind
        calls.clear()
        xx = x.clone().requires_grad_()
        out = model(xx)
        out.sum().backward()
        assert [c[:2] for c in calls] == [("pre", kind), ("forward", kind), ("backward", kind)]
        torch.testing.assert_close(calls[1][2], model[0](x), rtol=0, atol=0)
        torch.testing.assert_close(calls[2][2], xx.grad, rtol=0, atol=0)  # grad of the conv's input = x's
    for handle in handles:
        handle.remove()
    calls.clear()
    model(x.requires_grad_()).sum().backward()
    assert calls == []


def test_convert_skips_what_it_cannot_reproduce():
    model = nn.Sequential(nn.Conv3d(4, 4, (3, 2, 3), padding="same", groups=4),  # H padded 0 before, 1 after
                          nn.Conv3d(4, 4, 3, padding=1, groups=4, padding_mode="reflect"),
                          nn.Conv3d(4, 8, 3, groups=2))
    converted = fastvid.convert(copy.deepcopy(model))
    assert all(type(m) is nn.Conv3d for m in converted)


def test_convert_copies_a_pruned_model():
    """fastvid.convert(model) (inplace=False) deep-copies the model first; a pruned module's weight is a
    non-leaf attribute, which copy.deepcopy refuses, so any pruned model raised PyTorch's "Only Tensors
    created explicitly by the user ... deepcopy protocol". Now the copy converts what it can (the pruned
    conv stays native with its warning), computes the original's function, keeps its own live pruning
    (its weight follows its weight_orig), and the original is untouched."""
    model = nn.Sequential(nn.Conv3d(4, 4, 3, padding=1, groups=4), nn.Conv3d(4, 4, 3, padding=1, groups=4),
                          nn.Flatten(), nn.Linear(4 * 3 * 5 * 5, 2))
    torch.nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.5)
    torch.nn.utils.prune.l1_unstructured(model[3], "weight", amount=0.5)
    x = torch.randn(1, 4, 3, 5, 5)
    expected = model(x)
    with pytest.warns(RuntimeWarning, match=r"0 \(Conv3d\) left unconverted: .*recomputed each call"):
        converted = fastvid.convert(model)
    assert [type(m) for m in converted] == [nn.Conv3d, DepthwiseConv3d, nn.Flatten, nn.Linear]
    assert [type(m) for m in model] == [nn.Conv3d, nn.Conv3d, nn.Flatten, nn.Linear]
    torch.testing.assert_close(converted(x), expected)
    with torch.no_grad():
        converted[3].weight_orig.mul_(2)
    assert converted[3].weight_orig.data_ptr() != model[3].weight_orig.data_ptr()
    converted(x)  # the pruning hook recomputes weight = weight_orig * weight_mask
    torch.testing.assert_close(converted[3].weight, 2 * model[3].weight)


def test_convert_copies_no_other_computed_attribute():
    """Only the tensors a pruning / norm hook recomputes are copied detached: another non-leaf attribute (a
    tied view of a weight) would become a frozen copy, so the copy still fails as copy.deepcopy does."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(4, 4, 3, padding=1, groups=4)
            self.flipped = self.conv.weight.flip(2)

        def forward(self, x):
            return self.conv(x) + nn.functional.conv3d(x, self.flipped, padding=1, groups=4)

    with pytest.raises(RuntimeError, match="Only Tensors created explicitly by the user"):
        fastvid.convert(Tied())


def test_convert_leaves_a_pruned_conv_native_and_says_why():
    """A pruned depthwise conv's weight is recomputed by a hook each call (weight_orig · weight_mask): it stays
    native with a warning saying so, and the model still computes the pruned function."""
    model = nn.Sequential(nn.Conv3d(4, 4, 3, padding=1, groups=4))
    torch.nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.5)
    x = torch.randn(1, 4, 3, 5, 5)
    with pytest.warns(RuntimeWarning, match=r"0 \(Conv3d\) left unconverted: .*its weight is recomputed each call "
                                            r"\(by torch.nn.utils.prune"):
        converted = fastvid.convert(model, inplace=True)
    assert type(converted[0]) is nn.Conv3d
    torch.testing.assert_close(converted(x), nn.functional.conv3d(x, model[0].weight_orig * model[0].weight_mask,
                                                                  model[0].bias, padding=1, groups=4))
    torch.nn.utils.prune.remove(model[0], "weight")  # the hook removed: now it converts
    assert type(fastvid.convert(model)[0]) is DepthwiseConv3d


def test_convert_leaves_a_parametrized_conv_native_and_says_why():
    """The same for a parametrization (weight_norm): before, such a conv stayed native without a word."""
    model = nn.Sequential(nn.Conv3d(4, 4, 3, padding=1, groups=4))
    nn.utils.parametrizations.weight_norm(model[0], "weight")
    x = torch.randn(1, 4, 3, 5, 5)
    expected = model(x)
    with pytest.warns(RuntimeWarning, match=r"0 \(ParametrizedConv3d\) left unconverted: .*its weight is "
                                            r"recomputed each call"):
        converted = fastvid.convert(model)
    assert type(converted[0]) is type(model[0])
    torch.testing.assert_close(converted(x), expected, rtol=0, atol=0)
    nn.utils.parametrize.remove_parametrizations(model[0], "weight")
    assert type(fastvid.convert(model)[0]) is DepthwiseConv3d


def test_convert_to_reference_of_a_parametrized_depthwise_conv_says_why():
    """The way back: a DepthwiseConv3d weight_norm'ed after converting cannot give its twin a shared parameter;
    to='reference' (which must convert every layer) raises saying why, instead of nn.Module's "cannot assign
    'torch.FloatTensor' as parameter 'weight'"."""
    model = nn.Sequential(DepthwiseConv3d(4, 3, padding=1))
    nn.utils.parametrizations.weight_norm(model[0], "weight")
    with pytest.raises(ValueError, match=r"ParametrizedDepthwiseConv3d: its weight is recomputed each call"):
        fastvid.convert(model, to="reference")
    nn.utils.parametrize.remove_parametrizations(model[0], "weight")
    assert type(fastvid.convert(model, to="reference")[0]) is nn.Conv3d


def test_from_conv3d_leaves_the_global_random_state_alone():
    """from_conv3d shares the conv's parameters: the initialisation it replaces must not move the global
    generator (fastvid.convert already kept it; the public classmethod drew from it)."""
    conv = nn.Conv3d(4, 8, 3, padding=1, groups=4)
    before = torch.get_rng_state()
    module = DepthwiseConv3d.from_conv3d(conv)
    assert torch.equal(torch.get_rng_state(), before) and module.weight is conv.weight


def test_converting_does_not_rewind_another_threads_random_numbers():
    """While one thread converts models (an inference server loading one), another draws random numbers
    (augmentation, dropout): it never gets the same numbers twice. Before, the conversions saved and restored
    the process-wide generator around their initialisation (torch.random.fork_rng), rewinding the other
    thread's draws made meanwhile (thousands of repeated draws in half a second); now they draw nothing."""
    import threading
    import time
    model = nn.Sequential(nn.Conv3d(8, 8, 3, padding=1, groups=8), nn.ReLU())
    draws, stop = [], threading.Event()

    def draw():
        while not stop.is_set():
            draws.append(tuple(torch.rand(4).tolist()))

    drawer = threading.Thread(target=draw)
    drawer.start()
    try:
        end = time.monotonic() + 0.5
        converted = 0
        while time.monotonic() < end or converted < 20:
            for target in ("fastvid", "reference"):
                fastvid.convert(fastvid.convert(model), to=target)
            converted += 1
    finally:
        stop.set()
        drawer.join()
    assert len(draws) > 100
    assert len(set(draws)) == len(draws), f"{len(draws) - len(set(draws))} of {len(draws)} draws repeated"
