"""The benchmark's ceiling rows (fastvid/bench/ceiling.py): the work counts against hand counts, the
FMA-peak op against what a core can do, the X3D block without its depthwise conv against the block
with an identity (Dirac) depthwise kernel, and the report's verdicts."""
import time

import pytest
import torch
from _isa import supported_paths

import fastvid
from fastvid.bench import ceiling, depthwise, report, runner

pytestmark = pytest.mark.skipif(not fastvid.info()["cpu_kernels"], reason="fastvid._C is not built")


def test_depthwise_work_counts():
    # 120 elements in and out, 2000 in-range taps: x in, y out; one multiply-add per tap.
    assert ceiling.depthwise_work(120, 120, 2000, "no_grad") == {"bytes": 240 * 4, "multiply_adds": 2000}
    # fwd+bwd: x in, y out; grad_output in, x in again, grad_input out = 5 activations; 3 passes.
    assert ceiling.depthwise_work(120, 120, 2000, "fwd_bwd") == {"bytes": 600 * 4, "multiply_adds": 3 * 2000}
    # stride 2 in H and W: a quarter of the outputs (input-sized tensors x 3, output-sized x 2).
    assert ceiling.depthwise_work(400, 100, 900, "fwd_bwd") == {"bytes": (1200 + 200) * 4, "multiply_adds": 3 * 900}


def test_in_range_taps_leave_out_the_padding():
    # k = 3, padding 1, stride 1 along n positions: 3n taps less the two that fall off the ends.
    assert ceiling.in_range_taps((8, 28, 28), 3, (1, 1, 1), 1) == 22 * 82 * 82
    # no padding: every tap is in range
    assert ceiling.in_range_taps((5, 6, 7), 3, (1, 1, 1), 0) == 3 * 4 * 5 * 27
    # stride 2 along 6 positions, padding 1: outputs 0, 1, 2 read -1..1, 1..3, 3..5: 2 + 3 + 3 taps
    assert ceiling.in_range_taps((1, 6, 1), 3, (1, 2, 1), 1) == 1 * 8 * 1
    # against a direct count: the taps of a conv of ones on ones
    x = torch.ones(1, 1, 4, 7, 9)
    count = torch.nn.functional.conv3d(x, torch.ones(1, 1, 3, 3, 3), stride=(1, 2, 3), padding=1).sum().item()
    assert ceiling.in_range_taps((4, 7, 9), 3, (1, 2, 3), 1) == count


def test_least_time_is_the_larger_term():
    least = ceiling.least_seconds(nbytes=2e9, multiply_adds=1e9, copy_bytes_per_s=1e9, fma_per_s=1e10)
    assert least == {"memory_s": 2.0, "compute_s": 0.1, "least_s": 2.0}
    least = ceiling.least_seconds(nbytes=1e6, multiply_adds=1e12, copy_bytes_per_s=1e9, fma_per_s=1e10)
    assert least["least_s"] == least["compute_s"] == 100.0


@pytest.mark.parametrize("path", supported_paths())
def test_fma_peak_is_a_rate_a_core_can_have(path):
    threads = torch.get_num_threads()
    with runner.forced_cpu_isa(path):
        torch.set_num_threads(1)
        try:
            start = time.process_time()
            lanes_per_s = torch.ops.fastvid._cpu_fma_peak(2_000_000, 2)
            cpu_seconds = time.process_time() - start
        finally:
            torch.set_num_threads(threads)
    lanes = {"avx512": 16, "avx2": 8, "baseline": 4}[path]
    # 2 rounds x 2e6 iterations x 12 chains x lanes ran in cpu_seconds at most: a lower bound on the rate.
    assert lanes_per_s >= 2 * 2e6 * 12 * lanes / cpu_seconds / 2  # the best round is at least the average
    # and no core does more than 4 vector multiply-adds per cycle at 6 GHz
    assert lanes_per_s <= 4 * lanes * 6e9


def test_fma_peak_rejects_bad_arguments():
    with pytest.raises(RuntimeError, match="iterations and rounds must be positive"):
        torch.ops.fastvid._cpu_fma_peak(0, 1)
    with pytest.raises(RuntimeError, match="iterations and rounds must be positive"):
        torch.ops.fastvid._cpu_fma_peak(10, 0)


@pytest.mark.parametrize("layout", depthwise.LAYOUTS)
def test_x3d_block_without_depthwise_is_the_block_with_an_identity_kernel(layout):
    case = depthwise.DWCase("X3DBlock", depthwise.DWShape(2, 8, 3, 6, 6, inner=12), "fp32", "fwd_bwd", layout)
    workload = depthwise.build(case)["fastvid"]
    rest = depthwise.without_depthwise(workload)
    with torch.no_grad():  # a Dirac kernel: each channel's centre tap 1, the others 0
        conv = workload.module[3]
        conv.weight.zero_()
        conv.weight[:, :, 1, 1, 1] = 1.0
    expected, got = workload(), rest()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rest.x.grad, workload.x.grad, rtol=1e-4, atol=1e-5)


def _rows(op, mode, native_ms, fastvid_ms, bound_ms, provider_native="native"):
    def row(provider, metric, median):
        return {"op": op, "provider": provider, "mode": mode, "metric": metric, "unit": "ms", "shape": "B=4",
                "dtype": "fp32", "isa": "avx2", "median": median, "p20": median, "p80": median}
    return [row(provider_native, "time", native_ms), row("fastvid", "time", fastvid_ms),
            row(provider_native, "ceiling", native_ms), row("bound", "ceiling", bound_ms)]


@pytest.mark.parametrize("bound_ms, ceiling_status, time_status", [
    (0.5, "reachable, fastvid at 50%", "MISS x1.50"),  # ceiling 4x >= x3: a kernel could meet it
    (1.0, "target > ceiling x1.50, fastvid at 100%", "MISS x1.50 (bound)"),  # ceiling 2x < x3: none could
])
def test_report_marks_misses_above_the_ceiling(bound_ms, ceiling_status, time_status):
    # DepthwiseConv3d forward, target x3: native 2 ms, fastvid 1 ms (2x: a MISS either way).
    comparisons = {c.metric: c for c in report.compare(_rows("DepthwiseConv3d", "no_grad", 2.0, 1.0, bound_ms))}
    assert comparisons["ceiling"].ratio == pytest.approx(2.0 / bound_ms)
    assert comparisons["ceiling"].status == ceiling_status
    assert comparisons["time"].status == time_status
    table = report.format_table(_rows("DepthwiseConv3d", "no_grad", 2.0, 1.0, bound_ms))
    assert ("1 of them above this run's ceiling" in table) == (bound_ms == 1.0)


@pytest.mark.parametrize("native_sys_ms, shown", [(30.0, True), (15.0, False)])
def test_report_says_when_natives_time_went_to_the_kernel(native_sys_ms, shown):
    """A PASS that rests on native's page faults (default glibc malloc) says so: native 200 ms with 30 ms of
    system CPU time (>= 10 %) is marked, 15 ms is not; fastvid's own system time is not native's."""
    rows = _rows("DepthwiseConv3d", "no_grad", 200.0, 20.0, 5.0)
    for r in rows:
        if r["metric"] == "time":
            r["sys_ms_per_call"] = native_sys_ms if r["provider"] == "native" else 50.0
    time_row = {c.metric: c for c in report.compare(rows)}["time"]
    assert time_row.status == "PASS"
    lines = [line for line in report.format_table(rows).splitlines() if line.split()[4:5] == ["time"]]
    assert len(lines) == 1 and ("PASS (native sys 30.0 ms)" in lines[0]) == shown
    assert "PASS" in lines[0] and "sys 50.0" not in lines[0]


def _attention_rows_with_sdpa():
    """Attention fwd+bwd at N = 6272: native 300 ms, SDPA 160, fastvid 150, the least time 100."""
    rows = _rows("NonlocalAttention", "fwd_bwd", 300.0, 150.0, 100.0)
    sdpa = _rows("NonlocalAttention", "fwd_bwd", 160.0, 150.0, 100.0, provider_native="sdpa")
    rows += [r for r in sdpa if r["provider"] == "sdpa"]
    for r in rows:
        r["shape_dims"] = {"N": 6272}
    return rows


def test_report_notes_native_sys_time_against_native_only():
    """The vs-SDPA rows' baseline column holds SDPA: its system time is not native's and gets no note."""
    rows = _attention_rows_with_sdpa()
    for r in rows:
        if r["metric"] == "time":
            r["sys_ms_per_call"] = {"native": 1.0, "sdpa": 40.0}.get(r["provider"], 0.0)
    comparisons = {(c.op, c.metric): c for c in report.compare(rows)}
    assert comparisons[("NonlocalAttention vs SDPA", "time")].native_sys_ms is None
    assert comparisons[("NonlocalAttention", "time")].native_sys_ms is None  # 1 ms of 300: below the share
    rows[0]["sys_ms_per_call"] = 100.0
    comparisons = {(c.op, c.metric): c for c in report.compare(rows)}
    assert comparisons[("NonlocalAttention", "time")].native_sys_ms == 100.0
    assert comparisons[("NonlocalAttention vs SDPA", "time")].native_sys_ms is None


def test_conv_rate_rows_sit_in_the_fastvid_column_next_to_the_gemm_rate():
    rows = [{"op": "ConvLSTM", "provider": provider, "mode": "no_grad", "metric": "conv_gflops_native",
             "unit": "GFLOP/s", "shape": "B=4", "dtype": "fp32", "isa": "avx2", "median": v, "p20": v, "p80": v}
            for provider, v in (("gemm", 200.0), ("conv_rate", 150.0))]
    (c,) = report.compare(rows)
    assert c.native["provider"] == "gemm" and c.fastvid["provider"] == "conv_rate"
    assert c.ratio == pytest.approx(0.75)


def test_sdpa_comparison_gets_its_own_ceiling():
    rows = _attention_rows_with_sdpa()
    comparisons = {(c.op, c.metric): c for c in report.compare(rows)}
    vs_sdpa = comparisons[("NonlocalAttention vs SDPA", "ceiling")]
    assert vs_sdpa.ratio == pytest.approx(1.6)  # x1.25 <= 1.6; fastvid's 150 ms vs the least 100 ms
    assert vs_sdpa.status == "reachable, fastvid at 67%"
    assert comparisons[("NonlocalAttention vs SDPA", "time")].status == "MISS x1.17"


def test_bench_fma_peak_keeps_the_thread_count_and_counts_every_thread(monkeypatch):
    threads = torch.get_num_threads()
    rates = {1: 50e9, threads: 60e9}  # all threads at once slower than threads x one (a busy neighbour)
    monkeypatch.setattr(ceiling, "_fma_cache", {})
    monkeypatch.setattr(torch.ops.fastvid, "_cpu_fma_peak",
                        lambda iterations, rounds: rates[torch.get_num_threads()], raising=False)
    assert ceiling.fma_peak() == max(60e9, threads * 50e9)
    assert torch.get_num_threads() == threads
