"""bench.decode shrunk to CPU (--small, reference executor, fp32, aot_eager): every variant decodes at every batch
size with finite times, the same greedy tokens as HF's SDPA (the oracle), and te_attn rewrites every attention
node. No timing or target is asserted."""

import math

import pytest
from steps import small_bench_results

from bench.decode import BATCHES, VARIANTS, main


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return small_bench_results(main, tmp_path_factory.mktemp("decode"), warmup=0, steps=1)


def test_every_variant_decodes_every_batch_with_sdpas_tokens(results):
    assert results["executor"] == "reference" and results["small"] is True and results["targets"] == {}
    assert list(results["batches"]) == [f"B{batch}" for batch in BATCHES]
    for batch, r in results["batches"].items():
        assert list(r) == list(VARIANTS), batch
        for variant, v in r.items():
            assert math.isfinite(v["ms"]) and v["ms"] > 0 and v["tokens_per_s"] > 0, (batch, variant)
            assert v["tokens"] == r["sdpa"]["tokens"], (batch, variant)
            assert len(v["tokens"]) == int(batch[1:]) and len(v["tokens"][0]) == 8


def test_te_attn_rewrites_every_attention_node(results):
    rewritten, total = results["te_attn_rewritten"].split(" of ")
    assert int(total) > 0 and rewritten == total
