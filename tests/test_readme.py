"""The README's first example runs as written (on the reference executor here) and puts every layer on te_fx."""

import re
from pathlib import Path

import te_fx

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_first_example_runs_verbatim(monkeypatch, capsys):
    first = re.search(r"```python\n(.*?)```", README, re.DOTALL).group(1)
    assert 'attn_implementation="te"' in first
    monkeypatch.setenv("TE_FX_EXECUTOR", "reference")
    te_fx.reset_te_attention_stats()
    exec(compile(first, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "'te_hits': 2" in printed and te_fx.get_te_attention_stats()["te_hits"] == 2
