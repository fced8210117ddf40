"""fastvid.nn.NonLocalBlock against an explicit implementation of Wang et al.'s equations written here
(the N×M affinity matrix materialised), and fastvid.convert of hand-written nonlocal blocks in the two
common PyTorch styles (written in this file the way pytorchvideo's NonLocal layer and the popular
standalone ports write them)."""
import copy
import warnings
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastvid
from conftest import requires_cuda
from fastvid.nn import NonLocalBlock
from _tolerances import assert_low_precision

MODES = ["embedded_gaussian", "dot_product", "gaussian", "concatenation"]
SIZES = {1: (12,), 2: (6, 8), 3: (3, 6, 8)}


def randomize(module, seed=0):
    """Random values in every parameter and BatchNorm statistic (a fresh block is the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return module


def explicit_block(block: NonLocalBlock, x, norm=None):
    """z = x + BN(W_z y), y_i = Σ_j f(i, j) g_j / C(x), written from the paper's equations. BN is
    ``norm`` (an nn.BatchNorm in its own mode) when given, else block.norm's running statistics."""
    def conv1x1(conv, t):
        return torch.einsum("oc,bc...->bo...", conv.weight.flatten(1), t) + conv.bias.view(1, -1, *[1] * (t.dim() - 2))
    pool = block.pool if block.pool is not None else (lambda t: t)
    keys_in = pool(x) if block.pool_before_projection else x
    theta = conv1x1(block.theta, x) if block.theta is not None else x
    phi = conv1x1(block.phi, keys_in) if block.phi is not None else keys_in
    g = conv1x1(block.g, keys_in)
    if not block.pool_before_projection:
        phi, g = pool(phi), pool(g)
    theta, phi, g = theta.flatten(2), phi.flatten(2), g.flatten(2)  # [B, C, N], [B, C, M], [B, inter, M]
    M = phi.shape[-1]
    if block.mode in ("embedded_gaussian", "gaussian"):
        f = torch.softmax(block.scale * torch.einsum("bcn,bcm->bnm", theta, phi), dim=-1)
    elif block.mode == "dot_product":
        f = torch.einsum("bcn,bcm->bnm", theta, phi) / M
    else:
        w = block.concat_project.weight.view(-1)
        inter = theta.shape[1]
        f = torch.relu(torch.einsum("c,bcn->bn", w[:inter], theta)[:, :, None]
                       + torch.einsum("c,bcm->bm", w[inter:], phi)[:, None, :]) / M
    y = torch.einsum("bnm,bcm->bcn", f, g).reshape(x.shape[0], -1, *x.shape[2:])
    z = conv1x1(block.out, y)
    if norm is not None:
        z = norm(z)
    elif block.norm is not None:
        z = F.batch_norm(z, block.norm.running_mean, block.norm.running_var, block.norm.weight, block.norm.bias,
                         False, 0.0, block.norm.eps)
    return x + z


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_fresh_block_is_identity(mode, dims):
    block = NonLocalBlock(6, mode=mode, dims=dims)
    x = torch.randn(2, 6, *SIZES[dims])
    assert torch.equal(block(x), x)
    assert torch.equal(NonLocalBlock(6, mode=mode, dims=dims, norm=False)(x), x)


@pytest.mark.parametrize("pool_before", [False, True])
@pytest.mark.parametrize("sub_sample", [True, False])
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_matches_paper_equations(mode, dims, sub_sample, pool_before):
    block = randomize(NonLocalBlock(6, 4, mode=mode, dims=dims, sub_sample=sub_sample, scale=0.6,
                                    pool_before_projection=pool_before).double()).eval()
    assert_matches_paper(block, torch.randn(2, 6, *SIZES[dims], dtype=torch.float64, requires_grad=True))


def assert_matches_paper(block, x):
    """Output and the gradients of x and every parameter against explicit_block (fp64)."""
    out = block(x)
    expected = explicit_block(block, x)
    torch.testing.assert_close(out, expected)
    params = [x] + list(block.parameters())
    grad_out = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, params, grad_out), torch.autograd.grad(expected, params, grad_out))


@pytest.mark.parametrize("mode", MODES)
def test_backends_agree_train_mode(mode):
    """Default backend (C++ kernel) vs the reference backend, in training mode (batch statistics);
    float64 because BatchNorm's division by the batch std amplifies fp32 rounding in the gradients."""
    block = randomize(NonLocalBlock(16, mode=mode)).double().train()
    x = torch.randn(2, 16, 4, 10, 10, dtype=torch.float64, requires_grad=True)
    results = []
    for backend in ("auto", "reference"):
        with fastvid.backend(backend):
            out = block(x)
            results.append([out, *torch.autograd.grad(out.square().sum(), [x, *block.parameters()])])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        NonLocalBlock(8, mode="softmax")
    with pytest.raises(ValueError, match="dims"):
        NonLocalBlock(8, dims=4)
    with pytest.raises(ValueError, match=r"expected input \[B, 8"):
        NonLocalBlock(8)(torch.randn(2, 8, 4, 4))
    # like nn.Conv3d, no silent cast of the input to the parameters' dtype (outside autocast)
    with pytest.raises(RuntimeError, match="input x has dtype torch.float64 but the parameters have dtype torch.float32"):
        NonLocalBlock(8)(torch.randn(2, 8, 2, 4, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="input x has dtype torch.bfloat16"):
        NonLocalBlock(8)(torch.randn(2, 8, 2, 4, 4, dtype=torch.bfloat16))
    # a map smaller than the key pool's window: the block's own message, before PyTorch's pooling error
    for block, x in ((NonLocalBlock(8), torch.randn(2, 8, 4, 1, 1)), (NonLocalBlock(8, dims=1), torch.randn(2, 8, 1)),
                     (NonLocalBlock(8, pool_size=2), torch.randn(2, 8, 1, 4, 4))):
        for requires_grad in (False, True):
            with pytest.raises(ValueError, match=r"sub_sample max-pools the keys with window \(.*\), larger than"):
                block(x.requires_grad_(requires_grad))
    assert NonLocalBlock(8)(torch.randn(2, 8, 1, 2, 2)).shape == (2, 8, 1, 2, 2)  # the window itself fits
    assert NonLocalBlock(8, sub_sample=False)(torch.randn(2, 8, 4, 1, 1)).shape == (2, 8, 4, 1, 1)


# ======================================================================================= drop-in conversion
class PytorchvideoStyleNonLocal(nn.Module):
    """A nonlocal layer laid out as pytorchvideo lays out its NonLocal: conv_theta/phi/g/out, a pool on x
    before φ and g, a norm on the output, 'softmax' (scores · inter^-0.5) or 'dot_product'."""

    def __init__(self, dim, dim_inner, pool_size=(1, 2, 2), instantiation="softmax"):
        super().__init__()
        self.conv_theta = nn.Conv3d(dim, dim_inner, 1)
        self.conv_phi = nn.Conv3d(dim, dim_inner, 1)
        self.conv_g = nn.Conv3d(dim, dim_inner, 1)
        self.conv_out = nn.Conv3d(dim_inner, dim, 1)
        self.pool = nn.MaxPool3d(pool_size, stride=pool_size) if pool_size is not None else None
        self.norm = nn.BatchNorm3d(dim)
        self.instantiation = instantiation

    def forward(self, x):
        B, C, T, H, W = x.shape
        inner = self.conv_theta.out_channels
        theta = self.conv_theta(x).reshape(B, inner, -1)
        pooled = self.pool(x) if self.pool is not None else x
        phi = self.conv_phi(pooled).reshape(B, inner, -1)
        g = self.conv_g(pooled).reshape(B, inner, -1)
        affinity = torch.einsum("bct,bcp->btp", theta, phi)
        if self.instantiation == "softmax":
            affinity = torch.softmax(affinity * inner ** -0.5, dim=2)
        else:
            affinity = affinity / affinity.shape[2]
        y = torch.einsum("btp,bcp->bct", affinity, g).reshape(B, inner, T, H, W)
        return x + self.norm(self.conv_out(y))


class StandaloneStyleNonLocal(nn.Module):
    """A nonlocal block as the standalone PyTorch ports write it: g/theta/phi convs, sub-sampling by
    Sequential(conv, max-pool) on g and phi, W = Sequential(conv, BN) with BN zero-initialised,
    attention by explicit matrices; `kind` selects the pairwise function."""

    def __init__(self, in_channels, kind="embedded_gaussian", sub_sample=True, dims=3):
        super().__init__()
        conv, pool, bn = {1: (nn.Conv1d, nn.MaxPool1d(2), nn.BatchNorm1d),
                          2: (nn.Conv2d, nn.MaxPool2d((2, 2)), nn.BatchNorm2d),
                          3: (nn.Conv3d, nn.MaxPool3d((1, 2, 2)), nn.BatchNorm3d)}[dims]
        self.kind, self.inter_channels = kind, max(1, in_channels // 2)
        self.g = conv(in_channels, self.inter_channels, 1)
        self.W = nn.Sequential(conv(self.inter_channels, in_channels, 1), bn(in_channels))
        nn.init.zeros_(self.W[1].weight)
        nn.init.zeros_(self.W[1].bias)
        if kind != "gaussian":
            self.theta = conv(in_channels, self.inter_channels, 1)
            self.phi = conv(in_channels, self.inter_channels, 1)
        if kind == "concatenation":
            self.concat_project = nn.Sequential(nn.Conv2d(self.inter_channels * 2, 1, 1, bias=False), nn.ReLU())
        if sub_sample:
            self.g = nn.Sequential(self.g, pool)
            if kind != "gaussian":
                self.phi = nn.Sequential(self.phi, pool)
            else:
                self.phi = pool

    def forward(self, x):
        b = x.shape[0]
        g_x = self.g(x).view(b, self.inter_channels, -1).permute(0, 2, 1)
        if self.kind == "gaussian":
            theta_x = x.view(b, x.shape[1], -1).permute(0, 2, 1)
            phi_x = (self.phi(x) if hasattr(self, "phi") else x).view(b, x.shape[1], -1)
            f = torch.softmax(torch.matmul(theta_x, phi_x), dim=-1)
        elif self.kind == "concatenation":
            theta_x = self.theta(x).view(b, self.inter_channels, -1, 1)
            phi_x = self.phi(x).view(b, self.inter_channels, 1, -1)
            n, m = theta_x.shape[2], phi_x.shape[3]
            pairs = torch.cat([theta_x.repeat(1, 1, 1, m), phi_x.repeat(1, 1, n, 1)], dim=1)
            f = self.concat_project(pairs).view(b, n, m) / m
        else:
            theta_x = self.theta(x).view(b, self.inter_channels, -1).permute(0, 2, 1)
            phi_x = self.phi(x).view(b, self.inter_channels, -1)
            f = torch.matmul(theta_x, phi_x)
            f = torch.softmax(f, dim=-1) if self.kind == "embedded_gaussian" else f / f.shape[-1]
        y = torch.matmul(f, g_x).permute(0, 2, 1).contiguous().view(b, self.inter_channels, *x.shape[2:])
        return self.W(y) + x


def _check_converted(model, x, expected_mode=None):
    """float64, so that BatchNorm in training mode does not amplify rounding differences."""
    model, x = model.double(), x.double()
    converted = fastvid.convert(model)
    blocks = [m for m in converted.modules() if isinstance(m, NonLocalBlock)]
    assert blocks, "no NonLocalBlock after convert"
    if expected_mode is not None:
        assert {b.mode for b in blocks} == {expected_mode}
    assert converted.training == model.training
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, out_converted = model(x1), converted(x2)
    torch.testing.assert_close(out_converted, out)
    grad = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out_converted, x2, grad)[0], torch.autograd.grad(out, x1, grad)[0])
    # Same parameter values under the conversion (state dict values compared by value).
    assert sorted(p.numel() for p in converted.parameters()) == sorted(p.numel() for p in model.parameters())
    return converted


@pytest.mark.parametrize("instantiation,mode", [("softmax", "embedded_gaussian"), ("dot_product", "dot_product")])
@pytest.mark.parametrize("pool_size", [(1, 2, 2), None])
def test_convert_pytorchvideo_style(instantiation, mode, pool_size):
    model = nn.Sequential(nn.Conv3d(3, 8, 1), PytorchvideoStyleNonLocal(8, 4, pool_size, instantiation), nn.ReLU())
    randomize(model[1])
    converted = _check_converted(model.eval(), torch.randn(2, 3, 3, 6, 6), mode)
    conv_theta = model[1].conv_theta
    assert converted[1].theta is not conv_theta  # convert copies by default
    inplace = fastvid.convert(model, inplace=True)
    assert inplace is model and isinstance(model[1], NonLocalBlock) and model[1].theta is conv_theta


@pytest.mark.parametrize("instantiation", ["softmax", "dot_product"])
@pytest.mark.parametrize("pool_size", [(1, 2, 2), (2, 2, 2)])
def test_convert_accepts_wide_blocks_with_batch_norm(instantiation, pool_size):
    """The 512-channel blocks of Nonlocal I3D (res3), freshly initialised, convert: the probe compared fp32 outputs
    with a fixed tolerance, which their BatchNorm on batch statistics (training mode) amplified rounding past
    (~4e-5 of outputs ~10: pytorchvideo's create_nonlocal blocks stayed native, with a warning that their output
    differs). It compares in float64 now."""
    torch.manual_seed(0)
    block = PytorchvideoStyleNonLocal(512, 256, pool_size, instantiation)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = fastvid.convert(block)
    assert isinstance(converted, NonLocalBlock)
    x = torch.randn(2, 512, 2, 4, 4, dtype=torch.float64)
    block.double(), converted.double()
    for training in (False, True):
        block.train(training), converted.train(training)
        expected = block(x)
        torch.testing.assert_close(converted(x), expected, rtol=0, atol=1e-12 * expected.abs().max().item())


class Float32SoftmaxNonLocal(StandaloneStyleNonLocal):
    """A standalone block whose forward takes its softmax in float32 (the autocast-safe habit): it does not run
    in float64."""

    def forward(self, x):
        b = x.shape[0]
        g_x = self.g(x).view(b, self.inter_channels, -1).permute(0, 2, 1)
        theta_x = self.theta(x).view(b, self.inter_channels, -1).permute(0, 2, 1)
        f = torch.softmax(theta_x @ self.phi(x).view(b, self.inter_channels, -1), -1, dtype=torch.float32)
        y = (f @ g_x).permute(0, 2, 1).reshape(b, self.inter_channels, *x.shape[2:])
        return self.W(y) + x


def test_convert_probes_a_block_that_does_not_run_in_float64_in_float32():
    """The probe runs in float64 where the block's own code does (a fixed fp32 tolerance refused wide blocks); a
    block that raises there ("expected scalar type Double but found Float") is probed in float32 instead: it
    converts, as before the float64 probe, and matches in both modes."""
    block = randomize(Float32SoftmaxNonLocal(8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = fastvid.convert(block)
    assert isinstance(converted, NonLocalBlock) and converted.mode == "embedded_gaussian"
    x = torch.randn(2, 8, *SIZES[3])
    for training in (False, True):
        block.train(training), converted.train(training)
        torch.testing.assert_close(converted(x), block(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("kind", MODES)
def test_convert_standalone_style(kind, dims):
    block = randomize(StandaloneStyleNonLocal(8, kind=kind, dims=dims))
    _check_converted(block.eval(), torch.randn(2, 8, *SIZES[dims]), kind)
    _check_converted(block.train(), torch.randn(2, 8, *SIZES[dims]), kind)


def test_convert_keeps_a_parametrized_conv_live():
    """A weight-normed θ conv (torch.nn.utils.parametrize makes its class a subclass of nn.Conv3d) converts
    (before: the converter raised KeyError on the class): the block shares the conv and reads its weight
    every call, so the parametrization stays live."""
    model = nn.Sequential(randomize(PytorchvideoStyleNonLocal(8, 4))).eval()
    nn.utils.parametrizations.weight_norm(model[0].conv_theta, "weight")
    x = torch.randn(2, 8, 2, 4, 4, dtype=torch.float64)
    converted = _check_converted(model, x, "embedded_gaussian")
    before = converted(x)
    with torch.no_grad():  # the norm g of the weight, in both models
        for block_theta in (model[0].conv_theta, converted[0].theta):
            block_theta.parametrizations.weight.original0.mul_(1.5)
    after = converted(x)
    torch.testing.assert_close(after, model(x))
    assert not torch.allclose(after, before)


def test_convert_warns_of_hooks_inside_a_replaced_block():
    """A hook on the converted block itself carries over; one on a part of it (its θ conv, computed inside
    the fused op) may not run, and a warning names it."""
    model = nn.Sequential(randomize(PytorchvideoStyleNonLocal(8, 4))).eval()
    seen = []
    model[0].register_forward_hook(lambda m, args, out: seen.append("block"))
    model[0].conv_theta.register_forward_hook(lambda m, args, out: seen.append("theta"))
    with pytest.warns(RuntimeWarning, match=r"hooks registered on 0\.conv_theta may not run"):
        converted = fastvid.convert(model)
    assert isinstance(converted[0], NonLocalBlock)
    converted(torch.randn(2, 8, 2, 4, 4))
    assert "block" in seen


def test_convert_warns_of_forward_arguments_the_block_drops():
    """A hand-written block whose forward takes more than the input (the popular standalone port's
    forward(x, return_nl_map=False)) converts, being probed on forward(x), with a warning naming the
    argument: a call that passes it raises TypeError (before: no warning)."""
    class WithMap(StandaloneStyleNonLocal):
        def forward(self, x, return_nl_map=False):
            return super().forward(x)

    model = nn.Sequential(randomize(WithMap(8))).eval()
    with pytest.warns(RuntimeWarning, match=r"0 \(WithMap\) became a NonLocalBlock, whose forward does not take its "
                                            r"argument\(s\) return_nl_map=False"):
        converted = fastvid.convert(model)
    x = torch.randn(2, 8, 2, 4, 4)
    torch.testing.assert_close(converted(x), model(x))
    with pytest.raises(TypeError, match="return_nl_map"):
        converted[0](x, return_nl_map=True)


@pytest.mark.parametrize("make,dims", [(lambda: StandaloneStyleNonLocal(8, kind="embedded_gaussian"), 3),
                                       (lambda: StandaloneStyleNonLocal(8, kind="concatenation"), 3),
                                       (lambda: StandaloneStyleNonLocal(8, kind="gaussian", dims=2), 2),
                                       (lambda: PytorchvideoStyleNonLocal(8, 4), 3)],
                         ids=["standalone_embedded", "standalone_concatenation", "standalone_gaussian_2d", "pytorchvideo"])
def test_converted_block_keeps_the_checkpoint_keys(make, dims):
    """A converted hand-written block keeps the original's state-dict keys, their order and shapes (W.0.weight, not
    out.weight), so a native checkpoint loads into a freshly converted model with strict=True and a converted
    model's checkpoint into the native one, also through to='reference' (before: strict=True raised and
    strict=False silently left the block at its fresh init, the identity). All parameters stay shared with the
    original under inplace=True (the concatenation weight was a reshaped copy an optimizer lost)."""
    torch.manual_seed(0)
    native = nn.Sequential(nn.Conv3d(3, 8, 1) if dims == 3 else nn.Conv2d(3, 8, 1), randomize(make())).eval()
    x = torch.randn(2, 3, *SIZES[dims])
    checkpoint = native.state_dict()
    fresh = fastvid.convert(nn.Sequential(native[0].__class__(3, 8, 1), make())).eval()
    assert isinstance(fresh[1], NonLocalBlock)
    # in the original's order too (the renamed keys came last: code that zips two checkpoints, or diffs them)
    assert [(k, v.shape) for k, v in fresh.state_dict().items()] == [(k, v.shape) for k, v in checkpoint.items()]
    fresh.load_state_dict(checkpoint)  # strict
    torch.testing.assert_close(fresh(x), native(x))
    for converted in (fresh, fastvid.convert(fresh, to="reference")):
        back = nn.Sequential(native[0].__class__(3, 8, 1), make()).eval()
        back.load_state_dict(converted.state_dict())  # strict
        torch.testing.assert_close(back(x), native(x))
    parameters = list(native.parameters())
    inplace = fastvid.convert(native, inplace=True)
    assert isinstance(inplace[1], NonLocalBlock)
    assert {id(p) for p in inplace.parameters()} == {id(p) for p in parameters}


def test_convert_keeps_other_layers_and_shares_weights_inplace():
    model = nn.Sequential(
        nn.Conv3d(4, 8, 1),
        StandaloneStyleNonLocal(8, sub_sample=False),
        nn.Conv3d(8, 8, 3, padding=1, groups=8),  # depthwise: converted too
        nn.Conv3d(8, 8, 3, padding=1),           # dense: untouched
    )
    randomize(model)
    conv_theta = model[1].theta
    converted = fastvid.convert(model, inplace=True)
    assert isinstance(converted[1], NonLocalBlock) and converted[1].theta is conv_theta
    assert isinstance(converted[2], fastvid.nn.DepthwiseConv3d)
    assert type(converted[3]) is nn.Conv3d


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_convert_low_precision_model(dtype):
    """A bf16/fp16 model converts too (the probe compares in fp32 on copies) and keeps its dtype."""
    model = nn.Sequential(randomize(StandaloneStyleNonLocal(8))).to(dtype).eval()
    converted = fastvid.convert(model)
    assert isinstance(converted[0], NonLocalBlock) and converted[0].g.weight.dtype == dtype
    assert model[0].g[0].weight.dtype == dtype  # the original is untouched


@requires_cuda
def test_convert_cuda_model_under_default_tf32():
    """A CUDA model converts with PyTorch's default TF32 convolutions on (the suite turns them off): the
    probe compares on CPU copies. Probing on the GPU, cuDNN's TF32 1x1 convolutions put the original
    ~1e-3 from every candidate and nothing converted (seen on an H200)."""
    model = nn.Sequential(randomize(StandaloneStyleNonLocal(64))).cuda().eval()
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
        converted = fastvid.convert(model)
    assert isinstance(converted[0], NonLocalBlock) and converted[0].g.weight.is_cuda


def test_not_converted_when_the_function_differs():
    """A block with the standalone layout whose forward does something else is left alone: the probe
    compares outputs, not just attribute names."""
    class Impostor(StandaloneStyleNonLocal):
        def forward(self, x):
            return super().forward(x) * 2

    model = randomize(Impostor(8))
    with pytest.warns(RuntimeWarning, match=r"\(Impostor\) left unconverted: .* it has a nonlocal block's parts, "
                                            r"but its output differs"):
        assert type(fastvid.convert(model)) is Impostor


@pytest.mark.parametrize("style", ["standalone", "pytorchvideo"])
def test_convert_keeps_the_parameter_order(style):
    """The standalone ports register g before theta and phi; NonLocalBlock registered theta first. An
    optimizer state saved from the native model (moments paired with parameters by position) then gave
    theta g's moments on the converted one, silently: the shapes agree."""
    block = StandaloneStyleNonLocal(8) if style == "standalone" else PytorchvideoStyleNonLocal(8, 4, (1, 2, 2), "softmax")
    model = nn.Sequential(nn.Conv3d(3, 8, 1), randomize(block))
    converted = fastvid.convert(model)
    assert isinstance(converted[1], NonLocalBlock)
    ours, native = list(converted.parameters()), list(model.parameters())
    assert len(ours) == len(native) and all(torch.equal(a, b) for a, b in zip(ours, native))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3, 2, 4, 4)).square().sum().backward()
    optimizer.step()
    resumed = torch.optim.Adam(converted.parameters())
    resumed.load_state_dict(optimizer.state_dict())
    for p, q in zip(converted.parameters(), model.parameters()):
        assert torch.equal(resumed.state[p]["exp_avg"], optimizer.state[q]["exp_avg"])


def test_not_converted_with_a_parameter_the_block_has_no_use_for():
    """A learned residual gain (x + gamma (z - x)) matches NonLocalBlock at its initial value 1, so the
    probe passed and the block was converted with gamma dropped: a native checkpoint then failed to
    load (strict) or loaded with gamma ignored. Now such a block stays native with a warning naming it."""
    class WithGain(StandaloneStyleNonLocal):
        def __init__(self, in_channels):
            super().__init__(in_channels)
            self.gamma = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return x + self.gamma * (super().forward(x) - x)

    block = randomize(WithGain(8)).eval()
    with torch.no_grad():
        block.gamma.fill_(1.0)
    model = nn.Sequential(block, nn.Conv3d(8, 8, 3, padding=1, groups=8))
    with pytest.warns(RuntimeWarning, match=r"0 \(WithGain\) left unconverted: its gamma would be lost"):
        converted = fastvid.convert(model)
    assert type(converted[0]) is WithGain and type(converted[1]) is fastvid.nn.DepthwiseConv3d
    converted.load_state_dict(model.state_dict(), strict=True)


def test_not_converted_with_a_dropout_inside():
    """A dropout on the attention map changes only the training-mode output: the probe, in eval mode
    only, passed and the dropout was dropped. The probe runs in training mode too now; convert leaves
    the caller's random stream as it was (it drew from it: the replacements' initial weights, the probe)."""
    class WithDropout(StandaloneStyleNonLocal):
        def __init__(self, in_channels):
            super().__init__(in_channels)
            self.dropout = nn.Dropout(0.5)

        def forward(self, x):  # the embedded-gaussian block, dropout on the attention map
            b = x.shape[0]
            g_x = self.g(x).view(b, self.inter_channels, -1).permute(0, 2, 1)
            theta_x = self.theta(x).view(b, self.inter_channels, -1).permute(0, 2, 1)
            f = self.dropout(torch.softmax(torch.matmul(theta_x, self.phi(x).view(b, self.inter_channels, -1)), -1))
            y = torch.matmul(f, g_x).permute(0, 2, 1).contiguous().view(b, self.inter_channels, *x.shape[2:])
            return self.W(y) + x

    model = randomize(WithDropout(8))
    state = torch.random.get_rng_state()
    with pytest.warns(RuntimeWarning, match=r"\(WithDropout\) left unconverted: .* its output differs"):
        assert type(fastvid.convert(model)) is WithDropout
    assert torch.equal(torch.random.get_rng_state(), state)


def test_probe_that_raises_is_reported_with_the_module_name():
    """A block laid out like a nonlocal block whose forward cannot run the probe input (here it needs a
    fixed spatial size) is left native with a warning naming it, instead of a silent "no match"; the
    rest of the model still converts."""
    class FixedSize(StandaloneStyleNonLocal):
        def forward(self, x):
            if x.shape[-1] != 8:
                raise ValueError(f"this block expects W = 8, got {x.shape[-1]}")
            return super().forward(x)

    model = nn.Sequential(nn.Conv3d(4, 8, 1), nn.Sequential(FixedSize(8), nn.Conv3d(8, 8, 3, padding=1, groups=8)))
    with pytest.warns(RuntimeWarning, match=r"fastvid.convert: 1.0 \(FixedSize\) left unconverted: the "
                                            r"nonlocal_block converter raised RuntimeError: the probe input raised "
                                            r"\(embedded_gaussian: ValueError: this block expects W = 8"):
        converted = fastvid.convert(model)
    assert type(converted[1][0]) is FixedSize and isinstance(converted[1][1], fastvid.nn.DepthwiseConv3d)
    x = torch.randn(2, 4, 2, 4, 8)
    torch.testing.assert_close(converted(x), model(x))


@pytest.mark.parametrize("pool_before", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_convert_to_reference(mode, pool_before):
    """NonLocalBlock -> its plain-PyTorch twin: same parameters (shared), same outputs and gradients."""
    from fastvid.convert_reference import ReferenceNonLocalBlock
    block = randomize(NonLocalBlock(6, 4, mode=mode, scale=0.7, pool_before_projection=pool_before).double()).train()
    twin = fastvid.convert(block, inplace=False, to="reference")
    assert isinstance(twin, ReferenceNonLocalBlock)
    assert list(twin.state_dict()) == list(block.state_dict())
    x = torch.randn(2, 6, 3, 6, 8, dtype=torch.float64, requires_grad=True)
    out, out_twin = block(x), twin(x)
    torch.testing.assert_close(out_twin, out)
    torch.testing.assert_close(torch.autograd.grad(out_twin.sum(), x)[0], torch.autograd.grad(out.sum(), x)[0])


# ======================================================================================= temporal attention
@pytest.mark.parametrize("score", ["dot", "general", "concat"])
@pytest.mark.parametrize("single_query", [True, False])
def test_temporal_attention_matches_luong_scores(score, single_query):
    from fastvid.nn import TemporalAttention
    torch.manual_seed(0)
    Dq = 6
    Dk = Dq if score == "dot" else 5
    attention = TemporalAttention(Dq, Dk, score=score, attention_dim=4).double()
    query = torch.randn(3, Dq, dtype=torch.float64) if single_query else torch.randn(3, 2, Dq, dtype=torch.float64)
    keys = torch.randn(3, 7, Dk, dtype=torch.float64, requires_grad=True)
    values = torch.randn(3, 7, 4, dtype=torch.float64)
    q = query if not single_query else query[:, None]
    if score == "dot":
        scores = torch.einsum("bnd,btd->bnt", q, keys)
    elif score == "general":
        scores = torch.einsum("bnd,de,bte->bnt", q, attention.weight, keys)
    else:
        hidden = torch.tanh((q @ attention.query_proj.weight.T)[:, :, None]
                            + (keys @ attention.key_proj.weight.T + attention.key_proj.bias)[:, None])
        scores = hidden @ attention.score_vector
    expected_weights = torch.softmax(scores, dim=-1)
    expected = expected_weights @ values
    if single_query:
        expected, expected_weights = expected[:, 0], expected_weights[:, 0]
    context, weights = attention(query, keys, values, return_weights=True)
    torch.testing.assert_close(context, expected)
    torch.testing.assert_close(weights, expected_weights)
    fast = attention(query, keys, values)  # the kernel path for dot/general
    torch.testing.assert_close(fast, expected)
    torch.testing.assert_close(torch.autograd.grad(fast.sum(), keys)[0], torch.autograd.grad(expected.sum(), keys)[0])


@pytest.mark.parametrize("score", ["dot", "general", "concat"])
def test_temporal_attention_under_autocast(score):
    """Under bf16 autocast (fp32 module and inputs) every score runs and trains: the context in bf16 by the
    flash rule against the fp64 Luong formula on the values autocast rounds (query, keys, W), with that
    formula's result rounded to bf16 as yardstick. ('general' raised "q, k, v must share a dtype": its
    query projection ran in bf16, keys and values stayed fp32.)"""
    from fastvid.nn import TemporalAttention
    torch.manual_seed(0)
    Dk = 6 if score == "dot" else 5
    attention = TemporalAttention(6, Dk, score=score, attention_dim=4)
    query, keys = torch.randn(3, 2, 6), torch.randn(3, 7, Dk, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        context = attention(query, keys)
    context.float().sum().backward()
    assert context.dtype == torch.bfloat16 and keys.grad is not None and torch.isfinite(keys.grad).all()
    if score == "concat":  # Bahdanau's MLP: its rounding points are PyTorch's own ops, checked above for running
        return
    q = query.bfloat16().double()
    if score == "general":
        q = (q @ attention.weight.detach().bfloat16().double()).bfloat16().double()  # the projection, in bf16
    k = keys.detach().bfloat16().double()
    expected = torch.softmax(q @ k.transpose(1, 2), dim=-1) @ k
    assert_low_precision(context, expected, torch.bfloat16, f"TemporalAttention({score}) under autocast")


def test_temporal_attention_bad_arguments():
    from fastvid.nn import TemporalAttention
    with pytest.raises(ValueError, match="score"):
        TemporalAttention(4, score="additive")
    with pytest.raises(ValueError, match="query_dim == key_dim"):
        TemporalAttention(4, 5, score="dot")
    with pytest.raises(ValueError, match="expected query"):
        TemporalAttention(4)(torch.randn(2, 5), torch.randn(2, 3, 4))
    # values of another shape than [B, T, Dv] are refused whether or not the weights are returned (a [T, Dv]
    # broadcast through the weights' matmul but not through the kernel)
    for return_weights in (True, False):
        with pytest.raises(ValueError, match=r"values must be \[B, T, Dv\] with B, T = \(3, 5\) as keys, got \(5, 4\)"):
            TemporalAttention(4)(torch.randn(3, 2, 4), torch.randn(3, 5, 4), torch.randn(5, 4), return_weights=return_weights)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_folded_batch_norm_matches_nn_batchnorm(momentum, dtype):
    """The block folds its BatchNorm into the output projection (batch statistics from y's mean and
    covariance). Against nn.BatchNorm3d on z = out(y), in training mode over two steps: outputs,
    gradients, running mean/var and the batch counter agree; then in eval mode."""
    block = randomize(NonLocalBlock(12, 6)).to(dtype)
    block.norm.momentum = momentum
    norm = copy.deepcopy(block.norm)
    tol = {} if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    for step, train in enumerate((True, True, False)):
        block.train(train), norm.train(train)
        x = (torch.randn(2, 12, 3, 6, 8, dtype=dtype) * 2 + 1).requires_grad_()
        out = block(x)
        z = block.out(block.attend(x).transpose(1, 2).reshape(2, 6, 3, 6, 8))
        expected = x + norm(z)
        torch.testing.assert_close(out, expected, **tol)
        grad = torch.randn_like(out)
        params = [x, block.out.weight, block.theta.weight]
        torch.testing.assert_close(torch.autograd.grad(out, params + [block.norm.weight], grad),
                                   torch.autograd.grad(expected, params + [norm.weight], grad), **tol)
        torch.testing.assert_close(block.norm.running_mean, norm.running_mean, **tol)
        torch.testing.assert_close(block.norm.running_var, norm.running_var, **tol)
        assert int(block.norm.num_batches_tracked) == int(norm.num_batches_tracked)


@pytest.mark.parametrize("sub_sample", [True, False])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_empty_batch_as_nn_batchnorm(mode, train, sub_sample):
    """A batch of 0 clips: an empty output, zero gradients for every parameter, and the BatchNorm as
    nn.BatchNorm3d leaves it (in training the batch counted, the running statistics untouched; before,
    they became NaN and the max-pool's backward raised). The reference twin does the same."""
    block = randomize(NonLocalBlock(8, 4, mode, sub_sample=sub_sample)).double().train(train)
    twin = fastvid.convert(copy.deepcopy(block), to="reference")
    native_norm = copy.deepcopy(block.norm)
    native_norm(torch.randn(0, 8, 3, 6, 8, dtype=torch.float64))
    x = torch.randn(0, 8, 3, 6, 8, dtype=torch.float64, requires_grad=True)
    for module in (block, twin):
        out = module(x)
        assert out.shape == x.shape
        out.sum().backward()
        for name, p in module.named_parameters():
            assert p.grad is not None and not p.grad.any(), name
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(module.norm, name), getattr(native_norm, name)), name


def test_training_on_one_value_per_channel_raises_as_nn_batchnorm():
    """One position of one clip has no batch variance: nn.BatchNorm raises in training, so does the block
    (before: it returned x + β and pulled running_var towards 0); in eval mode it runs."""
    block = randomize(NonLocalBlock(4, 2, sub_sample=False, dims=1))
    x = torch.randn(1, 4, 1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        nn.BatchNorm1d(4).train()(x)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        block.train()(x)
    torch.testing.assert_close(block.eval()(x), explicit_block(block, x))


@pytest.mark.parametrize("kwargs,match", [
    (dict(inter_channels=0), "inter_channels must be positive, got 0"),
    (dict(pool_size=0), "pool_size must be one int or 3 ints, each >= 1, got 0"),
    (dict(pool_size=()), "pool_size must be one int or 3 ints"),
    (dict(pool_size=(2, 2)), "pool_size must be one int or 3 ints"),
    (dict(mode="dot_product", save_scores=True), "save_scores applies to the softmax modes"),
    (dict(mode="concatenation", save_scores=True), "save_scores applies to the softmax modes"),
])
def test_bad_constructor_arguments(kwargs, match):
    """inter_channels = 0 and a pool_size of the wrong length failed at the first call inside the pooling;
    pool_size = 0 or () silently meant the default window."""
    with pytest.raises(ValueError, match=re.escape(match) if "(" in match else match):
        NonLocalBlock(8, **kwargs)



def test_save_scores_must_be_a_bool():
    with pytest.raises(TypeError, match="save_scores must be a bool, got str"):
        NonLocalBlock(8, save_scores="yes")


def test_save_scores_set_later_on_a_mode_without_scores_raises():
    block = NonLocalBlock(8, mode="dot_product")
    block.save_scores = True  # (was silently ignored)
    with pytest.raises(ValueError, match="save_scores applies to the softmax modes"):
        block(torch.randn(1, 8, 2, 4, 4))


@pytest.mark.parametrize("mode", ["embedded_gaussian", "gaussian"])
def test_save_scores_trains_as_the_paper_block(mode):
    """save_scores=True: output and every gradient against the paper's equations (fp64), and in training
    mode the block with save_scores=False gives the same bits in fp32."""
    block = randomize(NonLocalBlock(6, 4, mode=mode, scale=0.6, save_scores=True).double()).eval()
    x = torch.randn(2, 6, 3, 6, 8, dtype=torch.float64, requires_grad=True)
    assert_matches_paper(block, x)
    assert "save_scores=True" in repr(block)
    grad_out = torch.randn(x.shape, dtype=torch.float64)

    runs = []
    for save in (True, False):
        fp32 = randomize(NonLocalBlock(6, 4, mode=mode, scale=0.6, save_scores=save)).train()
        y = x.detach().float().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            out = fp32(y)
        assert ((2, 3 * 6 * 8, 3 * 3 * 4) in saved) == save  # the scores [B, N, M] (φ pooled (1, 2, 2))
        runs.append([out, *torch.autograd.grad(out, [y, *fp32.parameters()], grad_out.float())])
    for saved, recomputed in zip(*runs):
        assert torch.equal(saved, recomputed)


def test_eval_outputs_do_not_depend_on_the_other_samples():
    """With running statistics each sample's output is its own, as with nn.BatchNorm in eval: the fold
    centred y on the batch's mean, so a NaN in one clip made every other clip's output NaN, and a clip of
    large values cost the others fp32 precision (3e-2 off at 1e6)."""
    block = randomize(NonLocalBlock(8, 4)).eval()
    x = torch.randn(3, 8, 2, 6, 6)
    alone = block(x[:1])
    for other in (torch.full_like(x[1:], float("nan")), x[1:] * 1e6):
        together = block(torch.cat([x[:1], other]))
        torch.testing.assert_close(together[:1], alone, rtol=1e-6, atol=1e-6)


def test_a_batchnorm_subclass_runs_its_own_forward():
    """The BatchNorm was folded into the output projection whenever it was a _BatchNorm, so a subclass's
    forward (SyncBatchNorm's statistics across processes; here a clamp) was skipped silently. Only
    PyTorch's own BatchNorm1d/2d/3d are folded; against the plain-module twin, in training and eval."""
    class ClampedBatchNorm3d(nn.BatchNorm3d):
        def forward(self, z):
            return super().forward(z).clamp(-0.1, 0.1)

    block = NonLocalBlock(8, 4)
    block.norm = ClampedBatchNorm3d(8)
    randomize(block)
    twin = fastvid.convert(copy.deepcopy(block), to="reference")
    x = torch.randn(2, 8, 2, 6, 6)
    for train in (True, False):
        block.train(train), twin.train(train)
        out = block(x)
        assert (out - x).abs().max() <= 0.1 + 1e-6
        torch.testing.assert_close(out, twin(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["batch", "group", None])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("dims", [2, 3])
def test_channels_last_input_gives_channels_last_output(dims, train, norm):
    """A channels_last(_3d) input keeps its layout through the block, as x + BN(conv(y)) keeps it in
    the twin (the output came back contiguous: every later layer of a channels-last model then ran
    in the other layout); values and gradients as the contiguous input's, against the explicit block."""
    block = randomize(NonLocalBlock(6, 4, dims=dims, norm=norm is not None)).double().train(train)
    if norm == "group":
        block.norm = nn.GroupNorm(2, 6).double()
        randomize(block.norm)
    memory_format = {2: torch.channels_last, 3: torch.channels_last_3d}[dims]
    x = torch.randn(2, 6, *SIZES[dims], dtype=torch.float64).contiguous(memory_format=memory_format)
    x.requires_grad_()
    out = block(x)
    assert out.is_contiguous(memory_format=memory_format)
    x_contiguous = x.detach().contiguous().requires_grad_()
    expected = explicit_block(block, x_contiguous, norm=block.norm)  # the norm in its own mode
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    params = list(block.parameters())
    torch.testing.assert_close(torch.autograd.grad(out, [x] + params, grad),
                               torch.autograd.grad(expected, [x_contiguous] + params, grad))


def _block_with_offset_values(ratio, seed=0):
    """A randomised block whose attention output y has, per channel, mean = ratio × std: a constant
    added to g's bias shifts every softmax-weighted average of g by that constant."""
    block = randomize(NonLocalBlock(8, 4), seed)
    x = torch.randn(2, 8, 4, 14, 14, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        block.g.bias.zero_()
        y = block.attend(x).reshape(-1, 4)
        block.g.bias.copy_(ratio * y.std(0) - y.mean(0))
        y = block.attend(x).reshape(-1, 4)
    assert (y.mean(0) / y.std(0)).min() > ratio / 2  # the premise: channel means dwarf their spread
    return block


def _flash_rule(ours, pytorch, oracle, what):
    """err(ours) <= 2 err(PyTorch in the same precision) + 4 eps·max|oracle| (the rule in DESIGN.md)."""
    ours, pytorch = ours.double(), pytorch.double()
    err, yard = (ours - oracle).abs().max().item(), (pytorch - oracle).abs().max().item()
    atol = 4 * torch.finfo(torch.float32).eps * oracle.abs().max().item()
    assert err <= 2 * yard + atol, f"{what}: error {err:.3g} vs PyTorch's {yard:.3g} (atol {atol:.3g})"


@pytest.mark.parametrize("ratio,autocast", [(100, False), (1000, False), (10, True)])
def test_folded_batch_norm_large_channel_means(ratio, autocast):
    """The folded BatchNorm stays right when y's channel means are large relative to their spread
    (one-pass E[yyᵀ] − μμᵀ statistics cancel there). The block's attention output y (computed once,
    then fed in as a leaf so that only the fold is judged) goes through the block and through
    nn.Conv3d + nn.BatchNorm3d; outputs, gradients (x, y, parameters) and running statistics over two
    training steps and one eval step, against the fp64 computation, judged by PyTorch's own error in
    fp32 (or under bf16 autocast)."""
    block = _block_with_offset_values(ratio)
    block64, norm, norm64 = copy.deepcopy(block).double(), copy.deepcopy(block.norm), copy.deepcopy(block.norm).double()
    generator = torch.Generator().manual_seed(5)
    for step, train in enumerate((True, True, False)):
        for m in (block, block64, norm, norm64):
            m.train(train)
        x = torch.randn(2, 8, 4, 14, 14, generator=generator)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            y = block.attend(x.clone().requires_grad_())  # [B, N, inter]; bf16 under autocast, as in forward
        x, y = x.requires_grad_(), y.detach().requires_grad_()
        x64, y64 = x.detach().double().requires_grad_(), y.detach().double().requires_grad_()

        def unfolded(conv, bn, x, y):
            return x + bn(conv(y.transpose(1, 2).reshape(2, 4, 4, 14, 14)))
        block.attend = lambda _: y
        try:
            with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                ours = block(x)
                pytorch = unfolded(block.out, norm, x, y)
        finally:
            del block.attend
        oracle = unfolded(block64.out, norm64, x64, y64)
        _flash_rule(ours, pytorch, oracle, f"output, step {step}")
        grad = torch.randn(oracle.shape, generator=generator, dtype=torch.float64)
        grads_ours = torch.autograd.grad(ours, [x, y, block.out.weight, block.norm.weight, block.norm.bias],
                                         grad.to(ours.dtype))
        grads_pytorch = torch.autograd.grad(pytorch, [x, y, block.out.weight, norm.weight, norm.bias],
                                            grad.to(pytorch.dtype))
        grads_oracle = torch.autograd.grad(oracle, [x64, y64, block64.out.weight, norm64.weight, norm64.bias], grad)
        for name, a, b, c in zip(["x", "y", "out.weight", "norm.weight", "norm.bias"],
                                 grads_ours, grads_pytorch, grads_oracle):
            _flash_rule(a, b, c, f"grad {name}, step {step}")
        _flash_rule(block.norm.running_mean, norm.running_mean, norm64.running_mean, "running_mean")
        _flash_rule(block.norm.running_var, norm.running_var, norm64.running_var, "running_var")


@pytest.mark.parametrize("mode", ["embedded_gaussian", "gaussian"])
def test_autocast_inference(mode):
    """Under bf16 autocast without autograd the block pools with nn.MaxPool3d, which CPU autocast runs in
    fp32: the pooled keys must come back in the autocast dtype (this raised a dtype mismatch)."""
    block = randomize(NonLocalBlock(8, 4, mode=mode)).eval()
    x = torch.randn(2, 8, 3, 6, 8)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        ours, pytorch = block(x), explicit_block(block, x)
    oracle = explicit_block(copy.deepcopy(block).double(), x.double())
    _flash_rule(ours, pytorch, oracle, "output")



def test_autocast_without_norm_adds_x_at_its_precision():
    """norm=False under bf16 autocast: x + W y + b keeps x in fp32, as PyTorch's x + conv(y) does (before: the
    residual sum ran in bf16 and rounded x itself, 0.25 off at |x| ~ 100). Output and gradients by the rule
    of the flash-attention tests against the paper's equations under the same autocast."""
    block = randomize(NonLocalBlock(8, 4, norm=False, sub_sample=False)).eval()
    reference, block64 = copy.deepcopy(block), copy.deepcopy(block).double()
    x = torch.randn(2, 8, 3, 6, 8) + 100
    x_ours, x_pytorch, x64 = x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16):
        ours, pytorch = block(x_ours), explicit_block(reference, x_pytorch)
    oracle = explicit_block(block64, x64)
    assert ours.dtype == pytorch.dtype == torch.float32
    _flash_rule(ours, pytorch, oracle, "output")
    grad = torch.randn(oracle.shape, dtype=torch.float64)
    g_ours = torch.autograd.grad(ours, [x_ours, block.out.weight], grad.float())
    g_pytorch = torch.autograd.grad(pytorch, [x_pytorch, reference.out.weight], grad.float())
    g_oracle = torch.autograd.grad(oracle, [x64, block64.out.weight], grad)
    for name, a, b, c in zip(["x", "out.weight"], g_ours, g_pytorch, g_oracle):
        _flash_rule(a, b, c, f"grad {name}")


@pytest.mark.parametrize("mode", MODES)
def test_integer_input_raises_under_autocast_too(mode):
    """An integer x is refused with or without autocast (before: under autocast the concatenation mode cast its
    projection weights to int64 and returned wrong numbers)."""
    block = NonLocalBlock(8, 4, mode=mode)
    x = torch.randint(-3, 3, (2, 8, 3, 6, 8))
    for enabled in (False, True):
        with torch.autocast("cpu", torch.bfloat16, enabled=enabled), \
                pytest.raises(RuntimeError, match="input x must be a floating-point tensor, got torch.int64"):
            block(x)


@pytest.mark.parametrize("mode", ["embedded_gaussian", "gaussian"])
def test_autocast_training(mode):
    """Under bf16 autocast with autograd (the projections' backward multiplied fp32 saved inputs by the
    bf16 gradient and raised a dtype mismatch): output and gradients of x and of every parameter against
    the paper's equations run by PyTorch under the same autocast, by the rule of the flash-attention tests.
    Without sub-sampling: in bf16 the pooled windows' argmaxes move with the rounding and reroute the
    gradient in any implementation (PyTorch's own explicit block then misses φ's weight gradient by 12 %),
    so the pooled block is checked for running and returning fp32 gradients only. φ's bias is not judged by
    the rule: softmax is invariant to it, its exact gradient is 0 and what both compute is rounding noise."""
    block = randomize(NonLocalBlock(8, 4, mode=mode, sub_sample=False)).eval()
    reference, block64 = copy.deepcopy(block), copy.deepcopy(block).double()
    x = torch.randn(2, 8, 3, 6, 8)
    x_ours, x_pytorch, x64 = x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16):
        ours, pytorch = block(x_ours), explicit_block(reference, x_pytorch)
    oracle = explicit_block(block64, x64)
    _flash_rule(ours, pytorch, oracle, "output")
    grad = torch.randn(oracle.shape, dtype=torch.float64)
    names = ["x"] + [name for name, _ in block.named_parameters()]
    grads_ours = torch.autograd.grad(ours, [x_ours, *block.parameters()], grad.to(ours.dtype), allow_unused=True)
    grads_pytorch = torch.autograd.grad(pytorch, [x_pytorch, *reference.parameters()], grad.to(pytorch.dtype),
                                        allow_unused=True)
    grads_oracle = torch.autograd.grad(oracle, [x64, *block64.parameters()], grad, allow_unused=True)
    judged = 0
    for name, a, b, c in zip(names, grads_ours, grads_pytorch, grads_oracle):
        if c is None or name == "phi.bias":  # unused in this mode / exactly 0 (above)
            continue
        assert a is not None and a.dtype == torch.float32, f"grad {name}: {None if a is None else a.dtype}"
        _flash_rule(a, b, c, f"grad {name}")
        judged += 1
    assert judged >= 6

    pooled = randomize(NonLocalBlock(8, 4, mode=mode)).train()
    x_pooled = x.clone().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16):
        out = pooled(x_pooled)
    out.float().sum().backward()
    for name, t in [("x", x_pooled), *pooled.named_parameters()]:
        assert t.grad is not None and t.grad.dtype == torch.float32 and t.grad.isfinite().all(), name


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_second_derivatives_raise_on_every_path(mode, train):
    """A gradient penalty through the block: torch.autograd.grad(penalty, inputs=[a weight before it]) returned
    the model's second derivative without the block's terms, silently (PyTorch's once_differentiable hangs its
    error outside the graph, where grad(..., inputs=...) does not go); .backward() raised. Now both raise, and
    the first derivative taken with create_graph=True is the plain one."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(4, 4, 1), randomize(NonLocalBlock(4, 2, mode=mode, sub_sample=False))).double()
    net.train(train)
    x = torch.randn(2, 4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    plain, = torch.autograd.grad((net(x) ** 2).sum(), x)
    gx, = torch.autograd.grad((net(x) ** 2).sum(), x, create_graph=True)
    torch.testing.assert_close(gx, plain, rtol=0, atol=0)
    penalty = (gx ** 2).sum()
    with pytest.raises(RuntimeError, match="second derivatives|double backward is not supported"):
        torch.autograd.grad(penalty, net[0].weight, retain_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives|double backward is not supported"):
        penalty.backward()
