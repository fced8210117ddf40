"""Benchmark plots (issue 13, feature 7): ``python -m fastvid bench --report FILE --plot DIR`` on a small
synthetic results file: the PNG files exist and show something, the speedups per platform and the
target values are the ones the rows imply."""
import json

import matplotlib.image
import pytest

from fastvid.__main__ import main as cli_main
from fastvid.bench import plot, report

COMMON = dict(metric="time", unit="ms", machine="cpu: test", version="0", timestamp="2026-12-01T00:00:00+00:00",
              device="cpu")


def row(op, provider, mode, median, shape="B=2,T=4,C=8,16x16", dtype="fp32", run_id="run-1", **extra):
    return dict(COMMON, op=op, provider=provider, mode=mode, shape=shape, dtype=dtype, median=median,
                p20=0.95 * median, p80=1.05 * median, run_id=run_id, **extra)


ROWS = [
    # run 1, AVX-512 path: ConvLSTM fp32 (target x1.3), bf16 fwd_bwd (target x2), one DepthwiseConv3d case
    row("ConvLSTM", "native", "no_grad", 10.0, isa="avx512"), row("ConvLSTM", "fastvid", "no_grad", 5.0, isa="avx512"),
    row("ConvLSTM", "native", "fwd_bwd", 30.0, isa="avx512"), row("ConvLSTM", "fastvid", "fwd_bwd", 20.0, isa="avx512"),
    row("ConvLSTM", "native", "fwd_bwd", 60.0, dtype="bf16", isa="avx512"),
    row("ConvLSTM", "fastvid", "fwd_bwd", 20.0, dtype="bf16", isa="avx512"),
    dict(row("ConvLSTM", "native", "fwd_bwd", 100.0, isa="avx512"), metric="peak_memory", unit="MiB"),
    dict(row("ConvLSTM", "fastvid", "fwd_bwd", 70.0, isa="avx512"), metric="peak_memory", unit="MiB"),
    row("DepthwiseConv3d", "native", "no_grad", 8.0, shape="B=4,C=96,8x28x28", isa="avx512"),
    row("DepthwiseConv3d", "fastvid", "no_grad", 2.0, shape="B=4,C=96,8x28x28", isa="avx512"),
    # run 2, AVX2 path: the fp32 ConvLSTM cases again
    row("ConvLSTM", "native", "no_grad", 12.0, run_id="run-2", isa="avx2"),
    row("ConvLSTM", "fastvid", "no_grad", 8.0, run_id="run-2", isa="avx2"),
    row("ConvLSTM", "native", "fwd_bwd", 36.0, run_id="run-2", isa="avx2"),
    row("ConvLSTM", "fastvid", "fwd_bwd", 30.0, run_id="run-2", isa="avx2"),
]


@pytest.fixture
def results_file(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def assert_png_shows_something(path):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_cli_report_plot_writes_pngs(results_file, tmp_path, capsys):
    folder = tmp_path / "plots"
    assert cli_main(["bench", "--report", str(results_file), "--run-id", "run-1", "--plot", str(folder)]) == 0
    out = capsys.readouterr().out
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["speedup.png", "time-ConvLSTM.png", "time-DepthwiseConv3d.png"]
    for name in names:
        assert f"wrote {folder / name}" in out
        assert_png_shows_something(folder / name)


def test_speedups_per_platform_and_targets():
    ratios, targets = plot.speedups(ROWS)
    fp32_forward = ("ConvLSTM", "B=2,T=4,C=8,16x16 fp32 no_grad")
    assert ratios[fp32_forward] == {"cpu avx512": pytest.approx(2.0), "cpu avx2": pytest.approx(1.5)}
    assert ratios[("ConvLSTM", "B=2,T=4,C=8,16x16 fp32 fwd_bwd")] == {"cpu avx512": pytest.approx(1.5),
                                                                       "cpu avx2": pytest.approx(1.2)}
    assert ratios[("ConvLSTM", "B=2,T=4,C=8,16x16 bf16 fwd_bwd")] == {"cpu avx512": pytest.approx(3.0)}
    assert ratios[("DepthwiseConv3d", "B=4,C=96,8x28x28 fp32 no_grad")] == {"cpu avx512": pytest.approx(4.0)}
    # the issues' targets (fastvid/bench/report.py docstring): x1.8 fp32 no-grad, x2 bf16 fwd_bwd, x3 depthwise forward
    assert targets[fp32_forward] == pytest.approx(1.8)
    assert targets[("ConvLSTM", "B=2,T=4,C=8,16x16 bf16 fwd_bwd")] == pytest.approx(2.0)
    assert targets[("DepthwiseConv3d", "B=4,C=96,8x28x28 fp32 no_grad")] == pytest.approx(3.0)


def test_newest_row_of_a_case_counts_within_a_platform():
    rerun = [dict(r, run_id="run-3", median=r["median"] / 2) for r in ROWS[:2]]  # fastvid and native both halve
    rerun[1]["median"] = 1.0  # fastvid now 5.0 / 1.0 = 5x
    ratios, _ = plot.speedups(ROWS + rerun)
    assert ratios[("ConvLSTM", "B=2,T=4,C=8,16x16 fp32 no_grad")]["cpu avx512"] == pytest.approx(5.0)


@pytest.mark.parametrize("target,native,expected", [
    (report.target_for("time", "no_grad", "fp32"), 18.0, 10.0),  # native / 1.8
    (report.target_for("time", "fwd_bwd", "fp32"), 15.0, 10.0),  # native / 1.5
    (report.target_for("peak_memory", "fwd_bwd", "fp32"), 100.0, 80.0),  # 0.8 x native
    (report.target_for("ops_per_step", "no_grad", "fp32"), 7.0, 2.0),  # <= 2 per step
])
def test_target_value_is_where_fastvid_meets_the_target(target, native, expected):
    value = plot.target_value(target, native)
    assert value == pytest.approx(expected)
    assert target.passes(native, value * (1 - 1e-9)) and not target.passes(native, value * (1 + 1e-6))


def test_plot_after_a_run_uses_the_rows_it_measured(tmp_path):
    paths = plot.plot(ROWS[:6], str(tmp_path))
    assert sorted(p.rsplit("/", 1)[1] for p in paths) == ["speedup.png", "time-ConvLSTM.png"]
    for path in paths:
        assert_png_shows_something(path)
