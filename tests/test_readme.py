"""Every Python example of the README runs as written, in order and in one namespace as a reader would paste them
(on the reference executor here), and does what its comments say."""

import re
from pathlib import Path

import torch

import te_fx

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
EXAMPLES = re.findall(r"```python\n(.*?)```", README, re.DOTALL)


def test_every_python_example_runs_verbatim(monkeypatch, capsys):
    assert len(EXAMPLES) == 3, "a new README example needs its checks here"
    backend, compiled, eager = EXAMPLES
    assert 'attn_implementation="te"' in backend and 'backend="te_attn"' in compiled
    assert "inject_te_attention" in eager
    monkeypatch.setenv("TE_FX_EXECUTOR", "reference")
    torch._dynamo.reset()  # a reader's fresh process: no graph compiled by an earlier test for the same forward
    namespace: dict = {}
    te_fx.reset_te_attention_stats()
    try:
        exec(compile(backend, "README.md", "exec"), namespace)
        assert "'te_hits': 2" in capsys.readouterr().out  # one call per layer
        assert te_fx.get_te_attention_stats()["te_hits"] == 2

        te_fx.reset_compile_report()
        exec(compile(compiled, "README.md", "exec"), namespace)
        assert capsys.readouterr().out.strip() == "[('te', 'padding_causal'), ('te', 'padding_causal')]"
        assert all(p.grad is not None for p in namespace["model"].parameters())

        exec(compile(eager, "README.md", "exec"), namespace)
        assert "'te_hits': 2" in capsys.readouterr().out
        stats = te_fx.get_te_attention_stats()
        assert stats["te_hits"] == 2 and sum(stats.values()) == 2  # no fallback
        assert all(p.grad is not None for p in namespace["model"].parameters())
    finally:
        torch._dynamo.reset()
        te_fx.reset_compile_report()
