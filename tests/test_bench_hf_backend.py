"""bench.hf_backend shrunk to CPU (--small, reference executor, fp32): every case runs and reports finite times, its
ratios and te_fx's counters, and te_fx's losses and outputs match HF's (the oracle). No timing or target is
asserted."""

import math

import pytest
import torch
from steps import small_bench_results

from bench import hf_backend
from bench.hf_backend import CASES, RATIOS, TE_VARIANTS, VARIANTS, collator_kwargs, main, shrink, verdicts


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return small_bench_results(main, tmp_path_factory.mktemp("hf_backend"))


def _variants(r: dict) -> dict[str, dict]:
    return {name: v for name, v in r.items() if isinstance(v, dict) and "ms" in v}


def test_every_case_reports_times_ratios_and_versions(results):
    assert results["executor"] == "reference" and results["small"] is True and results["dtype"] == "float32"
    assert {"torch", "transformers", "transformer_engine", "device"} <= set(results)
    assert results["torch"] and results["transformers"] and results["device"] == "cpu"
    assert list(results["cases"]) == [case.name for case in CASES]
    assert results["targets"] == {}  # a --small run is measured against no target
    for case in CASES:
        r = results["cases"][case.name]
        variants = _variants(r)
        if case.kind == "model":
            assert list(variants) == list(VARIANTS)
        for name, v in variants.items():
            assert math.isfinite(v["ms"]) and v["ms"] > 0, (case.name, name)
        assert {t.ratio for t in case.targets} <= set(r["ratios"])  # every target's ratio is measured
        assert all(math.isfinite(x) and x > 0 for x in r["ratios"].values())
        layers = shrink(case).layers
        for name in set(variants) & set(TE_VARIANTS):
            if not name.endswith("_compiled"):  # one count per attention call of the counted step (eager only)
                assert sum(variants[name]["counters"].values()) == layers, (case.name, name)
            assert "op_calls" in variants[name]
        for name in ("sdpa_compiled", "te_compiled"):
            if name in variants:
                assert variants[name]["graphs"] >= 1 and variants[name]["compile_s"] > 0


def test_te_fx_matches_hf(results):
    """The oracle: the te variants' first-step loss and layer 0's q_proj gradient against HF's SDPA model (fp32,
    same weights and batch); the attention cases' outputs against HF's SDPA / GPT-OSS's eager attention."""
    for case in CASES:
        r = results["cases"][case.name]
        if case.kind == "model":
            plain = r["sdpa"]
            assert math.isfinite(plain["loss"]) and math.isfinite(plain["q_grad_norm"])
            for name in VARIANTS[1:]:
                assert r[name]["loss"] == pytest.approx(plain["loss"], rel=1e-5), (case.name, name)
                assert r[name]["q_grad_norm"] == pytest.approx(plain["q_grad_norm"], rel=1e-4), (case.name, name)
            assert r["max_abs_diff"] < 1e-4
        else:
            assert r["max_abs_diff"] < 1e-4, case.name
    sinks = results["cases"][CASES[3].name]
    assert sinks["max_abs_diff_causal_vs_sdpa"] < 1e-4 and sinks["sinks_grad_finite"] is True


def test_te_fx_runs_where_it_should(results):
    """'te' eager and the injection run te_fx's op in every layer; the compiled 'te' model's graph holds te_fx's
    padded op in every layer, the mask of ones (which a graph cannot check) read once per step."""
    for case in (shrink(c) for c in CASES if c.kind == "model"):
        r = results["cases"][case.name]
        every_layer = {"te_fx::attention_fwd": case.layers, "te_fx::attention_bwd": case.layers}
        for name in ("injection", "te"):
            assert r[name]["counters"] == {"te_hits": case.layers}, (case.name, name)
            assert r[name]["op_calls"] == every_layer, (case.name, name)
        padded = {"te_fx::padding_layout": 1, "te_fx::padded_attention_fwd": case.layers,
                  "te_fx::padded_attention_bwd": case.layers}  # fmt: skip
        assert r["te_compiled"]["op_calls"] == padded, case.name
        assert r["te_compiled"]["graph_breaks"] == 0 and r["sdpa_compiled"]["graph_breaks"] == 0


def test_packed_kwargs_are_the_collators():
    """collator_kwargs builds what DataCollatorWithFlattening(return_flash_attn_kwargs=True) returns for documents
    of the case's lengths: same keys, values, dtypes and shapes."""
    from transformers import DataCollatorWithFlattening

    case = shrink(next(c for c in CASES if c.kind == "packed"))
    assert sum(case.lengths) == case.seq and len(case.lengths) == 8
    features = [{"input_ids": list(range(3, 3 + n))} for n in case.lengths]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(features)
    ours = collator_kwargs(case, torch.device("cpu"))
    for key, value in ours.items():
        theirs = batch[key]
        if isinstance(theirs, torch.Tensor):
            assert value.dtype == theirs.dtype and value.shape == theirs.shape and torch.equal(value, theirs), key
        else:
            assert type(value) is type(theirs) and value == theirs, key


def test_a_full_run_is_judged_against_each_target():
    """verdicts: one row per target, at least or at most its goal; none for a --small run."""
    case = next(c for c in CASES if c.kind == "sinks")
    r = {"targets": {"sinks_vs_causal": {"goal": 1.1, "at_most": True}}, "ratios": {"sinks_vs_causal": 1.05},
         "te_sinks": {"counters": {"te_hits": 1}}}  # fmt: skip
    [(label, ok, detail)] = verdicts(case.name, r)
    assert ok and label.endswith(RATIOS["sinks_vs_causal"][2]) and "<= 1.1x" in detail
    r["ratios"]["sinks_vs_causal"] = 1.2
    assert verdicts(case.name, r)[0][1] is False
    assert verdicts(case.name, r, small=True) == []
    r = {"targets": {"te_vs_sdpa": {"goal": 5.0, "at_most": False}}, "ratios": {"te_vs_sdpa": 6.0}}
    assert verdicts("3", r)[0][1] is True


def test_small_cases_keep_each_cases_structure():
    """--small keeps Gemma3's two sliding layers (window scaled with S) and the 8 documents summing to S."""
    gemma = shrink(CASES[1])
    assert gemma.layers == 2 and 2 <= gemma.shape["sliding_window"] < gemma.seq
    config = hf_backend._config(gemma)
    assert config.layer_types == ["sliding_attention", "sliding_attention"] and config.sliding_window == 8
    full = CASES[1]
    assert full.shape["sliding_window"] == 1024 and full.shape["head_dim"] == 256 and full.layers == 2
