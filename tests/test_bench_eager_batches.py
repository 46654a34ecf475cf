"""bench.eager_batches shrunk to CPU (--small, reference executor): every case runs, reports finite times and
te_fx's dispatch counters, and te_fx's loss and gradients match the plain model's (the oracle). No timing or
target is asserted."""

import itertools
import math
import types

import pytest
import torch
from steps import small_bench_results

from bench import eager_batches
from bench.eager_batches import CASES, main, op_case, shrink
from te_fx import ops


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return small_bench_results(main, tmp_path_factory.mktemp("eager_batches"))


def test_every_case_reports_times_counters_and_versions(results):
    assert results["executor"] == "reference" and results["small"] is True
    assert {"torch", "transformers", "transformer_engine", "device"} <= set(results)
    assert list(results["cases"]) == [case.name for case in CASES]
    assert results["targets"] == {}  # a --small run is measured against no target
    for case in CASES:
        r = results["cases"][case.name]
        if case.op_only and "skipped" in r:
            assert r["skipped"] == "n/a: ops.attention has no cu_seqlens"
            continue
        for side in ("plain", "te_fx"):
            assert math.isfinite(r[side]["ms"]) and r[side]["ms"] > 0
        assert math.isfinite(r["speedup"])
        if not case.op_only:
            counters = r["te_fx"]["counters"]
            assert all(isinstance(n, int) and n > 0 for n in counters.values())
            assert sum(counters.values()) == shrink(case).layers  # one SDPA call per layer in the counted step


def test_te_fx_matches_the_plain_model(results):
    for case in CASES:
        r = results["cases"][case.name]
        if case.op_only:
            if "skipped" not in r:
                assert r["max_abs_diff"] < 1e-4
            continue
        plain, te = r["plain"], r["te_fx"]
        assert math.isfinite(plain["loss"]) and math.isfinite(plain["q_grad_norm"])
        assert te["loss"] == pytest.approx(plain["loss"], rel=2e-3), case.name
        assert te["q_grad_norm"] == pytest.approx(plain["q_grad_norm"], rel=1e-2), case.name


def test_packed_op_case_with_a_cu_seqlens_attention(monkeypatch):
    """The op case's own arithmetic (cu_seqlens from the document lengths, HF's block-diagonal mask), checked with a
    stand-in for ``ops.attention(..., cu_seqlens=...)`` that runs each document on its own."""

    def attention(q, k, v, *, mask_type, window_size, softmax_scale, cu_seqlens, executor):
        bounds = cu_seqlens.tolist()
        return torch.cat([
            ops.attention(q[:, a:b], k[:, a:b], v[:, a:b], mask_type=mask_type, window_size=window_size,
                          softmax_scale=softmax_scale, executor=executor)
            for a, b in itertools.pairwise(bounds)
        ], dim=1)  # fmt: skip

    monkeypatch.setattr(eager_batches, "ops", types.SimpleNamespace(attention=attention))
    case = shrink(next(case for case in CASES if case.op_only))
    assert sum(case.lengths) == case.seq and len(case.lengths) == 8
    r = op_case(case, torch.device("cpu"), "reference", warmup=1, steps=2)
    assert r["max_abs_diff"] < 1e-4
    assert r["plain"]["ms"] > 0 and r["te_fx"]["ms"] > 0


def test_the_batches_a_collator_would_build():
    padded = shrink(CASES[0])
    batch = eager_batches.make_batch(padded, torch.device("cpu"))
    assert batch["attention_mask"].sum(1).tolist() == list(padded.lengths)
    assert ((batch["labels"] == -100) == (batch["attention_mask"] == 0)).all()
    packed = shrink(CASES[3])
    positions = eager_batches.make_batch(packed, torch.device("cpu"))["position_ids"][0]
    assert (positions == 0).sum() == len(packed.lengths) and positions.shape[0] == packed.seq
