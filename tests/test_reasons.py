"""The fallback reasons are one table: the eager counters, the README and ``te-fx explain`` read it."""

from __future__ import annotations

from pathlib import Path

import te_fx
from te_fx.core.reasons import REASONS, STATS_KEYS, describe

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_counters_are_the_table():
    assert tuple(te_fx.get_te_attention_stats()) == STATS_KEYS == ("te_hits", *REASONS)


def test_readme_lists_every_reason_with_its_description():
    for key, text in REASONS.items():
        assert f"| `{key}` | {text} |" in README, key


def test_describe_names_the_key_and_its_meaning():
    assert describe("fallback_mask") == f"fallback_mask: {REASONS['fallback_mask']}"
    assert describe("something_else") == "something_else"
