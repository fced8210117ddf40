"""The tolerance rule (tests/_tolerances.py) rejects wrong results: the checks the suite relies on can fail."""
import pytest
import torch
import torch.nn.functional as F

from _tolerances import assert_full_precision, assert_low_precision, eps


def _depthwise_weight_grad(dtype):
    """bf16/fp16 weight gradient of the fastvid kernel for m = 2, channels_last_3d, and its fp64 oracle
    (the case PyTorch's own bf16 run gets wrong, so the old test could not judge it)."""
    x = torch.randn(1, 4, 4, 9, 11, dtype=torch.float64).to(dtype).contiguous(memory_format=torch.channels_last_3d)
    w = (torch.randn(8, 1, 1, 3, 5, dtype=torch.float64) / 3).to(dtype)
    args = ((1, 2, 2), (0, 1, 2), (1, 1, 1))
    go = torch.randn(torch.ops.fastvid.depthwise_conv3d(x, w, None, *args).shape, dtype=torch.float64).to(dtype)
    go = go.contiguous(memory_format=torch.channels_last_3d)
    ours = torch.ops.fastvid.depthwise_conv3d_backward(go, x, w, *args, [False, True, False])[1]
    oracle = torch.nn.grad.conv3d_weight(x.double(), w.shape, go.double(), *args, groups=4)
    return ours, oracle


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_rule_accepts_the_kernel_and_rejects_a_two_ulp_error(dtype):
    ours, oracle = _depthwise_weight_grad(dtype)
    assert_low_precision(ours, oracle, dtype, "kernel")
    wrong = ours.clone()
    i = oracle.abs().argmax()
    wrong.view(-1)[i] += 2.5 * eps(dtype) * oracle.abs().max().item()
    with pytest.raises(AssertionError, match="flash-attention rule"):
        assert_low_precision(wrong, oracle, dtype, "perturbed")


def test_low_precision_rule_refuses_a_garbage_yardstick():
    """The old depthwise check turned PyTorch's garbage bf16 weight gradient (6e36) into a bound of ~1e37."""
    ours, oracle = _depthwise_weight_grad(torch.bfloat16)
    garbage = oracle.bfloat16()
    garbage.view(-1)[0] = 6e36
    with pytest.raises(AssertionError, match="yardstick itself"):
        assert_low_precision(ours, oracle, torch.bfloat16, "kernel", yardstick=garbage)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_low_precision(torch.full_like(ours, float("nan")), oracle, torch.bfloat16, "nan")


def test_full_precision_rule_scales_with_magnitude_and_rejects_a_relative_error():
    x = torch.randn(2, 3, 5, 6, 7)
    w = torch.randn(3, 1, 3, 3, 3)
    oracle = F.conv3d(x.double(), w.double(), None, 1, 1, 1, 3)
    assert_full_precision(F.conv3d(x, w, None, 1, 1, 1, 3), oracle, "fp32 conv")
    with pytest.raises(AssertionError):
        assert_full_precision((oracle * (1 + 1e-4)).float(), oracle, "1e-4 relative error")
