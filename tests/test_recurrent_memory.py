"""What a fastvid ConvLSTM/ConvGRU sequence keeps alive for backward (issue 12, memory below native).

Backward provably needs, besides the call's inputs and the output the user holds, the activated
gates of every step and, for the LSTM, the cell states: per frame 4C values in the input dtype plus C
in the accumulation type (LSTM), 4C in the input dtype (GRU: r, z, n and the hidden conv's n part).
Everything autograd saves for the sequence op is counted (distinct storages, via
saved_tensors_hooks) except the inputs and the returned tensors; that total must not exceed the
bound. Copies of [x_t, h_{t-1}] (the concat workspace), of the output, or gradients of the whole
sequence kept for backward fail it.
"""
import pytest
import torch

import fastvid
from _recurrent_samples import GRU_CONFIGS, LSTM_CONFIGS, make_seq_sample

pytestmark = pytest.mark.skipif(not fastvid.info()["cpu_kernels"], reason="fastvid._C is not built")

ALIGN = 64  # each region of the reserve starts on a 64-byte boundary


def _saved_bytes(run, exclude):
    """(bytes of the distinct storages autograd saves during run() other than those of `exclude` and of
    what run() returns, run()'s result)."""
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outputs = run()
    known = {t.untyped_storage().data_ptr() for t in list(exclude) + list(outputs) if t is not None}
    return sum(n for ptr, n in saved.items() if ptr not in known and n > 0), outputs


def _needed_bytes(kind, x, C, dtype):
    B, T, _, H, W = x.shape
    frames = B * T * H * W
    acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    if kind == "lstm":
        return frames * (4 * C * dtype.itemsize + C * acc.itemsize) + 2 * ALIGN
    return frames * 4 * C * dtype.itemsize + ALIGN


CASES = [(c, s, d, layout) for c in (LSTM_CONFIGS[0], GRU_CONFIGS[0], GRU_CONFIGS[2])
         for s in ("hoisted", "concat") for d in (torch.float32, torch.bfloat16)
         for layout in ("contiguous", "channels_last")]


@pytest.mark.parametrize("config,strategy,dtype,layout", CASES,
                         ids=[f"{c.id()}-{s}-{str(d)[6:]}-{layout}" for c, s, d, layout in CASES])
def test_saved_state_within_what_backward_needs(config, strategy, dtype, layout):
    sample = make_seq_sample(config, dtype=dtype, layout=layout, shape=(2, 5, 3, 4, 6, 7))
    tensors = sample.leaves()
    x = tensors["x"]
    C = tensors["weight_hh"].shape[1]
    nbytes, outputs = _saved_bytes(lambda: sample.run_ops(tensors, strategy), tensors.values())
    needed = _needed_bytes(config.kind, x, C, dtype)
    assert nbytes <= needed, (f"{config.id()} {strategy}: autograd keeps {nbytes} bytes beyond the inputs and outputs, "
                              f"backward needs {needed}")
    # The kept state is enough: backward runs and reaches every input.
    outputs[0].float().square().sum().backward()
    assert all(t.grad is not None for t in tensors.values() if t is not None)


@pytest.mark.parametrize("strategy", ["hoisted", "concat"])
@pytest.mark.parametrize("config", [LSTM_CONFIGS[0], GRU_CONFIGS[2]], ids=lambda c: c.id())
def test_backward_leaves_the_reserve_intact(config, strategy):
    """A second backward through the same graph (retain_graph) gives the same gradients: backward
    reads the reserve and never overwrites it."""
    sample = make_seq_sample(config)
    t = sample.leaves()
    out = sample.run_ops(t, strategy)[0]
    grad = torch.randn_like(out)
    first = torch.autograd.grad(out, t["x"], grad, retain_graph=True)[0]
    second = torch.autograd.grad(out, t["x"], grad)[0]
    assert torch.equal(first, second)
