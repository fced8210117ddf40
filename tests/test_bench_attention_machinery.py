"""The attention benchmark's machinery on tiny shapes: the naive block is recognised by convert,
parity holds (and a wrong provider is caught), the subprocess peak-memory probe runs, and the report
pairs the SDPA rows into their own comparison with the issue's targets."""
import dataclasses

import pytest

import fastvid
from fastvid.bench import attention, report

pytestmark = pytest.mark.skipif(not fastvid.info()["cpu_kernels"], reason="fastvid._C is not built")

TINY_OP = attention.AttnShape(2, 70, 30, 16)
TINY_BLOCK = attention.AttnShape(2, C=16, inter=8, T=2, H=6, W=6)


@pytest.mark.parametrize("shape,op", [(TINY_OP, "NonlocalAttention"), (TINY_BLOCK, "NonLocalBlock")])
@pytest.mark.parametrize("mode", attention.MODES)
def test_parity_and_rows(shape, op, mode, monkeypatch):
    monkeypatch.setattr(attention, "PEAK_RUNS", 1)  # one peak-memory subprocess per provider
    case = attention.AttnCase(op, shape, mode)
    rows = attention.run_case(case, rounds=1, warmup=0, memory=(mode == "fwd_bwd"))
    providers = {(r["provider"], r["metric"]) for r in rows}
    assert {(p, "time") for p in case.providers} <= providers
    if mode == "fwd_bwd":
        assert {(p, "peak_memory") for p in case.providers} <= providers
        assert {(p, "peak_allocated") for p in case.providers} <= providers


def test_parity_check_catches_a_wrong_provider():
    case = attention.AttnCase("NonlocalAttention", TINY_OP, "fwd_bwd")
    workloads = attention.build(case)
    right = workloads["fastvid"].fn
    workloads["fastvid"].fn = lambda q, k, v: right(q, k, v) * 1.01
    with pytest.raises(AssertionError, match="differs from native"):
        attention.check_parity(workloads)


def test_report_pairs_sdpa_and_applies_targets():
    shape = dataclasses.asdict(attention.AttnShape(2, 6272, 1568))
    base = dict(op="NonlocalAttention", shape="s", dtype="fp32", mode="fwd_bwd", metric="time", shape_dims=shape)
    rows = [dict(base, provider="native", median=300.0, p20=300.0, p80=300.0),
            dict(base, provider="sdpa", median=260.0, p20=260.0, p80=260.0),
            dict(base, provider="fastvid", median=200.0, p20=200.0, p80=200.0)]
    by_op = {c.op: c for c in report.compare(rows)}
    assert by_op["NonlocalAttention"].status == "PASS"            # 1.5x naive
    assert by_op["NonlocalAttention vs SDPA"].ratio == pytest.approx(1.3)
    assert by_op["NonlocalAttention vs SDPA"].status == "PASS"    # >= 1.25x SDPA (issue 11)
    rows[2]["median"] = 250.0
    by_op = {c.op: c for c in report.compare(rows)}
    assert by_op["NonlocalAttention"].status.startswith("MISS")
    assert by_op["NonlocalAttention vs SDPA"].status.startswith("MISS")  # 1.04x: parity is not the margin
