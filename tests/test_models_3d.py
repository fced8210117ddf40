"""3D CNN video models: I3D (+ inflation), R(2+1)D-18, X3D-S/M, nonlocal I3D-R50, SlowFast R50.

Every model builds at a tiny size and runs forward + backward; the models that run fastvid kernels
(X3D's depthwise convs, the nonlocal blocks) give the same outputs and gradients under the reference
backend, and the others (I3D, R(2+1)D, SlowFast: torch.nn layers only) are checked to run none, so
no test compares torch.nn with itself. Architecture facts come from the papers, the issue and the
published model tables (torchvision, pytorchvideo's model zoo); the expected numbers are written
here independently of the model code.
"""
import copy

import pytest
import torch
from torch import nn

import fastvid
from fastvid.models import build, inflate_2d_to_3d, list_models
from fastvid.nn import DepthwiseConv3d, NonLocalBlock
from _dispatch import spy_on_dispatch
from _tolerances import assert_full_precision

# name -> (builder kwargs for a tiny network, input shape [B, 3, T, H, W])
TINY = {
    "i3d": (dict(width_multiplier=0.125), (2, 3, 8, 32, 32)),
    "r2plus1d_18": (dict(base_channels=8), (2, 3, 4, 32, 32)),
    "x3d_s": (dict(widths=(8, 16, 24, 32), depths=(1, 2, 2, 2), head_width=32), (2, 3, 4, 32, 32)),
    "x3d_m": (dict(widths=(8, 16, 24, 32), depths=(2, 1, 1, 1), head_width=32), (2, 3, 4, 32, 32)),
    "nonlocal_i3d_r50": (dict(base_channels=8), (2, 3, 4, 32, 32)),
    "slowfast_r50": (dict(base_channels=16, stage_blocks=(1, 2, 2, 1)), (2, 3, 16, 32, 32)),
}
NUM_CLASSES = 7
WITH_FASTVID_KERNELS = ["nonlocal_i3d_r50", "x3d_m", "x3d_s"]


def _tiny(name, **overrides):
    kwargs, shape = TINY[name]
    model = build(name, num_classes=NUM_CLASSES, **{**kwargs, **overrides})
    return model, torch.randn(shape)


def _count(model):
    return sum(p.numel() for p in model.parameters())


def _randomise_nonlocal(model):
    """Non-zero nonlocal outputs (γ = 0 at init would make the blocks, and any parity check of
    them, trivial)."""
    for module in model.modules():
        if isinstance(module, NonLocalBlock):
            nn.init.uniform_(module.norm.weight, 0.5, 1.5)
            nn.init.uniform_(module.norm.bias, -0.1, 0.1)


def test_registered():
    assert set(TINY) <= set(list_models())


@pytest.mark.parametrize("name", sorted(TINY))
def test_forward_backward(name):
    model, video = _tiny(name)
    video.requires_grad_(True)
    out = model(video)
    assert out.shape == (video.shape[0], NUM_CLASSES)
    out.square().sum().backward()
    assert torch.isfinite(video.grad).all() and video.grad.abs().sum() > 0
    for pname, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), pname


@pytest.mark.parametrize("name", sorted(TINY))
def test_traces_with_torch_fx(name):
    """torch.fx.symbolic_trace (torchvision's feature extraction, FX quantization) of every 3D model gives the
    eager outputs bit for bit. I3D's size-fitted pooling windows and SlowFast's pathway split branch on the
    input, so they are recorded as single nodes (torch.fx.wrap): before, I3D raised TraceError and SlowFast took
    a traced video for a [slow, fast] pair (its shape check then raised)."""
    model, video = _tiny(name)
    model.eval()
    traced = torch.fx.symbolic_trace(model)
    other = torch.randn(1, *video.shape[1:])  # sizes are not frozen into the graph
    with torch.no_grad():
        for clip in (video, other):
            assert torch.equal(traced(clip), model(clip))


@pytest.mark.parametrize("name", sorted(set(TINY) - set(WITH_FASTVID_KERNELS)))
def test_torch_nn_models_run_no_fastvid_kernel(name, monkeypatch):
    """I3D, R(2+1)D and SlowFast are built from torch.nn layers only: a backend comparison would compare
    torch.nn with itself. Their facts are the paper tables below; if one starts to run a fastvid kernel,
    this fails and it belongs in WITH_FASTVID_KERNELS."""
    model, video = _tiny(name)
    calls = spy_on_dispatch(monkeypatch)
    model(video).sum().backward()
    assert calls == [], f"{name} now runs fastvid kernels ({sorted(set(calls))})"


@pytest.mark.parametrize("name", WITH_FASTVID_KERNELS)
def test_reference_backend_parity(name, monkeypatch):
    """Default backend (the kernels for DepthwiseConv3d / nonlocal attention) in float32 against the oracle:
    the same model in float64 on the pure-PyTorch reference backend; outputs, input and weight
    gradients. Eval mode: with batch statistics the tiny maps of these tiny networks (2-4 values per
    channel in res5) amplify float rounding by orders of magnitude, whichever backend runs."""
    model, video = _tiny(name)
    _randomise_nonlocal(model)
    model.eval()
    twin = copy.deepcopy(model).double()

    def run(net, x):
        x = x.clone().requires_grad_(True)
        out = net(x)
        out.square().sum().backward()
        return out, x.grad, {n: p.grad for n, p in net.named_parameters()}

    calls = spy_on_dispatch(monkeypatch)
    out, grad, grads = run(model, video)
    assert calls and set(calls) == {"cpu"}, f"the default backend ran {sorted(set(calls))}, not the kernels"
    calls.clear()
    with fastvid.backend("reference"):
        ref_out, ref_grad, ref_grads = run(twin, video.double())
    assert calls and set(calls) == {"reference"}
    # tests/_tolerances.py with 2^10 ulps: ~50 layers of float32 reductions, each adding its rounding;
    # weight gradients judged on the scale of all of them (some cancel to ~0)
    ulps = 2.0 ** 10
    assert_full_precision(out, ref_out, "output", ulps)
    assert_full_precision(grad, ref_grad, "input gradient", ulps)
    scale = max(g.abs().max().item() for g in ref_grads.values())
    for pname in grads:
        assert_full_precision(grads[pname], ref_grads[pname], f"grad {pname}", ulps, scale=scale)


# ------------------------------------------------------------------------------------------------ I3D

# Carreira & Zisserman (Inception-v1 widths): (1×1, 1×1→3³ reduce, 3³, 1×1→3³ reduce, 3³, pool→1×1).
PAPER_MIXED = {
    "mixed_3b": (64, 96, 128, 16, 32, 32), "mixed_3c": (128, 128, 192, 32, 96, 64),
    "mixed_4b": (192, 96, 208, 16, 48, 64), "mixed_4c": (160, 112, 224, 24, 64, 64),
    "mixed_4d": (128, 128, 256, 24, 64, 64), "mixed_4e": (112, 144, 288, 32, 64, 64),
    "mixed_4f": (256, 160, 320, 32, 128, 128), "mixed_5b": (256, 160, 320, 32, 128, 128),
    "mixed_5c": (384, 192, 384, 48, 128, 128),
}
# GoogLeNet's block outputs: the sums of the four branches.
PAPER_MIXED_OUT = {"mixed_3b": 256, "mixed_3c": 480, "mixed_4b": 512, "mixed_4c": 512, "mixed_4d": 512,
                   "mixed_4e": 528, "mixed_4f": 832, "mixed_5b": 832, "mixed_5c": 1024}


def _conv(unit):
    return unit[0]


def test_i3d_mixed_widths_and_shapes():
    model = build("i3d", num_classes=NUM_CLASSES).eval()
    feats = dict(model.features.named_children())
    assert [n for n in feats if n.startswith("mixed")] == list(PAPER_MIXED)
    outputs = {}
    for name in PAPER_MIXED:
        feats[name].register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o.shape))
    with torch.no_grad():
        model(torch.randn(1, 3, 16, 64, 64))
    previous = 192  # Conv3d_2c
    for name, (single, reduce_a, conv_a, reduce_b, conv_b, pool_proj) in PAPER_MIXED.items():
        block = feats[name]
        widths = (_conv(block.branch_1x1).out_channels, _conv(block.branch_3x3[0]).out_channels,
                  _conv(block.branch_3x3[1]).out_channels, _conv(block.branch_3x3_second[0]).out_channels,
                  _conv(block.branch_3x3_second[1]).out_channels, _conv(block.branch_pool[1]).out_channels)
        assert widths == (single, reduce_a, conv_a, reduce_b, conv_b, pool_proj), name
        assert _conv(block.branch_3x3[1]).kernel_size == (3, 3, 3)
        assert _conv(block.branch_3x3_second[1]).kernel_size == (3, 3, 3)
        assert _conv(block.branch_1x1).in_channels == previous, name
        assert outputs[name][1] == single + conv_a + conv_b + pool_proj == PAPER_MIXED_OUT[name], name
        previous = outputs[name][1]
    # T / 2 (conv1), / 2 (pool 3×3×3), / 2 (pool 2×2×2); H, W / 32.
    assert outputs["mixed_3c"][2:] == (8, 8, 8)
    assert outputs["mixed_4f"][2:] == (4, 4, 4)
    assert outputs["mixed_5c"][2:] == (2, 2, 2)
    stem = _conv(feats["conv3d_1a"])
    assert stem.kernel_size == (7, 7, 7) and stem.stride == (2, 2, 2) and stem.out_channels == 64
    assert _conv(feats["conv3d_2c"]).out_channels == 192


# ------------------------------------------------------------------------------------------ inflation

@pytest.mark.parametrize("frames", [1, 2, 3, 4, 5])
def test_i3d_runs_any_clip_length(frames):
    """The docstring's "any T >= 1 and H, W >= 32": pool_5a's 2x2x2 window shrinks along a dimension of one
    (before, T <= 4 at 32x32 left it one frame, and PyTorch's pooling raised "Output size is too small");
    a map of two or more per dimension pools exactly as nn.MaxPool3d(2, stride=2)."""
    model = build("i3d", num_classes=NUM_CLASSES, width_multiplier=0.125).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, frames, 32, 32)).shape == (1, NUM_CLASSES)
    pool = model.features.pool_5a
    for shape in [(1, 2, 3, 7, 6), (1, 2, 4, 2, 5)]:
        x = torch.randn(shape)
        assert torch.equal(pool(x), nn.MaxPool3d(2, stride=2)(x))
    x = torch.randn(1, 2, 1, 7, 6)
    assert torch.equal(pool(x), nn.MaxPool3d((1, 2, 2), stride=(1, 2, 2))(x))


def _small_2d_net():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 6, (3, 5), stride=(1, 2), padding=(1, 2), bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AvgPool2d(2), nn.Conv2d(6, 4, 1))
    with torch.no_grad():  # non-trivial BatchNorm statistics and affine parameters
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net.eval()


def _per_frame_2d(net2d, frame, frames):
    with torch.no_grad():
        return net2d(frame).unsqueeze(2).expand(-1, -1, frames, -1, -1)


def _static_video(frame, frames):
    return frame.unsqueeze(2).repeat(1, 1, frames, 1, 1)


def test_inflated_module_gives_2d_response_on_static_video():
    net2d = _small_2d_net()
    frame = torch.randn(2, 3, 16, 16)
    # No time padding: every output frame sees only real (identical) frames -> exactly the 2D output.
    net3d = inflate_2d_to_3d(net2d, time_kernel=3, time_padding=0).eval()
    with torch.no_grad():
        out = net3d(_static_video(frame, 9))
    assert out.shape[2] == 9 - 2 * 3  # three 3-frame convs, no padding
    torch.testing.assert_close(out, _per_frame_2d(net2d, frame, out.shape[2]), rtol=1e-5, atol=1e-5)
    # Default 'same' time padding: T kept; frames away from the zero-padded ends match the 2D output.
    net3d = inflate_2d_to_3d(net2d, time_kernel=3).eval()
    with torch.no_grad():
        out = net3d(_static_video(frame, 10))
    assert out.shape[2] == 10
    torch.testing.assert_close(out[:, :, 3:-3], _per_frame_2d(net2d, frame, 4), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[:, :, :1], _per_frame_2d(net2d, frame, 1), atol=1e-3)  # the padded end


def test_inflated_layers():
    net2d = _small_2d_net()
    net3d = inflate_2d_to_3d(net2d, time_kernel=lambda name, conv: 1 if conv.kernel_size == (1, 1) else 5)
    conv_a, conv_b, conv_c = (m for m in net3d if isinstance(m, nn.Conv3d))
    assert conv_a.kernel_size == (5, 3, 3) and conv_a.padding == (2, 1, 1)
    assert conv_b.kernel_size == (5, 3, 5) and conv_b.stride == (1, 1, 2) and conv_b.bias is None
    assert conv_c.kernel_size == (1, 1, 1)
    # The weights sum over time to the 2D weights; each slice is the 2D weight / kT.
    torch.testing.assert_close(conv_a.weight.sum(2), net2d[0].weight)
    torch.testing.assert_close(conv_a.weight[:, :, 4] * 5, net2d[0].weight)
    assert isinstance(net3d[1], nn.BatchNorm3d)
    torch.testing.assert_close(net3d[1].running_var, net2d[1].running_var)
    assert isinstance(net3d[3], nn.MaxPool3d) and net3d[3].kernel_size == (1, 2, 2)
    assert isinstance(net3d[7], nn.AvgPool3d) and net3d[7].kernel_size == (1, 2, 2)
    assert all(not isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) for m in net3d.modules())
    assert isinstance(next(iter(net2d)), nn.Conv2d)  # the input module is left alone
    single = inflate_2d_to_3d(nn.Conv2d(2, 3, 3), 3)
    assert isinstance(single, nn.Conv3d) and single.kernel_size == (3, 3, 3)


@pytest.mark.parametrize("affine", [True, False])
def test_inflated_module_keeps_dtype_and_device(affine):
    """A float64 2D network inflates to a float64 3D one that runs (its BatchNorms were built in float32:
    "mixed dtype" in forward, the float64 statistics rounded), and a BatchNorm without affine parameters
    lands on its statistics' device (meta here; it was built on the CPU and failed to load)."""
    net2d = _small_2d_net().double()
    if not affine:
        net2d[1] = nn.BatchNorm2d(8, affine=False).double().eval()
    net3d = inflate_2d_to_3d(net2d, time_kernel=3).eval()
    assert {p.dtype for p in net3d.state_dict().values() if p.is_floating_point()} == {torch.float64}
    assert torch.equal(net3d[1].running_mean, net2d[1].running_mean)
    video = _static_video(torch.randn(1, 3, 16, 16, dtype=torch.float64), 5)
    with torch.no_grad():
        assert net3d(video).dtype == torch.float64
    on_meta = inflate_2d_to_3d(copy.deepcopy(net2d).to("meta"), time_kernel=3)
    assert {p.device.type for p in on_meta.state_dict().values()} == {"meta"}


def test_inflated_state_dict_loads_into_3d_twin():
    net2d = _small_2d_net()
    twin = nn.Sequential(  # written by hand: the 3D network with the 2D one's parameter names
        nn.Conv3d(3, 8, 3, padding=(0, 1, 1)), nn.BatchNorm3d(8), nn.ReLU(), nn.MaxPool3d((1, 2, 2)),
        nn.Conv3d(8, 6, (3, 3, 5), stride=(1, 1, 2), padding=(0, 1, 2), bias=False), nn.BatchNorm3d(6), nn.ReLU(),
        nn.AvgPool3d((1, 2, 2)), nn.Conv3d(6, 4, (3, 1, 1))).eval()
    state = inflate_2d_to_3d(net2d.state_dict(), time_kernel=3)
    twin.load_state_dict(state)
    assert state["0.weight"].shape == (8, 3, 3, 3, 3)
    assert state["1.running_mean"] is not net2d.state_dict()["1.running_mean"]  # a copy
    frame = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        out = twin(_static_video(frame, 8))
    torch.testing.assert_close(out, _per_frame_2d(net2d, frame, 2), rtol=1e-5, atol=1e-5)


def test_inflate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="positive int"):
        inflate_2d_to_3d(nn.Conv2d(1, 1, 3), 0)
    with pytest.raises(TypeError):
        inflate_2d_to_3d([1, 2], 3)


# ------------------------------------------------------------------------------------------ R(2+1)D

def test_r2plus1d_18_parameter_count_matches_torchvision():
    assert _count(build("r2plus1d_18", num_classes=400)) == 31_505_325  # torchvision r2plus1d_18


def test_r2plus1d_structure():
    model = build("r2plus1d_18", num_classes=NUM_CLASSES)
    spatial, _, _, temporal = model.stem[0]
    assert (spatial.kernel_size, spatial.stride, spatial.out_channels) == ((1, 7, 7), (1, 2, 2), 45)
    assert (temporal.kernel_size, temporal.out_channels) == ((3, 1, 1), 64)
    assert [len(stage) for stage in model.stages] == [2, 2, 2, 2]  # 18 layers: 1 + 2·2·4 + 1
    # per_conv rule: each (2+1)D conv has at most, and within one M step of, the t×d×d conv's weights
    per_conv = build("r2plus1d_18", mid_channels_rule="per_conv")
    for module in per_conv.stages.modules():
        if isinstance(module, fastvid.nn.Conv2Plus1d):
            full = module.in_channels * module.out_channels * 27
            factorised = module[0].weight.numel() + module[3].weight.numel()
            assert full - (9 * module.in_channels + 3 * module.out_channels) < factorised <= full
    with torch.no_grad():
        feats = build("r2plus1d_18", base_channels=8).features(torch.randn(1, 3, 8, 32, 32))
    assert feats.shape == (1, 64, 1, 2, 2)  # T/8, H/16, W/16


# ------------------------------------------------------------------------------------------------ X3D

def test_x3d_parameter_count():
    params = _count(build("x3d_s", num_classes=400))
    assert abs(params - 3.8e6) <= 0.05 * 3.8e6  # Feichtenhofer 2020: X3D-S 3.8 M
    assert round(params / 1e6, 2) == 3.79  # pytorchvideo model zoo: X3D-S 3.79 M
    assert _count(build("x3d_m", num_classes=400)) == params  # X3D-M: same network, bigger input


def test_x3d_structure():
    model = build("x3d_s", num_classes=NUM_CLASSES)
    stem_xy, stem_t = model.stem[0], model.stem[1]
    assert (stem_xy.kernel_size, stem_xy.stride, stem_xy.out_channels) == ((1, 3, 3), (1, 2, 2), 24)
    assert isinstance(stem_t, DepthwiseConv3d) and stem_t.kernel_size == (5, 1, 1) and stem_t.channels == 24
    assert [len(stage) for stage in model.stages] == [3, 5, 11, 7]
    for stage, width in zip(model.stages, (24, 48, 96, 192)):
        for index, block in enumerate(stage):
            inner = int(2.25 * width)
            assert block.conv_a.out_channels == inner and block.conv_c.out_channels == width
            assert isinstance(block.conv_b, DepthwiseConv3d) and block.conv_b.kernel_size == (3, 3, 3)
            assert block.conv_b.stride == ((1, 2, 2) if index == 0 else (1, 1, 1))
            assert isinstance(block.se, nn.Identity) == (index % 2 == 1)  # SE on every other block
            assert isinstance(block.swish, nn.SiLU)
    head_convs = [m for m in model.head if isinstance(m, nn.Conv3d)]
    assert [(c.in_channels, c.out_channels) for c in head_convs] == [(192, 432), (432, 2048)]
    with torch.no_grad():
        feats = model.features(torch.randn(1, 3, 5, 64, 64))
    assert feats.shape == (1, 192, 5, 2, 2)  # T kept, H/32


def test_x3d_convert_to_reference():
    model, video = _tiny("x3d_s")
    model.eval()
    native = fastvid.convert(model, to="reference")
    assert not any(isinstance(m, DepthwiseConv3d) for m in native.modules())
    with torch.no_grad():
        torch.testing.assert_close(native(video), model(video), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------- nonlocal I3D-R50

# The issue's table: which blocks have a 3×1×1 first conv.
ISSUE_INFLATION = [[1, 1, 1], [1, 0, 1, 0], [1, 0, 1, 0, 1, 0], [0, 1, 0]]


def _stage_layout(stage):
    return ["NL" if isinstance(m, NonLocalBlock) else "B" for m in stage]


def test_nonlocal_i3d_layout():
    model = build("nonlocal_i3d_r50", num_classes=NUM_CLASSES, base_channels=8)
    conv1 = model.stem[0]
    assert conv1.kernel_size == (5, 7, 7) and conv1.stride == (1, 2, 2)
    assert model.stem[3].kernel_size == (1, 3, 3) and model.temporal_pool.kernel_size == (2, 1, 1)
    kernels = [[m.conv_a.kernel_size[0] for m in stage if not isinstance(m, NonLocalBlock)] for stage in model.stages]
    assert kernels == [[3 if flag else 1 for flag in stage] for stage in ISSUE_INFLATION]
    # Wang et al.: 5 blocks, 2 in res3 and 3 in res4, every other residual block (after the 2nd, 4th, ...).
    assert [_stage_layout(s) for s in model.stages] == [
        ["B"] * 3, ["B", "B", "NL", "B", "B", "NL"], ["B", "B", "NL", "B", "B", "NL", "B", "B", "NL"], ["B"] * 3]
    blocks = [m for m in model.modules() if isinstance(m, NonLocalBlock)]
    assert len(blocks) == 5
    for block in blocks:
        assert block.inter_channels == block.in_channels // 2 and block.mode == "embedded_gaussian"
        assert block.pool.kernel_size == (1, 2, 2)
        assert torch.count_nonzero(block.norm.weight) == 0  # γ = 0: identity at init
    assert [b.in_channels for b in blocks] == [8 * 8] * 2 + [8 * 16] * 3  # res3: 8C, res4: 16C
    with torch.no_grad():
        assert model.features(torch.randn(1, 3, 8, 64, 64)).shape == (1, 8 * 32, 4, 2, 2)  # T/2, H/32


def test_nonlocal_i3d_parameter_count():
    model = build("nonlocal_i3d_r50", num_classes=400)
    nonlocal_params = sum(_count(m) for m in model.modules() if isinstance(m, NonLocalBlock))
    # Without its nonlocal blocks it is the I3D R50 of pytorchvideo's model zoo (28.04 M parameters).
    assert round((_count(model) - nonlocal_params) / 1e6, 2) == 28.04


def test_nonlocal_i3d_at_init_equals_network_without_nonlocal_blocks():
    model, video = _tiny("nonlocal_i3d_r50")
    model.eval()
    stripped = copy.deepcopy(model)
    for stage in stripped.stages:
        for index, module in enumerate(stage):
            if isinstance(module, NonLocalBlock):
                stage[index] = nn.Identity()
    assert not any(isinstance(m, NonLocalBlock) for m in stripped.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(video), stripped(video), rtol=0, atol=0)
        _randomise_nonlocal(model)  # the control: trained (γ ≠ 0) blocks change the output
        assert not torch.allclose(model(video), stripped(video), atol=1e-4)


# ------------------------------------------------------------------------------------------- SlowFast

def _hook_shapes(model, video):
    """Shapes of every pathway tensor: stem outputs, each stage's input (after fusion) and output."""
    shapes = {}

    def save(key):
        return lambda m, i, o: shapes.__setitem__(key, tuple(o.shape))

    def save_input(key):
        return lambda m, i: shapes.__setitem__(key, tuple(i[0].shape))

    model.slow_stem.register_forward_hook(save("slow_stem"))
    model.fast_stem.register_forward_hook(save("fast_stem"))
    for i, (slow, fast) in enumerate(zip(model.slow_stages, model.fast_stages)):
        slow.register_forward_pre_hook(save_input(f"slow_in_res{i + 2}"))
        slow.register_forward_hook(save(f"slow_res{i + 2}"))
        fast.register_forward_hook(save(f"fast_res{i + 2}"))
    for i, lateral in enumerate(model.laterals):
        lateral.register_forward_hook(save(f"lateral{i}"))
    with torch.no_grad():
        model(video)
    return shapes


@pytest.mark.parametrize("alpha,lateral_kernel", [(8, 5), (4, 7)])
def test_slowfast_pathway_shapes(alpha, lateral_kernel):
    C, beta, T, S = 16, 1 / 8, 2, 64  # slow channels and frames; fast: C/8 channels, alpha·T frames
    Cf = 2  # β·C
    model = build("slowfast_r50", num_classes=NUM_CLASSES, alpha=alpha, beta=beta, base_channels=C,
                  stage_blocks=(1, 1, 1, 1))
    for lateral in model.laterals:
        conv = lateral[0]
        assert conv.kernel_size == (lateral_kernel, 1, 1) and conv.stride == (alpha, 1, 1)
    shapes = _hook_shapes(model, torch.randn(1, 3, alpha * T, S, S))
    assert shapes["slow_stem"] == (1, C, T, S // 4, S // 4)
    assert shapes["fast_stem"] == (1, Cf, alpha * T, S // 4, S // 4)
    assert shapes["lateral0"] == (1, 2 * Cf, T, S // 4, S // 4)  # 2βC channels at the slow frame rate
    assert shapes["slow_in_res2"] == (1, C + 2 * Cf, T, S // 4, S // 4)
    for stage, scale in zip((2, 3, 4, 5), (1, 2, 4, 8)):
        size = S // (4 * scale)
        assert shapes[f"slow_res{stage}"] == (1, 4 * C * scale, T, size, size)
        assert shapes[f"fast_res{stage}"] == (1, 4 * Cf * scale, alpha * T, size, size)
        if stage > 2:  # fused input: the previous slow output + the lateral from the fast one
            prev = S // (2 * scale)  # the previous stage's spatial size
            assert shapes[f"slow_in_res{stage}"] == (1, 2 * C * scale + 2 * 2 * Cf * scale, T, prev, prev)
    assert "lateral4" not in shapes  # no lateral after res5: the head concatenates the pooled pathways
    assert model.classifier[-1].in_features == 32 * C + 32 * Cf


def test_slowfast_temporal_kernels_and_channels():
    model = build("slowfast_r50", num_classes=NUM_CLASSES)  # α = 8, β = 1/8, C = 64
    assert model.slow_stem[0].kernel_size == (1, 7, 7) and model.slow_stem[0].out_channels == 64
    assert model.fast_stem[0].kernel_size == (5, 7, 7) and model.fast_stem[0].out_channels == 8
    slow_kernels = [{b.conv_a.kernel_size[0] for b in stage} for stage in model.slow_stages]
    fast_kernels = [{b.conv_a.kernel_size[0] for b in stage} for stage in model.fast_stages]
    assert slow_kernels == [{1}, {1}, {3}, {3}] and fast_kernels == [{3}] * 4  # seed table
    assert [len(s) for s in model.slow_stages] == [3, 4, 6, 3]
    assert [s[-1].conv_c.out_channels for s in model.slow_stages] == [256, 512, 1024, 2048]
    assert [s[-1].conv_c.out_channels for s in model.fast_stages] == [32, 64, 128, 256]
    assert [s[0].conv_a.in_channels for s in model.slow_stages] == [64 + 16, 256 + 64, 512 + 128, 1024 + 256]


def test_slowfast_parameter_counts():
    # pytorchvideo model zoo: SlowFast R50 4x16 (α = 8) 34.48 M, 8x8 (α = 4) 34.57 M parameters.
    assert round(_count(build("slowfast_r50", num_classes=400)) / 1e6, 2) == 34.48
    assert round(_count(build("slowfast_r50", num_classes=400, alpha=4)) / 1e6, 2) == 34.57


def test_slowfast_inputs():
    model, video = _tiny("slowfast_r50")
    model.eval()
    with torch.no_grad():
        out = model(video)
        torch.testing.assert_close(model([video[:, :, ::8], video]), out, rtol=0, atol=0)
    with pytest.raises(ValueError, match="multiple of alpha"):
        model(video[:, :, :12])
    with pytest.raises(ValueError, match="fast"):
        model([video[:, :, ::4], video])
    with pytest.raises(ValueError, match="lateral_kernel"):
        build("slowfast_r50", alpha=2)
    assert build("slowfast_r50", alpha=2, lateral_kernel=3, base_channels=16).laterals[0][0].kernel_size == (3, 1, 1)
