"""bench.compile_batches shrunk to CPU (--small, reference executor, aot_eager in Inductor's place, fp32): every case
runs, te_attn rewrites every attention node in one graph without breaks, and te_fx's losses, gradients and outputs
match the plain compiled model's (the oracle). No timing or target is asserted."""

import math

import pytest
from steps import small_bench_results

from bench.compile_batches import CASES, VARIANTS, main


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return small_bench_results(main, tmp_path_factory.mktemp("compile_batches"))


def test_every_case_reports_times_and_ratios(results):
    assert results["executor"] == "reference" and results["inner"] == "aot_eager" and results["small"] is True
    assert list(results["cases"]) == [case.name for case in CASES]
    assert results["targets"] == {}  # a --small run is measured against no target
    for case in CASES:
        r = results["cases"][case.name]
        variants = {name: v for name, v in r.items() if isinstance(v, dict) and "ms" in v}
        assert set(variants) == (set(VARIANTS) if case.kind != "packed" else {"inductor", "te_attn"})
        assert all(math.isfinite(v["ms"]) and v["ms"] > 0 for v in variants.values())
        assert set(r["ratios"]) == {t.ratio for t in case.targets}


@pytest.mark.parametrize("case", CASES, ids=[case.name[0] for case in CASES])
def test_te_attn_takes_every_node_and_matches_the_plain_compiled_model(results, case):
    r = results["cases"][case.name]
    if case.kind == "packed":
        assert r["max_abs_diff"] < 1e-5
        assert r["te_attn"]["op_calls"]["te_fx::packed_attention_fwd"] == 1
        return
    te_attn, plain = r["te_attn"], r["inductor"]
    layers = min(case.layers, 2)
    assert te_attn["rewritten"] == f"{layers} of {layers}" and te_attn["reasons"] == []
    assert te_attn["graphs"] == plain["graphs"] == 1 and te_attn["graph_breaks"] == 0
    assert r["eager_te_fx"]["counters"] == {"te_hits": layers}
    tolerance = 5e-3 if case.kind == "autocast" else 1e-4  # bf16 autocast: compiled and eager round differently
    for name in ("te_attn", "eager_te_fx"):
        assert r[name]["loss"] == pytest.approx(plain["loss"], abs=tolerance)
        assert r[name]["q_grad_norm"] == pytest.approx(plain["q_grad_norm"], rel=tolerance)
