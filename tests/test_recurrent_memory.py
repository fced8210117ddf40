"""What a fastvid ConvLSTM/ConvGRU sequence keeps alive for backward (issue 12, memory below native).

Backward keeps, besides the call's inputs and the output the user holds, per frame: LSTM the
activated i, f, o (3C, input dtype) and the cell state (C, accumulation type) -- g is recomputed
from [x_t, h_{t-1}] with one C-output conv per chunk, from the g-gate bias kept as one [C] vector --;
GRU r, z, n (3C) -- reset_after's h_n = U_n*h_{t-1} + b_hn is recomputed likewise. Everything
autograd saves for the sequence op is counted (distinct storages, via saved_tensors_hooks) except
the inputs and the returned tensors; that total must not exceed the bound. A fourth gate per frame
(the former 4C cache), copies of [x_t, h_{t-1}] (the concat workspace), of the output, or gradients
of the whole sequence kept for backward fail it.
"""
import pytest
import torch

import fastvid
from _recurrent_samples import GRU_CONFIGS, LSTM_CONFIGS, RECURRENT_ULPS, make_seq_sample
from _tolerances import assert_full_precision

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


def _needed_bytes(kind, x, C, dtype, reset_after=True):
    B, T, _, H, W = x.shape
    frames = B * T * H * W
    acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    if kind == "lstm":  # + the g-gate bias, one [C] vector padded to ALIGN
        return frames * (3 * C * dtype.itemsize + C * acc.itemsize) + 2 * ALIGN + -(-C * dtype.itemsize // ALIGN) * ALIGN
    if reset_after and dtype.itemsize == 2:  # r, z, n and h_n (kept rather than recomputed for 2-byte dtypes)
        return frames * 4 * C * dtype.itemsize + 2 * ALIGN
    return frames * 3 * C * dtype.itemsize + ALIGN


# The three configs are 3x3 with dilation 1, so every strategy (winograd included) runs them.
CASES = [(c, s, d, layout) for c in (LSTM_CONFIGS[0], GRU_CONFIGS[0], GRU_CONFIGS[2])
         for s in ("hoisted", "concat", "winograd") for d in (torch.float32, torch.bfloat16)
         for layout in ("contiguous", "channels_last")]


@pytest.mark.parametrize("config,strategy,dtype,layout", CASES,
                         ids=[f"{c.id()}-{s}-{str(d)[6:]}-{layout}" for c, s, d, layout in CASES])
def test_saved_state_within_what_backward_needs(config, strategy, dtype, layout):
    sample = make_seq_sample(config, dtype=dtype, layout=layout, shape=(2, 5, 3, 4, 6, 7))
    tensors = sample.leaves()
    x = tensors["x"]
    C = tensors["weight_hh"].shape[1]
    nbytes, outputs = _saved_bytes(lambda: sample.run_ops(tensors, strategy), tensors.values())
    needed = _needed_bytes(config.kind, x, C, dtype, config.reset_after)
    assert nbytes <= needed, (f"{config.id()} {strategy}: autograd keeps {nbytes} bytes beyond the inputs and outputs, "
                              f"backward needs {needed}")
    # The kept state is enough: backward runs and reaches every input.
    outputs[0].float().square().sum().backward()
    assert all(t.grad is not None for t in tensors.values() if t is not None)


@pytest.mark.parametrize("strategy", ["hoisted", "concat", "winograd"])
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


@pytest.mark.parametrize("strategy", ["hoisted", "concat"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("config", [LSTM_CONFIGS[0], GRU_CONFIGS[0], GRU_CONFIGS[2]], ids=lambda c: c.id())
def test_lengths_across_chunks_match_each_sample_alone(config, reverse, strategy):
    """Backward rebuilds h_{t-1} chunk by chunk (T = 40: chunks of 2 steps). With lengths in reverse a
    sample's first step t = lengths[b] - 1 starts from h0, also where that step is inside a chunk
    (lengths 18: t = 17, the second step of the chunk [16, 18)). Every output and gradient equals the
    float64 reference run on each sample alone at its length."""
    lengths = [40, 18, 31]
    sample = make_seq_sample(config, reverse=reverse, dtype=torch.float64, shape=(3, 40, 2, 3, 4, 5))
    leaves = sample.leaves()
    kw = dict(padding=None, dilation=config.dilation, reverse=reverse, strategy=strategy,
              lengths=torch.tensor(lengths))
    if config.kind == "lstm":
        got = fastvid.ops.convlstm(leaves["x"], leaves["weight_ih"], leaves["weight_hh"], leaves["bias"],
                                   leaves["h0"], leaves["c0"], leaves["peephole"], **kw)
    else:
        got = fastvid.ops.convgru(leaves["x"], leaves["weight_ih"], leaves["weight_hh"], leaves["bias_ih"],
                                  leaves["bias_hh"], leaves["h0"], reset_after=config.reset_after, **kw)
    gen = torch.Generator().manual_seed(3)
    ups = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in got]
    names = [k for k, v in leaves.items() if v is not None]
    grads = torch.autograd.grad(sum((o * u).sum() for o, u in zip(got, ups)), [leaves[k] for k in names])

    ref_leaves = {k: (v.detach().clone().requires_grad_(True) if v is not None else None) for k, v in leaves.items()}
    loss, expected_out = 0, torch.zeros_like(got[0])
    expected_states = [[] for _ in got[1:]]
    for b, n in enumerate(lengths):
        alone = dict(ref_leaves)
        alone["x"] = ref_leaves["x"][b:b + 1, :n]
        for k in ("h0", "c0"):
            if k in alone:
                alone[k] = ref_leaves[k][b:b + 1]
        outs_b = sample.run_reference(alone)
        loss = loss + (outs_b[0] * ups[0][b:b + 1, :n]).sum()
        loss = loss + sum((s * u[b:b + 1]).sum() for s, u in zip(outs_b[1:], ups[1:]))
        expected_out[b, :n] = outs_b[0][0].detach()
        for k, s in enumerate(outs_b[1:]):
            expected_states[k].append(s.detach())
    expected_grads = torch.autograd.grad(loss, [ref_leaves[k] for k in names])
    assert_full_precision(got[0], expected_out, "output", ulps=RECURRENT_ULPS)
    for k, s in enumerate(expected_states):
        assert_full_precision(got[1 + k], torch.cat(s), f"state {k}", ulps=RECURRENT_ULPS)
    for name, a, e in zip(names, grads, expected_grads):
        assert_full_precision(a, e, f"grad {name}", ulps=RECURRENT_ULPS)


@pytest.mark.parametrize("strategy", ["hoisted", "concat", "winograd"])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_default_initial_state_is_not_materialised(kind, strategy):
    """Without h0/c0 the zero states are one broadcast element each: autograd keeps the reserve and
    at most 2 x 8 bytes besides the inputs and outputs (dense zeros would be B*C*H*W elements each), and
    every output and gradient equals the call given explicit dense zeros."""
    from fastvid.ops.recurrent import gru_reserve_regions, lstm_reserve_regions, reserve_bytes
    gen = torch.Generator().manual_seed(0)
    B, T, Cin, C, H, W = 2, 5, 3, 4, 6, 7
    G = 4 if kind == "lstm" else 3
    leaves = [torch.randn(s, generator=gen).requires_grad_(True)
              for s in ((B, T, Cin, H, W), (G * C, Cin, 3, 3), (G * C, C, 3, 3), (G * C,))]
    x, w_ih, w_hh, bias = leaves

    def run(**states):
        if kind == "lstm":
            return fastvid.ops.convlstm(x, w_ih, w_hh, bias, strategy=strategy, **states)
        return fastvid.ops.convgru(x, w_ih, w_hh, bias, bias, strategy=strategy, **states)

    nbytes, outputs = _saved_bytes(run, leaves)
    regions = (lstm_reserve_regions if kind == "lstm" else gru_reserve_regions)(torch.float32, C)
    assert nbytes <= reserve_bytes(x.shape, regions) + 2 * 8
    zeros = {"h0": torch.zeros(B, C, H, W)}
    if kind == "lstm":
        zeros["c0"] = torch.zeros(B, C, H, W)
    expected = run(**zeros)
    ups = [torch.randn(o.shape, generator=gen) for o in outputs]
    got_grads = torch.autograd.grad(outputs, leaves, ups)
    expected_grads = torch.autograd.grad(expected, leaves, ups)
    for a, e in zip(list(outputs) + list(got_grads), list(expected) + list(expected_grads)):
        assert torch.equal(a, e)
