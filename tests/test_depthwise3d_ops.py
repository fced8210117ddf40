"""Depthwise 3D conv: torch.ops.fastvid.depthwise_conv3d(_backward) and fastvid.ops.depthwise_conv3d
against F.conv3d(groups=C) (fastvid.reference.depthwise3d).

The oracle is F.conv3d run in float64 on the same (rounded) inputs and upstream gradients; bf16 and
fp16 are judged with the flash-attention rule of tests/_tolerances.py, whose yardstick is that fp64
oracle rounded once to the dtype (the kernels accumulate in fp32 and round once at the store), never
PyTorch's own bf16 run (its channels_last_3d weight gradient can be garbage: 6e36 where 0 is right).
"""
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from _isa import cpu_isa  # noqa: F401 (fixture: every CPU ISA path)
from conftest import requires_cuda

import fastvid
from fastvid.ops import depthwise_conv3d
from fastvid.reference import depthwise3d as ref
from _tolerances import assert_full_precision, assert_low_precision, full_precision_tol

pytestmark = pytest.mark.skipif(not fastvid.info()["cpu_kernels"], reason="fastvid._C is not built")

OPS = torch.ops.fastvid


@dataclass(frozen=True)
class Config:
    channels: int
    multiplier: int
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    shape: tuple  # (B, T, H, W)
    bias: bool = True

    def id(self):
        return (f"C{self.channels}m{self.multiplier}_k{'x'.join(map(str, self.kernel))}"
                f"_s{''.join(map(str, self.stride))}_p{''.join(map(str, self.padding))}"
                f"_d{''.join(map(str, self.dilation))}_{'x'.join(map(str, self.shape))}"
                f"{'' if self.bias else '_nobias'}")


CONFIGS = [
    Config(3, 1, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), (2, 5, 7, 6)),
    Config(16, 1, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), (2, 4, 6, 5), bias=False),
    Config(4, 2, (1, 3, 5), (1, 2, 2), (0, 1, 2), (1, 1, 1), (1, 4, 9, 11)),
    Config(5, 1, (3, 3, 3), (2, 2, 2), (0, 0, 0), (1, 2, 1), (2, 7, 9, 8), bias=False),
    Config(2, 3, (2, 1, 3), (2, 1, 3), (1, 0, 1), (2, 1, 2), (1, 6, 5, 10)),
    Config(8, 1, (7, 7, 7), (1, 1, 1), (3, 3, 3), (1, 1, 1), (1, 7, 8, 9)),
    Config(6, 1, (5, 3, 7), (1, 3, 1), (2, 0, 0), (1, 1, 1), (1, 5, 7, 7)),
    Config(1, 2, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), (1, 3, 4, 5)),
    # wide rows: the CPU kernel's 8-position sweep over interior W positions (forward, and the input
    # gradient when the W stride is 1), with a channel tail that is not a whole vector
    Config(20, 1, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), (1, 3, 4, 21)),
    Config(20, 1, (1, 3, 3), (1, 1, 2), (0, 1, 2), (1, 1, 2), (1, 3, 4, 37)),
    Config(35, 1, (3, 1, 5), (1, 2, 1), (1, 0, 2), (1, 1, 2), (2, 4, 5, 30), bias=False),
    Config(70, 1, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), (1, 2, 3, 12)),  # 64-channel register blocks
    # NCDHW kernels (m == 1, contiguous/non-contiguous inputs), vectorised along W: rows wider than two
    # vectors with a partial last vector, 6+ rows (groups of 4 rows plus a remainder), W stride 2 and 3
    # (stride phases), dilation, padding wider than the kernel reach, a W narrower than the stride
    Config(3, 1, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), (2, 3, 6, 45)),
    Config(2, 1, (3, 5, 3), (1, 2, 2), (1, 2, 1), (1, 1, 1), (1, 4, 11, 37)),
    Config(2, 1, (2, 3, 5), (2, 3, 3), (1, 1, 2), (2, 2, 1), (1, 6, 13, 35)),
    Config(3, 1, (1, 3, 7), (1, 1, 1), (0, 4, 5), (1, 1, 2), (1, 2, 5, 19)),
    Config(2, 1, (3, 3, 3), (1, 2, 4), (2, 1, 1), (1, 1, 1), (1, 3, 9, 3)),
    # all strides 1: the input gradient is the forward with the flipped kernel and padding
    # dilation·(k - 1) - padding (flipped_geometry): padding below the kernel reach (so the flipped
    # forward pads more than the original), H and W dilation, T padding equal to the reach, kW = 1
    # (a padding above the reach, where it does not apply, is CONFIGS[15])
    Config(4, 1, (3, 5, 3), (1, 1, 1), (0, 0, 2), (1, 1, 2), (2, 7, 9, 13)),
    Config(3, 1, (3, 3, 1), (1, 1, 1), (2, 1, 0), (1, 2, 1), (1, 6, 10, 17), bias=False),
    Config(2, 1, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), (1, 9, 14, 28)),
    # NCDHW forward edges: a T stride and dilation with kT = 5, W narrower than a vector without W
    # padding; T = 1 (no T neighbours), W of two 32-lane vectors plus a tail; kT = 1 with a W stride
    Config(3, 1, (5, 3, 3), (2, 1, 1), (2, 1, 0), (2, 1, 1), (1, 9, 6, 5)),
    Config(2, 1, (3, 3, 3), (1, 1, 1), (1, 0, 1), (1, 1, 1), (2, 1, 5, 70)),
    Config(2, 1, (1, 3, 3), (1, 1, 2), (0, 1, 1), (1, 1, 1), (1, 3, 9, 33)),
    # channels-innermost kernels: the weight gradient's all-taps sweep (W stride and dilation 1) for
    # kW = 5 with register blocks and a channel tail; W stride 2 wide rows; T = 1 with one-vector
    # blocks; rows too narrow for any interior position
    Config(37, 1, (1, 3, 5), (2, 1, 1), (0, 1, 2), (1, 1, 1), (1, 3, 4, 13)),
    Config(40, 1, (3, 3, 3), (1, 2, 2), (1, 1, 1), (1, 1, 1), (1, 3, 8, 24)),
    Config(24, 1, (1, 3, 3), (1, 1, 1), (0, 1, 1), (1, 1, 1), (2, 1, 5, 12)),
    Config(20, 1, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), (1, 2, 3, 2), bias=False),
    # channels-innermost kW = 3 register blocks (forward / stride-1 input gradient) and kH = kW = 3
    # weight-gradient sweeps: X3D's 108 channels (a tail vector at every width) with a W that no
    # block width divides; W stride 2 with an odd W; H = 1 and T = 1 with kT = 1 and T padding (whole
    # output rows in the padding, bias gradient only), W = 5; no W padding with H dilation; W = 1;
    # kT = 5 with T stride, H stride and dilation and a W of 16
    Config(108, 1, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), (1, 3, 5, 30)),
    Config(20, 1, (3, 3, 3), (1, 2, 2), (1, 1, 1), (1, 1, 1), (1, 2, 9, 13)),
    Config(40, 1, (1, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), (2, 1, 1, 5)),
    Config(33, 1, (3, 3, 3), (1, 1, 1), (1, 1, 0), (1, 2, 1), (1, 4, 7, 9)),
    Config(17, 1, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), (1, 2, 3, 1)),
    Config(16, 1, (5, 3, 3), (2, 2, 1), (2, 1, 1), (1, 2, 1), (1, 7, 9, 16)),
    # H padding beyond the kernel's reach: output rows with no H tap in range add to the bias gradient only
    # (the kH = kW = 3 sweep dropped them); with H dilation 2; a W below 8 (NCDHW inputs reach the same
    # kernel through a layout copy there)
    Config(17, 1, (3, 3, 3), (1, 1, 1), (1, 3, 1), (1, 1, 1), (2, 3, 4, 9)),
    Config(16, 1, (3, 3, 3), (1, 1, 1), (1, 5, 1), (1, 2, 1), (1, 2, 4, 7)),
    # NCDHW scratch-plane forward, row edges at 16 lanes: no padding at all with kW = 1 and W one vector;
    # H padding 2 (an output row reading one input row) with kW = 5, W padding 3 and W of two vectors;
    # T stride and W dilation 3 with a W one past a vector
    Config(3, 1, (3, 3, 1), (1, 1, 1), (0, 0, 0), (1, 1, 1), (1, 4, 5, 16)),
    Config(2, 1, (3, 3, 5), (1, 1, 1), (1, 2, 3), (1, 1, 1), (1, 3, 4, 32)),
    Config(2, 1, (3, 3, 3), (2, 1, 1), (1, 1, 1), (1, 1, 3), (1, 5, 7, 17)),
    # the same at 8 lanes (the AVX2 path, W not a multiple of 16): H = 1 and T = 1 with a W of 2 vectors
    # + 7; W of exactly 3 vectors; kW = 7 with W padding 3 over one 2-vector block; W dilation 3 with a
    # W of 3 vectors + 2
    Config(2, 1, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), (1, 1, 1, 23)),
    Config(2, 1, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), (2, 2, 6, 24)),
    Config(2, 1, (1, 3, 7), (1, 1, 1), (0, 1, 3), (1, 1, 1), (1, 2, 5, 16)),
    Config(2, 1, (3, 3, 3), (1, 1, 1), (1, 1, 3), (1, 1, 3), (1, 3, 5, 26), bias=False),
    # NCDHW W stride 2, the scratch rows' two phases split by whole vectors (build_rows): W padding 2
    # with kW = 5 and a W of four 16-lane vectors + 5 (vector chunks, the last overlapping, and a tail);
    # no W padding with an even W
    Config(2, 1, (3, 3, 5), (1, 2, 2), (1, 1, 2), (1, 1, 1), (1, 3, 6, 69)),
    Config(2, 1, (3, 3, 3), (1, 1, 2), (1, 1, 0), (1, 1, 1), (1, 3, 4, 40)),
    # small planes (NCDHW rows narrower than 16, every stride 1 (the forward also W stride 2, the
    # backward any stride: see below): per batch item and channel vector,
    # transposed in cache; CONFIGS[0, 1, 5, 11, 17, 25, 26, 30, 31] take it too, and the channels_last_3d
    # backward of those narrower than 8): padding at the kernel's
    # reach (output larger than the input, the flipped kernel unpadded) with W = 15 and a channel tail;
    # T dilation without T padding; a volume too large for the path's scratch (the other kernels run)
    Config(20, 1, (3, 3, 3), (1, 1, 1), (2, 2, 2), (1, 1, 1), (2, 3, 4, 15)),
    Config(5, 1, (3, 3, 3), (1, 1, 1), (0, 1, 1), (2, 1, 1), (1, 6, 4, 3)),
    Config(3, 1, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), (1, 10, 200, 6)),
    # small planes with kW = 5 (each source vector shared by 5 taps; the weight sums per (kt, kh) row of
    # taps) and a channel tail; kW = 5 under kH = 3 with W padding below the reach (OW = 9: a block of 8
    # and one of 1); kW = 3 under kH = 1
    Config(20, 1, (3, 5, 5), (1, 1, 1), (1, 2, 2), (1, 1, 1), (2, 3, 6, 9)),
    Config(3, 1, (1, 3, 5), (1, 1, 1), (0, 1, 1), (1, 1, 1), (1, 2, 5, 11)),
    Config(5, 1, (3, 1, 3), (1, 1, 1), (1, 0, 1), (1, 1, 1), (1, 4, 5, 6)),
    # NCDHW stride 2 into X3D's 14² and 7² stages: 28-wide rows (too short for a 16-lane chunk of the phase
    # split: half-vector chunks on the AVX-512 path); output rows of 7 (narrower than the row kernels take
    # on AVX-512: the channels-innermost kernels on layout copies there)
    Config(20, 1, (3, 3, 3), (1, 2, 2), (1, 1, 1), (1, 1, 1), (2, 3, 6, 28)),
    Config(6, 1, (3, 3, 3), (1, 2, 2), (1, 1, 1), (1, 1, 1), (1, 2, 6, 14)),
    # the small-plane forward with W stride 2 (CONFIGS[3, 28, 49] take it too): kW = 5 with H and W
    # stride 2 (a source vector shared by the taps of its phase) and a channel tail; T and W stride 2 with
    # W dilation 2 (one load per tap)
    Config(20, 1, (1, 5, 5), (1, 2, 2), (0, 2, 2), (1, 1, 1), (2, 3, 11, 11)),
    Config(4, 1, (3, 3, 3), (2, 1, 2), (1, 1, 2), (1, 1, 2), (1, 7, 5, 13)),
    # the small-plane backward with strides (one input-gradient correlation per phase of the input
    # positions; CONFIGS[3, 6, 16, 20, 23, 28, 49, 50, 51] take it too): T stride 3 with the last input
    # row reached through the padding (phases of 3, 3 and 2 rows), H stride 2 with H dilation 2 (odd
    # input rows read by no tap: a phase without taps), kW = 5 with W stride 2 and no W padding
    # (phases of 3 and 2 taps; the last input column read by no output: gradient 0), a channel tail;
    # kT = 1 with T stride 2 and kW = 1 with W stride 3 (phases without taps: whole rows and columns no
    # output reads), W = 7 (the channels_last_3d backward too)
    Config(20, 1, (3, 3, 5), (3, 2, 2), (1, 0, 0), (1, 2, 1), (2, 8, 9, 12)),
    Config(5, 1, (1, 3, 1), (2, 1, 3), (0, 1, 0), (1, 1, 1), (1, 5, 6, 7)),
    # channels-innermost register blocks of 10 and 5 (X3D-S's 160-pixel crops: rows of 5, 10, 20): W stride 2
    # into a row of 10 (two 5-wide blocks on both paths, the first at the left border); a row of 10 at
    # stride 1 (one 10-wide block with both borders at 512 bits, a left and a right 5-wide one at 256),
    # each with a channel tail
    Config(20, 1, (3, 3, 3), (1, 2, 2), (1, 1, 1), (1, 1, 1), (1, 3, 4, 20)),
    Config(20, 1, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), (2, 2, 3, 10), bias=False),
]
LAYOUTS = ["contiguous", "channels_last_3d", "noncontiguous"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LOW_PRECISION = (torch.bfloat16, torch.float16)


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def make_sample(config: Config, dtype, layout):
    B, T, H, W = config.shape
    C, m = config.channels, config.multiplier
    x = torch.randn(B, C, T, H, W, dtype=torch.float64)
    if layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    elif layout == "noncontiguous":
        x = torch.randn(B, C, T, H, 2 * W, dtype=torch.float64)[..., ::2]
    weight = torch.randn(C * m, 1, *config.kernel, dtype=torch.float64) / (config.kernel[0] * config.kernel[1])
    bias = torch.randn(C * m, dtype=torch.float64) if config.bias else None
    tensors = {"input": x, "weight": weight, "bias": bias}
    return {k: (v.to(dtype).requires_grad_() if v is not None else None) for k, v in tensors.items()}


def conv_args(config):
    return config.stride, config.padding, config.dilation


def run_ours(config, t):
    return depthwise_conv3d(t["input"], t["weight"], t["bias"], *conv_args(config))


def run_native(config, t):
    return F.conv3d(t["input"], t["weight"], t["bias"], *conv_args(config), groups=config.channels)


def converted(t, dtype):
    return {k: (v.detach().to(dtype).requires_grad_() if v is not None else None) for k, v in t.items()}


def values_and_grads(run, config, t, grad_output):
    out = run(config, t)
    names = [k for k, v in t.items() if v is not None]
    grads = torch.autograd.grad(out, [t[k] for k in names], grad_output.to(out.dtype))
    return out, dict(zip(names, grads))


def assert_parity(ours, oracle, dtype, what):
    assert ours.dtype == dtype, f"{what}: dtype {ours.dtype}, expected {dtype}"
    if dtype in LOW_PRECISION:
        assert_low_precision(ours, oracle, dtype, what)
    else:
        assert_full_precision(ours, oracle, what)


def random_grad_output(shape, dtype, device="cpu"):
    """An upstream gradient already rounded to ``dtype`` (so the fp64 oracle sees what the kernel saw)."""
    return torch.randn(shape, dtype=torch.float64).to(dtype).double().to(device)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("config", CONFIGS, ids=Config.id)
def test_matches_conv3d(config, dtype, layout, cpu_isa):
    """Output and the gradients w.r.t. input, weight and bias equal F.conv3d(groups=C) in float64
    (bf16/fp16 within the flash-attention rule, m > 1 and channels_last_3d included), on every CPU ISA
    path."""
    t = make_sample(config, dtype, layout)
    out = run_ours(config, t)
    grad_output = random_grad_output(out.shape, dtype)
    ours, ours_grads = values_and_grads(run_ours, config, t, grad_output)
    oracle, oracle_grads = values_and_grads(run_native, config, converted(t, torch.float64), grad_output)

    expect_cl = layout == "channels_last_3d" and config.channels > 1
    fmt = torch.channels_last_3d if expect_cl else torch.contiguous_format
    assert ours.is_contiguous(memory_format=fmt), f"output strides {ours.stride()} for a {layout} input"
    assert_parity(ours, oracle, dtype, "output")
    for name in ours_grads:
        assert_parity(ours_grads[name], oracle_grads[name], dtype, f"grad {name}")

    with torch.no_grad():
        assert_parity(run_ours(config, t), oracle, dtype, "output (no_grad)")


def test_backward_partial_mask_and_determinism():
    config = CONFIGS[2]
    t = make_sample(config, torch.float32, "channels_last_3d")
    x, w = t["input"].detach(), t["weight"].detach()
    out = OPS.depthwise_conv3d(x, w, None, *conv_args(config))
    go = torch.randn_like(out)
    full = OPS.depthwise_conv3d_backward(go, x, w, *conv_args(config), [True, True, True])
    again = OPS.depthwise_conv3d_backward(go, x, w, *conv_args(config), [True, True, True])
    for a, b in zip(full, again):
        assert torch.equal(a, b), "reruns are not bit-identical"
    only_weight = OPS.depthwise_conv3d_backward(go, x, w, *conv_args(config), [False, True, False])
    assert only_weight[0].numel() == 0 and only_weight[2].numel() == 0
    assert torch.equal(only_weight[1], full[1])
    torch.testing.assert_close(full[2], go.sum((0, 2, 3, 4)))


def backward_at_one_and_two_threads(go, x, w, args, output_mask):
    """The op's backward run with 1 and then 2 threads (the caller's thread count restored)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = OPS.depthwise_conv3d_backward(go, x, w, *args, output_mask)
        torch.set_num_threads(2)
        two = OPS.depthwise_conv3d_backward(go, x, w, *args, output_mask)
    finally:
        torch.set_num_threads(threads)
    return one, two


def test_ncdhw_weight_grad_thread_invariant_and_ignores_unread_inputs():
    """NCDHW kernels: the weight/bias gradients are bit-identical for 1 and 2 threads, and an inf in an
    input column no output reads (W stride 2 leaves the last column out) changes nothing."""
    x = torch.randn(2, 3, 4, 5, 38, dtype=torch.float64)
    w = torch.randn(3, 1, 3, 3, 3, dtype=torch.float64)
    args = ((1, 1, 2), (1, 1, 0), (1, 1, 1))  # OW = 18 reads columns 0..36
    go = torch.randn(OPS.depthwise_conv3d(x, w, None, *args).shape, dtype=torch.float64)
    one, two = backward_at_one_and_two_threads(go, x, w, args, [True, True, True])
    for a, b in zip(one, two):
        assert torch.equal(a, b)
    x_inf = x.clone()
    x_inf[..., 37] = float("inf")
    assert torch.equal(OPS.depthwise_conv3d_backward(go, x_inf, w, *args, [False, True, True])[1], two[1])
    torch.testing.assert_close(two[1], torch.nn.grad.conv3d_weight(x, w.shape, go, *args, groups=3))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
@pytest.mark.parametrize("kernel,stride,padding", [((3, 3, 3), (1, 1, 1), (1, 1, 1)), ((3, 1, 5), (1, 1, 1), (1, 0, 2)),
                                                   ((3, 3, 3), (1, 2, 2), (1, 1, 1))], ids=["k3", "generic", "strided"])
def test_small_plane_grads_thread_invariant(kernel, stride, padding, layout, cpu_isa):
    """Small planes (W = 7; channels_last_3d: the backward): the weight/bias gradients are bit-identical
    for 1 and 2 threads (one partial per batch item and channel vector, added in batch order) on every
    ISA path, and match conv3d_weight."""
    fmt = torch.channels_last_3d if layout == "channels_last_3d" else torch.contiguous_format
    x = torch.randn(3, 20, 4, 5, 7, dtype=torch.float64).contiguous(memory_format=fmt)
    w = torch.randn(20, 1, *kernel, dtype=torch.float64)
    args = (stride, padding, (1, 1, 1))
    go = torch.randn(OPS.depthwise_conv3d(x, w, None, *args).shape, dtype=torch.float64).contiguous(memory_format=fmt)
    one, two = backward_at_one_and_two_threads(go, x, w, args, [True, True, True])
    for a, b in zip(one, two):
        assert torch.equal(a, b)
    torch.testing.assert_close(two[1], torch.nn.grad.conv3d_weight(x, w.shape, go, *args, groups=20))
    torch.testing.assert_close(two[2], go.sum((0, 2, 3, 4)))


@pytest.mark.parametrize("channels,kernel,shape", [(20, (3, 3, 3), (2, 5, 9, 7)), (108, (3, 3, 3), (2, 5, 9, 7)),
                                                   (108, (3, 3, 3), (1, 2, 3, 7)), (20, (3, 3, 5), (2, 5, 9, 7))],
                         ids=["k3-tail", "k3-C108", "k3-C108-6rows", "generic"])
def test_channels_last_weight_grad_thread_invariant(channels, kernel, shape, cpu_isa):
    """Channels-innermost kernels: the weight/bias gradients are bit-identical for 1 and 2 threads (fixed
    chunks of rows and channel groups, summed in a fixed order) on every ISA path, and match
    conv3d_weight in float64. 6 output rows: 6 chunks, so the kH = kW = 3 kernel's items are chunks at
    one thread and (channel group, chunk) pairs at two (fewer than 4 chunks per thread)."""
    B, T, H, W = shape
    x = torch.randn(B, channels, T, H, W, dtype=torch.float64).contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(channels, 1, *kernel, dtype=torch.float64)
    args = ((1, 1, 1), tuple(k // 2 for k in kernel), (1, 1, 1))
    go = torch.randn_like(OPS.depthwise_conv3d(x, w, None, *args))
    one, two = backward_at_one_and_two_threads(go, x, w, args, [False, True, True])
    assert torch.equal(one[1], two[1]) and torch.equal(one[2], two[2])
    torch.testing.assert_close(two[1], torch.nn.grad.conv3d_weight(x, w.shape, go, *args, groups=channels))
    torch.testing.assert_close(two[2], go.sum((0, 2, 3, 4)))


@pytest.fixture(params=["always", "never"])
def streaming(request):
    """The channels-last kernel's streaming stores forced on or off (its own choice depends on the
    cache size and the buffers' addresses, csrc/depthwise3d/depthwise3d_cpu.cpp, streams_output)."""
    previous = OPS._set_depthwise_streaming(request.param)
    yield request.param
    OPS._set_depthwise_streaming(previous)


def test_set_depthwise_streaming_rejects_unknown_modes():
    with pytest.raises(RuntimeError, match="mode must be one of auto, always, never, got 'sometimes'"):
        OPS._set_depthwise_streaming("sometimes")


@pytest.mark.parametrize("shape,channels", [((2, 8, 28, 28), 96), ((1, 8, 30, 56), 64), ((1, 2, 5, 30), 108),
                                            ((2, 8, 28, 28), 108), ((2, 6, 14, 7), 54)],
                         ids=["lines", "plane-chunks", "channel-splits", "rows-C108", "rows-C54-partial-lines"])
def test_channels_last_forward_work_split(shape, channels, cpu_isa, streaming):
    """The channels-innermost kW = 3 forward splits its output into boxes of planes x rows x channel
    groups (csrc/depthwise3d/depthwise3d_cpu.cpp, Boxes) and, on the AVX2 and AVX-512 paths, can write
    fp32 outputs with streaming stores, here forced on and off: where positions are whole 64-byte
    lines (C a multiple of 16) from the registers, outputs of 4.8 MB and 3.4 MB (the second in chunks
    of 2 of 8 planes and 8 bands, the last of 2 rows); else through a per-thread buffer of the box's
    rows (streams_rows), for boxes with every channel group: C = 108 at 28² (5.4 MB, a tail vector)
    and C = 54 at 7 wide (rows of 378 values: lines shared by two boxes' rows, written plainly at
    either end). C = 108 in 2 boxes (channel groups split) is never streamed. The forward and the
    stride-1 input gradient (the same kernel, flipped) are bit-identical at 1 and 2 threads and match
    the tap-sum oracle in float64."""
    B, T, H, W = shape
    x = torch.randn(B, channels, T, H, W).contiguous(memory_format=torch.channels_last_3d)
    w, b = torch.randn(channels, 1, 3, 3, 3) / 9, torch.randn(channels)
    args = ((1, 1, 1), (1, 1, 1), (1, 1, 1))
    go = torch.randn(B, channels, T, H, W).contiguous(memory_format=torch.channels_last_3d)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append((OPS.depthwise_conv3d(x, w, b, *args),
                         OPS.depthwise_conv3d_backward(go, x, w, *args, [True, False, False])[0]))
    finally:
        torch.set_num_threads(threads)
    (out1, gi1), (out2, gi2) = runs
    assert torch.equal(out1, out2) and torch.equal(gi1, gi2), "results depend on the thread count"
    x64 = x.double().requires_grad_()
    oracle = tap_sum_depthwise(x64, w, b, *args)
    (gi_oracle,) = torch.autograd.grad(oracle, x64, go.double())
    assert out2.is_contiguous(memory_format=torch.channels_last_3d)
    assert_full_precision(out2, oracle, "forward")
    assert_full_precision(gi2, gi_oracle, "input gradient")


@pytest.mark.parametrize("shape,channels", [((2, 8, 28, 28), 96), ((2, 5, 9, 7), 20), ((1, 3, 4, 30), 108),
                                            ((1, 4, 6, 30), 64)],
                         ids=["lines", "tail", "C108", "C64"])
def test_channels_last_fused_backward(shape, channels, cpu_isa, streaming):
    """Stride 1 with the output the size of the input: the channels-innermost backward computes both
    gradients in one pass, chunk by chunk of rows, where a chunk's rows fit in L2 (here at most 0.6 MB:
    fused on CPUs with 1 MiB of L2 or more; csrc/depthwise3d/depthwise3d_cpu.cpp, fused_backward_applies,
    backward_impl; 12 to 448 rows here, so at least 4 chunks per thread). Its results, also with only the
    weight or only the bias gradient asked for beside the input gradient, are bit-identical to each gradient
    asked for alone (then each runs its own pass) at 1 and 2 threads, with the input gradient's
    streaming stores forced on and off, and match the tap-sum oracle in float64."""
    B, T, H, W = shape
    x = torch.randn(B, channels, T, H, W).contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(channels, 1, 3, 3, 3) / 9
    args = ((1, 1, 1), (1, 1, 1), (1, 1, 1))
    go = torch.randn(B, channels, T, H, W).contiguous(memory_format=torch.channels_last_3d)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            both = OPS.depthwise_conv3d_backward(go, x, w, *args, [True, True, True])
            gi_alone = OPS.depthwise_conv3d_backward(go, x, w, *args, [True, False, False])[0]
            _, gw_alone, gb_alone = OPS.depthwise_conv3d_backward(go, x, w, *args, [False, True, True])
            assert torch.equal(both[0], gi_alone), f"input gradient differs from its own pass ({n} threads)"
            assert torch.equal(both[1], gw_alone), f"weight gradient differs from its own pass ({n} threads)"
            assert torch.equal(both[2], gb_alone), f"bias gradient differs from its own pass ({n} threads)"
            # the input gradient with only one of the others (the bias alone is summed in another order
            # than beside the weight gradient, so each is compared with its own mask asked for alone)
            gi_b, none_w, gb_b = OPS.depthwise_conv3d_backward(go, x, w, *args, [True, False, True])
            gi_w, gw_w, none_b = OPS.depthwise_conv3d_backward(go, x, w, *args, [True, True, False])
            gb_only = OPS.depthwise_conv3d_backward(go, x, w, *args, [False, False, True])[2]
            gw_only = OPS.depthwise_conv3d_backward(go, x, w, *args, [False, True, False])[1]
            assert none_w.numel() == 0 and none_b.numel() == 0
            assert torch.equal(gi_b, gi_alone) and torch.equal(gb_b, gb_only), "input + bias gradients"
            assert torch.equal(gi_w, gi_alone) and torch.equal(gw_w, gw_only), "input + weight gradients"
    finally:
        torch.set_num_threads(threads)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    oracle = tap_sum_depthwise(x64, w64, None, *args)
    gi_oracle, gw_oracle = torch.autograd.grad(oracle, (x64, w64), go.double())
    assert both[0].is_contiguous(memory_format=torch.channels_last_3d)
    assert_full_precision(both[0], gi_oracle, "input gradient")
    assert_full_precision(both[1], gw_oracle, "weight gradient")
    assert_full_precision(both[2], go.double().sum((0, 2, 3, 4)), "bias gradient")


@pytest.mark.parametrize("shape,channels,stride", [((1, 3, 40, 40), 54, (1, 2, 2)), ((2, 4, 9, 27), 64, (1, 2, 2)),
                                                   ((1, 2, 180, 34), 54, (1, 2, 2)), ((1, 7, 30, 30), 20, (2, 2, 2))],
                         ids=["C54", "C64-odd", "C54-tall", "T-stride"])
def test_channels_last_stride2_backward(shape, channels, stride, cpu_isa, streaming):
    """kH = kW = 3 with H and W stride 2 and padding 1 (X3D's downsampling convs): the channels-innermost input
    gradient computes both W phases of its rows per block of outputs (csrc/depthwise3d/depthwise3d_cpu.cpp,
    input_grad_row_w2), streamed out through a per-thread buffer where streaming is forced on; both gradients walk
    their rows in bands along H (BandOrder: with 1-2 MiB of L2 here the weight gradient's bands are 3-20 grad_output
    rows, the input gradient's of C54-tall about half its 180 rows). An odd W (the last input in the even phase)
    and H, a channel tail, and a T stride. Both gradients are bit-identical at 1 and 2 threads and match the tap-sum
    oracle in float64."""
    B, T, H, W = shape
    x = torch.randn(B, channels, T, H, W).contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(channels, 1, 3, 3, 3) / 9
    args = (stride, (1, 1, 1), (1, 1, 1))
    go = torch.randn_like(OPS.depthwise_conv3d(x, w, None, *args))
    one, two = backward_at_one_and_two_threads(go, x, w, args, [True, True, True])
    for name, a, b in zip(("input", "weight", "bias"), one, two):
        assert torch.equal(a, b), f"{name} gradient depends on the thread count"
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    oracle = tap_sum_depthwise(x64, w64, None, *args)
    gi_oracle, gw_oracle = torch.autograd.grad(oracle, (x64, w64), go.double())
    assert two[0].is_contiguous(memory_format=torch.channels_last_3d)
    assert_full_precision(two[0], gi_oracle, "input gradient")
    assert_full_precision(two[1], gw_oracle, "weight gradient")
    assert_full_precision(two[2], go.double().sum((0, 2, 3, 4)), "bias gradient")


def tap_sum_depthwise(x, w, b, stride, padding, dilation):
    """Depthwise conv as the sum over kernel taps of weight × a strided window of the zero-padded
    input, in float64: an oracle that shares no code with F.conv3d."""
    (sT, sH, sW), (pT, pH, pW), (dT, dH, dW) = stride, padding, dilation
    m = w.shape[0] // x.shape[1]
    x = F.pad(x.double(), (pW, pW, pH, pH, pT, pT)).repeat_interleave(m, dim=1)
    kT, kH, kW = w.shape[2:]
    size = [(x.shape[2 + i] - d * (k - 1) - 1) // s + 1 for i, (k, s, d) in enumerate(
        zip((kT, kH, kW), (sT, sH, sW), (dT, dH, dW)))]
    out = torch.zeros(x.shape[0], w.shape[0], *size, dtype=torch.float64)
    for i in range(kT):
        for j in range(kH):
            for k in range(kW):
                window = x[:, :, i * dT::sT, j * dH::sH, k * dW::sW][:, :, :size[0], :size[1], :size[2]]
                out += w[:, 0, i, j, k].double().view(1, -1, 1, 1, 1) * window
    return out if b is None else out + b.double().view(1, -1, 1, 1, 1)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_backends_and_int_arguments_match_tap_sum(backend):
    """Every backend, with int stride/padding/dilation, against the tap-sum oracle (not against the
    reference, which is what the reference backend runs)."""
    x = torch.randn(2, 4, 5, 6, 7)
    w = torch.randn(8, 1, 3, 3, 3)
    b = torch.randn(8)
    with fastvid.backend(backend):
        out = depthwise_conv3d(x, w, b, stride=2, padding=1, dilation=1)
    assert_full_precision(out, tap_sum_depthwise(x, w, b, (2, 2, 2), (1, 1, 1), (1, 1, 1)), f"{backend} backend")


def test_tap_sum_oracle_is_conv3d():
    """The tap-sum oracle itself agrees with F.conv3d(groups=C) in float64 on an irregular config."""
    c = CONFIGS[4]
    t = make_sample(c, torch.float64, "contiguous")
    torch.testing.assert_close(tap_sum_depthwise(t["input"], t["weight"], t["bias"], *conv_args(c)),
                               run_native(c, t), **full_precision_tol(torch.float64))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
def test_autocast_bf16(layout):
    """Under CPU bf16 autocast input, weight and bias are rounded to bf16 and the result is stored in
    bf16: judged by the flash-attention rule against the fp64 conv of the fp32 tensors, with the fp64
    conv of the bf16-rounded tensors, rounded to bf16, as yardstick."""
    x = torch.randn(1, 8, 4, 6, 6)
    if layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(8, 1, 3, 3, 3)
    b = torch.randn(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = depthwise_conv3d(x, w, b, padding=1)
    args = ((1, 1, 1), (1, 1, 1), (1, 1, 1))
    oracle = tap_sum_depthwise(x, w, b, *args)
    yardstick = tap_sum_depthwise(*(t.bfloat16() for t in (x, w, b)), *args).bfloat16()
    assert_low_precision(out, oracle, torch.bfloat16, "output under autocast", yardstick=yardstick)


# ===================================================================================== gradcheck
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
@pytest.mark.parametrize("config", [
    Config(2, 1, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), (1, 3, 4, 3)),
    Config(2, 2, (2, 3, 1), (2, 1, 1), (1, 1, 0), (1, 2, 1), (1, 4, 5, 3)),
], ids=Config.id)
def test_gradcheck(config, layout):
    t = make_sample(config, torch.float64, layout)
    names = [k for k, v in t.items() if v is not None]

    def f(*args):
        return run_ours(config, dict(zip(names, args)))

    assert torch.autograd.gradcheck(f, [t[k] for k in names], eps=1e-6, atol=1e-6, rtol=1e-5)


def test_double_backward_raises():
    config = CONFIGS[0]
    t = make_sample(config, torch.float64, "contiguous")
    out = run_ours(config, t)
    (gx,) = torch.autograd.grad(out.sum(), [t["input"]], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        gx.sum().backward()


# ======================================================================================= opcheck
def _opcheck(op, args):
    result = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[2], CONFIGS[4]], ids=Config.id)
def test_opcheck(config, layout):
    t = make_sample(config, torch.float64, layout)
    _opcheck(OPS.depthwise_conv3d.default, (t["input"], t["weight"], t["bias"], *conv_args(config)))
    x, w = t["input"].detach(), t["weight"].detach()
    out = OPS.depthwise_conv3d(x, w, None, *conv_args(config))
    go = torch.randn_like(out)
    for mask in ([True, True, True], [True, False, False], [False, True, True]):
        _opcheck(OPS.depthwise_conv3d_backward.default, (go, x, w, *conv_args(config), mask))


# ===================================================================================== bad input
def _call(x, w, b=None, stride=(1, 1, 1), padding=(0, 0, 0), dilation=(1, 1, 1)):
    return OPS.depthwise_conv3d(x, w, b, stride, padding, dilation)


X = torch.randn(1, 4, 5, 6, 6)
W = torch.randn(4, 1, 3, 3, 3)


@pytest.mark.parametrize("args, error, match", [
    ({"x": torch.randn(4, 5, 6, 6), "w": W}, ValueError, "input must be"),
    ({"x": X, "w": torch.randn(4, 2, 3, 3, 3)}, ValueError, "weight must be"),
    ({"x": X, "w": torch.randn(6, 1, 3, 3, 3)}, ValueError, "weight must be"),
    ({"x": X, "w": torch.randn(4, 1, 3, 3)}, ValueError, "weight must be"),
    ({"x": X, "w": torch.randn(4, 1, 3, 9, 3)}, ValueError, "kernel size along H must be 1..7"),
    ({"x": X, "w": W, "padding": (1, -1, 1)}, ValueError, "padding must be non-negative"),
    ({"x": X, "w": W, "stride": (1, 0, 1)}, ValueError, "stride must be >= 1"),
    ({"x": X, "w": W, "dilation": (0, 1, 1)}, ValueError, "dilation must be >= 1"),
    ({"x": X, "w": torch.randn(4, 1, 7, 3, 3)}, ValueError, "larger than the padded input"),
    ({"x": X, "w": W, "dilation": (3, 1, 1)}, ValueError, "larger than the padded input"),
    ({"x": X.to(torch.int32), "w": W.to(torch.int32)}, TypeError, "input must be floating point"),
    ({"x": X, "w": W.double()}, TypeError, "weight has dtype"),
    ({"x": X, "w": W, "b": torch.randn(5)}, ValueError, "bias must be"),
    ({"x": X, "w": W, "b": torch.randn(4).double()}, TypeError, "bias has dtype"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        _call(**args)


def test_bad_grad_output_shape():
    with pytest.raises(ValueError, match="grad_output must be"):
        OPS.depthwise_conv3d_backward(torch.randn(1, 4, 3, 4, 5), X, W, (1, 1, 1), (0, 0, 0), (1, 1, 1),
                                      [True, True, True])


def test_device_mismatch():
    with pytest.raises(RuntimeError, match="device"):
        _call(X, W.to("meta"))


@pytest.mark.parametrize("layout", ["channels_last_3d", "contiguous"])
@pytest.mark.parametrize("config", [CONFIGS[1], CONFIGS[9], CONFIGS[10], CONFIGS[11], CONFIGS[12], CONFIGS[14]],
                         ids=Config.id)
def test_bf16_rounds_like_fp32_kernel(config, layout):
    """bf16 accumulates in fp32 in the same order as fp32: the output and all three gradients are the
    fp32 kernel's results on the same values rounded to bf16, bit for bit (NaN included)."""
    t = make_sample(config, torch.bfloat16, layout)
    x, w = t["input"].detach().clone(), t["weight"].detach()
    args = conv_args(config)
    go = torch.randn(OPS.depthwise_conv3d(x, w, None, *args).shape, dtype=torch.bfloat16)
    if layout == "channels_last_3d":
        go = go.contiguous(memory_format=torch.channels_last_3d)
    ours = OPS.depthwise_conv3d_backward(go, x, w, *args, [True, True, True])
    expected = OPS.depthwise_conv3d_backward(go.float(), x.float(), w.float(), *args, [True, True, True])
    for name, a, e in zip(["grad_input", "grad_weight", "grad_bias"], ours, expected):
        assert torch.equal(a, e.bfloat16()), name
    x[0, 0, 0, 0, 0] = float("nan")
    ours = OPS.depthwise_conv3d(x, w, None, *args)
    expected = OPS.depthwise_conv3d(x.float(), w.float(), None, *args).bfloat16()
    assert torch.equal(ours.isnan(), expected.isnan())
    assert torch.equal(ours.nan_to_num(), expected.nan_to_num())


# ========================================================================================== CUDA
@requires_cuda
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("config", CONFIGS, ids=Config.id)
def test_cuda_matches_conv3d(config, dtype, layout):
    """The CUDA kernels: output and all three gradients against F.conv3d in float64 (on the GPU), in each
    layout (NCDHW inputs run the NCDHW kernels, channels_last_3d ones the NDHWC kernels; only channels_last_3d
    samples ran here before, so the default layout's kernels were checked on one single-channel config)."""
    t = {k: (v.detach().cuda().requires_grad_() if v is not None else None)
         for k, v in make_sample(config, dtype, layout).items()}
    out = run_ours(config, t)
    grad_output = random_grad_output(out.shape, dtype, "cuda")
    ours, ours_grads = values_and_grads(run_ours, config, t, grad_output)
    oracle, oracle_grads = values_and_grads(run_native, config, converted(t, torch.float64), grad_output)
    assert_parity(ours, oracle, dtype, "output")
    for name in ours_grads:
        assert_parity(ours_grads[name], oracle_grads[name], dtype, f"grad {name}")


@requires_cuda
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[2]], ids=Config.id)
def test_cuda_opcheck(config, layout):
    t = {k: (v.detach().cuda().requires_grad_() if v is not None else None)
         for k, v in make_sample(config, torch.float64, layout).items()}
    _opcheck(OPS.depthwise_conv3d.default, (t["input"], t["weight"], t["bias"], *conv_args(config)))


@pytest.mark.parametrize("layout", ["channels_last_3d", "contiguous"])
@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[4], CONFIGS[8], CONFIGS[10], CONFIGS[11], CONFIGS[12],
                                    CONFIGS[14], CONFIGS[16], CONFIGS[17], CONFIGS[18], CONFIGS[27], CONFIGS[28],
                                    CONFIGS[29], CONFIGS[31], CONFIGS[19], CONFIGS[21], CONFIGS[33], CONFIGS[34],
                                    CONFIGS[35], *CONFIGS[36:40], CONFIGS[0], CONFIGS[5], *CONFIGS[42:44],
                                    *CONFIGS[45:48]],
                         ids=Config.id)
def test_no_out_of_bounds_reads(config, layout, cpu_isa):
    """Inputs and grad_output are views into buffers whose neighbouring memory is NaN: a read outside
    a tensor would turn the results NaN (on every CPU ISA path: each has its own vector width)."""
    fmt = torch.channels_last_3d if layout == "channels_last_3d" else torch.contiguous_format

    def nan_framed(t):  # a view of t with NaN batches before and after it in memory
        frame = torch.full((t.shape[0] + 2, *t.shape[1:]), float("nan"), dtype=t.dtype)
        frame = frame.contiguous(memory_format=fmt)
        frame[1:-1] = t
        return frame[1:-1]

    t = make_sample(config, torch.float32, layout)
    x, w = nan_framed(t["input"].detach()), t["weight"].detach()
    assert x.is_contiguous(memory_format=fmt)
    args = conv_args(config)
    out = OPS.depthwise_conv3d(x, w, None, *args)
    go = nan_framed(torch.randn(out.shape).contiguous(memory_format=fmt))
    grads = OPS.depthwise_conv3d_backward(go, x, w, *args, [True, True, True])
    for name, value in zip(["output", "grad_input", "grad_weight", "grad_bias"], [out, *grads]):
        assert not value.isnan().any(), f"{name} read memory outside its tensors"


@pytest.mark.parametrize("input_shape,kernel,stride,padding,dilation,match", [
    ((1, 4, 3, 6, 7), (3, 3, 3), [0, 1, 1], [1, 1, 1], [1, 1, 1], "stride must"),
    ((1, 4, 3, 6, 7), (3, 3, 3), [1, 1], [1, 1, 1], [1, 1, 1], "stride must"),
    ((1, 4, 3, 6, 7), (3, 3, 3), [1, 1, 1], [-1, 1, 1], [1, 1, 1], "padding must"),
    ((1, 4, 3, 6, 7), (3, 3, 3), [1, 1, 1], [1, 1, 1], [1, 0, 1], "dilation must"),
    ((1, 4, 9, 9, 9), (8, 3, 3), [1, 1, 1], [1, 1, 1], [1, 1, 1], "kernel size along T must be 1..7"),
    ((1, 4, 1, 6, 7), (3, 3, 3), [1, 1, 1], [0, 1, 1], [1, 1, 1], "larger than the padded input"),
])
def test_fake_kernel_refuses_what_the_cpu_kernel_refuses(input_shape, kernel, stride, padding, dilation, match):
    """On meta tensors (and so under torch.compile) the same refusals as the CPU kernel's, instead of a
    negative output size or an index error."""
    for device in ("cpu", "meta"):
        x = torch.zeros(input_shape, device=device)
        w = torch.zeros(input_shape[1], 1, *kernel, device=device)
        with pytest.raises(ValueError, match=match):
            torch.ops.fastvid.depthwise_conv3d(x, w, None, stride, padding, dilation)
    compiled = torch.compile(lambda x, w: torch.ops.fastvid.depthwise_conv3d(x, w, None, stride, padding, dilation),
                             fullgraph=True)
    with pytest.raises(Exception, match=match):
        compiled(torch.zeros(input_shape), torch.zeros(input_shape[1], 1, *kernel))
