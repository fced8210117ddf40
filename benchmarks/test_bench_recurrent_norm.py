"""Layer-normalised ConvLSTM (norm="layer"): fastvid vs the native PyTorch LN-ConvLSTM a user writes
(per step: conv of x_t and of h, F.layer_norm of each, gates, cell, F.layer_norm of c), with
pytest-benchmark. Before anything is timed the two are checked to agree (same parameters); nothing
asserts on time.

    python -m pytest benchmarks/test_bench_recurrent_norm.py -q --benchmark-min-rounds=3
    python benchmarks/test_bench_recurrent_norm.py            # a quick ratio table, same cases
"""
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

import fastvid

# B, T, C_in, C, H, W: the recurrent suite's small shape
CASES = [(4, 8, 32, 32, 32, 32)]
MODES = ("forward", "forward+backward")


def native_ln_convlstm(x, m):
    """The per-step native LN-ConvLSTM with m's parameters (fastvid.nn.ConvLSTM(norm='layer'), one layer)."""
    p = dict(m.named_parameters())
    B, T, _, H, W = x.shape
    C = m.hidden_channels[0]
    h = x.new_zeros(B, C, H, W)
    c = x.new_zeros(B, C, H, W)
    bias = (p["bias_ih_l0"] + p["bias_hh_l0"]).view(1, -1, 1, 1)

    def ln(v, gain, shift=None):
        out = F.layer_norm(v, v.shape[1:]) * gain.view(1, -1, 1, 1)
        return out if shift is None else out + shift.view(1, -1, 1, 1)

    outputs = []
    for t in range(T):
        a = ln(F.conv2d(x[:, t], p["weight_ih_l0"], padding=1), p["ln_gain_ih_l0"]) + \
            ln(F.conv2d(h, p["weight_hh_l0"], padding=1), p["ln_gain_hh_l0"]) + bias
        i, f, g, o = a.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(ln(c, p["ln_gain_c_l0"], p["ln_bias_c_l0"]))
        outputs.append(h)
    return torch.stack(outputs, 1)


def _setup(shape):
    torch.manual_seed(0)
    B, T, Cin, C, H, W = shape
    m = fastvid.nn.ConvLSTM(Cin, C, 3, norm="layer")
    with torch.no_grad():
        for name, prm in m.named_parameters():
            if name.startswith("ln_"):
                prm.add_(torch.randn_like(prm) * 0.1)
    x = torch.randn(B, T, Cin, H, W)
    return m, x


def _step(provider, mode, m, x):
    run = (lambda: m(x)[0]) if provider == "fastvid" else (lambda: native_ln_convlstm(x, m))
    if mode == "forward":
        def step():
            with torch.no_grad():
                return run()
        return step

    def step():
        m.zero_grad(set_to_none=True)
        out = run()
        out.backward(torch.ones_like(out))
        return out
    return step


def check_agree(m, x):
    """Outputs and every parameter's and the input's gradient (of the timed steps' upstream gradient of
    ones) agree, relative to the largest value of each."""
    results = {}
    for provider in ("fastvid", "native"):
        m.zero_grad(set_to_none=True)
        xg = x.detach().clone().requires_grad_(True)
        out = m(xg)[0] if provider == "fastvid" else native_ln_convlstm(xg, m)
        out.backward(torch.ones_like(out))
        results[provider] = {"output": out.detach(), "x.grad": xg.grad,
                             **{f"{name}.grad": prm.grad for name, prm in m.named_parameters()}}
    m.zero_grad(set_to_none=True)
    for name, expected in results["native"].items():
        err = ((results["fastvid"][name] - expected).abs().max() / expected.abs().max()).item()
        assert err < 1e-4, f"fastvid and native LN-ConvLSTM {name} differ by {err:.3g} (relative)"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", ["native", "fastvid"])
@pytest.mark.parametrize("shape", CASES, ids=lambda s: "B{}_T{}_Cin{}_C{}_{}x{}".format(*s))
def test_ln_convlstm(benchmark, shape, provider, mode):
    m, x = _setup(shape)
    check_agree(m, x)
    step = _step(provider, mode, m, x)
    step()
    benchmark.group = f"ln_convlstm {shape} {mode}"
    benchmark.extra_info.update(op="ln_convlstm", shape=list(shape), mode=mode, provider=provider,
                                threads=torch.get_num_threads(), cpu_isa=fastvid.info().get("cpu_isa"))
    benchmark(step)


def _median_ms(step, rounds=5):
    step()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


if __name__ == "__main__":
    print(f"threads={torch.get_num_threads()} cpu_isa={fastvid.info().get('cpu_isa')}")
    for shape in CASES:
        m, x = _setup(shape)
        check_agree(m, x)
        for mode in MODES:
            native = _median_ms(_step("native", mode, m, x))
            ours = _median_ms(_step("fastvid", mode, m, x))
            print(f"{shape} {mode:17s} native {native:8.1f} ms  fastvid {ours:8.1f} ms  speedup {native / ours:5.2f}x")
