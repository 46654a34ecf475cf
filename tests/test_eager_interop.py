"""The eager path next to other users of SDPA and next to torch.compile (CPU, fp32, reference executor).

te_fx routes an injected module's SDPA calls with a per-thread torch function mode and never replaces
``torch.nn.functional.scaled_dot_product_attention``. So a wrapper someone installs on that attribute (before or
after ``import te_fx``) keeps being called and stays installed; a thread compiling a plain model is not disturbed by
one running an injected model (nor that one by it); and under torch.compile and torch.export the injection steps
aside (the graph holds plain SDPA, which ``backend="te_attn"`` rewrites, with no graph break) and says so once.
"""

from __future__ import annotations

import copy
import logging
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import _get_current_function_mode_stack

import te_fx
from te_fx.eager import inject
from te_fx.tools.tiny_models import tiny_model

ATOL = RTOL = 1e-5
ZERO_STATS = dict.fromkeys(te_fx.get_te_attention_stats(), 0)


def _pair(family: str = "llama_gqa", **overrides) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    plain = tiny_model(family, **overrides)
    injected = copy.deepcopy(plain)
    te_fx.inject_te_attention(injected, executor="reference")
    return plain, injected


def _ids(batch: int = 2, seq_len: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def _stats(**counts: int) -> dict[str, int]:
    return {**ZERO_STATS, **counts}


# --------------------------------------------------------------------------------------------- foreign SDPA wrappers


def test_a_wrapper_installed_on_sdpa_after_import_is_still_called_and_stays(monkeypatch):
    """A wrapper on ``F.scaled_dot_product_attention`` (as context_parallel() installs one) is what HF calls; it
    calls the builtin, which te_fx's mode routes to TE. Padded batches included (key padding plans)."""
    original = F.scaled_dot_product_attention
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(bool(_get_current_function_mode_stack()))
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", wrapper)
    plain, injected = _pair("mistral")
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            expected = plain(ids, **kwargs).logits
            calls.clear()
            te_fx.reset_te_attention_stats()
            out = injected(ids, **kwargs).logits
            torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
            assert calls == [True] * injected.config.num_hidden_layers  # the wrapper ran inside te_fx's route
            assert te_fx.get_te_attention_stats() == _stats(te_hits=injected.config.num_hidden_layers)
    assert F.scaled_dot_product_attention is wrapper
    te_fx.remove_te_attention(injected)
    assert F.scaled_dot_product_attention is wrapper


def test_a_wrapper_installed_on_sdpa_before_import_is_still_called_and_stays():
    """In a fresh interpreter: the wrapper is installed before ``import te_fx``."""
    script = textwrap.dedent(
        """
        import copy
        import torch
        import torch.nn.functional as F

        original = F.scaled_dot_product_attention
        calls = []

        def wrapper(*args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        F.scaled_dot_product_attention = wrapper
        import te_fx
        from te_fx.tools.tiny_models import tiny_model

        torch.manual_seed(0)
        plain = tiny_model("llama_gqa")
        injected = copy.deepcopy(plain)
        te_fx.inject_te_attention(injected, executor="reference")
        ids = torch.randint(3, 128, (2, 8))
        with torch.no_grad():
            expected = plain(ids).logits
            calls.clear()
            out = injected(ids).logits
        assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)
        assert len(calls) == 2, calls
        assert te_fx.get_te_attention_stats()["te_hits"] == 2
        assert F.scaled_dot_product_attention is wrapper
        import torch.nn.functional
        assert torch.nn.functional.scaled_dot_product_attention is wrapper
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_a_wrapper_that_does_not_call_the_builtin_is_called_as_is(monkeypatch):
    """A wrapper that computes attention itself never reaches the builtin: te_fx does not see the call (nothing
    counted) and the wrapper's result is what the model gets."""
    calls = []

    def own_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        calls.append(1)
        if enable_gqa:
            key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
            value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
        scores = query @ key.transpose(-1, -2) * (scale if scale is not None else query.shape[-1] ** -0.5)
        if attn_mask is not None:
            scores = (
                scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
            )
        elif is_causal:
            causal = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        return scores.softmax(-1) @ value

    plain, injected = _pair()
    ids = _ids()
    with torch.no_grad():
        expected = plain(ids).logits
        monkeypatch.setattr(F, "scaled_dot_product_attention", own_attention)
        out = injected(ids).logits
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    assert len(calls) == injected.config.num_hidden_layers
    assert te_fx.get_te_attention_stats() == ZERO_STATS


# --------------------------------------------------------------------------------------------- threads and compile


@pytest.mark.skipif(
    torch.torch_version.TorchVersion(torch.__version__) < (2, 13),
    reason="torch < 2.13 segfaults in the next main-thread compile after a compile in another thread, te_fx or not",
)
class _PlainAttention(torch.nn.Module):
    """Causal self-attention through ``F.scaled_dot_product_attention``, nothing of transformers: what another thread
    compiles (transformers >= 5.25's own hub-kernels variable is not thread-safe under torch.compile)."""

    def __init__(self, width: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.qkv = heads, torch.nn.Linear(width, 3 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(-2)


def test_an_injected_model_and_a_thread_compiling_a_plain_model():
    """One thread runs an injected model (padded batches: TE), another compiles a plain attention module several
    times (fresh torch.compile objects, new shapes): no crash, both correct, and the compiled graphs hold plain SDPA
    (no te_fx call is counted for them)."""
    plain, injected = _pair("llama_gqa")
    attention = _PlainAttention()
    ids = _ids(2, 10)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        expected = plain(ids, attention_mask=mask).logits
    failures: list[str] = []
    done = threading.Event()
    eager_steps = []
    barrier = threading.Barrier(2)

    def run_injected():
        barrier.wait()
        step = 0
        while not done.is_set() or step < 5:
            with torch.no_grad():
                out = injected(ids, attention_mask=mask).logits
            if not torch.allclose(out, expected, atol=ATOL, rtol=RTOL):
                failures.append(f"injected step {step}: {(out - expected).abs().max():.3g}")
            step += 1
        eager_steps.append(step)

    def compile_plain():
        barrier.wait()
        try:
            for n, seq_len in enumerate((6, 9, 13)):
                compiled = torch.compile(attention, backend="eager" if n % 2 else "aot_eager", fullgraph=True)
                x = torch.randn(1, seq_len, 16, generator=torch.Generator().manual_seed(n))
                with torch.no_grad():
                    got, want = compiled(x), attention(x)
                if not torch.allclose(got, want, atol=ATOL, rtol=RTOL):
                    failures.append(f"compiled {seq_len}: {(got - want).abs().max():.3g}")
        except Exception as error:  # noqa: BLE001 - reported below
            failures.append(f"compile: {error!r}")
        finally:
            done.set()

    te_fx.reset_te_attention_stats()
    threads = [threading.Thread(target=run_injected), threading.Thread(target=compile_plain)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    finally:
        done.set()
        torch._dynamo.reset()
    assert not failures, failures
    layers = injected.config.num_hidden_layers
    stats = te_fx.get_te_attention_stats()
    assert sum(stats.values()) <= eager_steps[0] * layers
    assert stats == _stats(te_hits=eager_steps[0] * layers), "injected calls stepped aside while others compiled"


@pytest.mark.parametrize("fullgraph", [False, True])
def test_an_injected_model_under_te_attn_compiles_without_graph_break(fullgraph):
    """``backend="te_attn"`` on an injected model: the injection steps aside under Dynamo, the graph holds plain
    SDPA, and te_fx's FX pass rewrites it (the compile report lists the rewritten nodes)."""
    plain, injected = _pair("mistral")
    ids = _ids(2, 12)
    te_fx.reset_compile_report()
    compiled = torch.compile(
        injected, backend="te_attn", options={"executor": "reference", "inner": "eager"}, fullgraph=fullgraph
    )
    try:
        with torch.no_grad():
            out = compiled(ids).logits
            expected = plain(ids).logits
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    report = te_fx.compile_report()
    layers = injected.config.num_hidden_layers
    assert [entry["decision"] for entry in report] == ["te"] * layers, report
    assert all(entry["executor"] == "reference" for entry in report)
    assert te_fx.get_te_attention_stats() == ZERO_STATS  # the eager route did not run inside the graph
    with torch.no_grad():  # and the injected model still runs its eager route outside torch.compile
        torch.testing.assert_close(injected(ids).logits, expected, atol=ATOL, rtol=RTOL)
    assert te_fx.get_te_attention_stats() == _stats(te_hits=layers)


@pytest.mark.parametrize("fullgraph", [False, True])
def test_an_injected_model_compiles_with_the_eager_backend(fullgraph):
    """Any other backend gets the plain model's graph: fullgraph works, the outputs are the plain model's."""
    plain, injected = _pair("gemma3")
    ids = _ids(2, 12)
    compiled = torch.compile(injected, backend="eager", fullgraph=fullgraph)
    try:
        with torch.no_grad():
            out = compiled(ids).logits
    finally:
        torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(out, plain(ids).logits, atol=ATOL, rtol=RTOL)
    assert te_fx.get_te_attention_stats() == ZERO_STATS
    assert not _get_current_function_mode_stack()


def test_an_injected_model_under_torch_compile_warns_once(monkeypatch, caplog):
    """Traced graphs get plain SDPA: the te_fx logger says so once per process (not per call, layer, compile or
    model), naming backend="te_attn"; eager forwards say nothing."""
    monkeypatch.setattr(inject, "_compile_warned", False)
    plain, injected = _pair("llama_gqa")
    other = copy.deepcopy(injected)

    def compile_warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "te_fx" and "torch.compile" in r.getMessage()]

    with caplog.at_level(logging.WARNING, logger="te_fx"):
        with torch.no_grad():
            injected(_ids())
        assert compile_warnings() == []
        try:
            for model, seq_len in ((injected, 12), (injected, 9), (other, 12)):
                compiled = torch.compile(model, backend="eager", fullgraph=True)
                with torch.no_grad():
                    torch.testing.assert_close(
                        compiled(_ids(2, seq_len)).logits, plain(_ids(2, seq_len)).logits, atol=ATOL, rtol=RTOL
                    )
        finally:
            torch._dynamo.reset()
    (message,) = compile_warnings()
    assert 'backend="te_attn"' in message and "plain SDPA" in message


@pytest.mark.parametrize("strict", [True, False])
def test_an_injected_model_exports(strict):
    """torch.export (strict: Dynamo; non-strict: the Python forward under tracing) of an injected model gives the
    plain model's graph: plain SDPA, no te_fx op, the plain model's outputs. The eager route still runs after."""
    plain, injected = _pair("llama_gqa")
    ids = _ids(2, 8)
    with torch.no_grad():
        expected = plain(ids).logits
        program = torch.export.export(injected, (ids,), kwargs={"use_cache": False}, strict=strict)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert any("scaled_dot_product_attention" in target for target in targets), targets
    assert not any("te_fx" in target for target in targets), targets
    assert te_fx.get_te_attention_stats() == ZERO_STATS
    with torch.no_grad():
        torch.testing.assert_close(program.module()(ids, use_cache=False).logits, expected, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(injected(ids).logits, expected, atol=ATOL, rtol=RTOL)
    assert te_fx.get_te_attention_stats() == _stats(te_hits=injected.config.num_hidden_layers)
    assert not _get_current_function_mode_stack()


def test_an_injected_forward_in_another_thread_while_a_non_strict_export_runs_te():
    """torch.export's flag is the process's: while another thread exports non-strictly, an injected model here still
    runs TE (and is counted), exactly."""
    plain, injected = _pair("llama_gqa")
    ids = _ids(2, 8)
    inside, done = threading.Event(), threading.Event()

    class Waiting(torch.nn.Module):
        def forward(self, x):
            inside.set()
            done.wait(timeout=60)
            return x + 1

    exporter = threading.Thread(target=lambda: torch.export.export(Waiting(), (torch.ones(2),), strict=False))
    exporter.start()
    try:
        assert inside.wait(timeout=60)
        with torch.no_grad():
            out, expected = injected(ids).logits, plain(ids).logits
        stats = te_fx.get_te_attention_stats()
    finally:
        done.set()
        exporter.join()
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    assert stats == _stats(te_hits=injected.config.num_hidden_layers)


def test_an_injected_forward_in_another_thread_while_dynamo_compiles_runs_te():
    """Deterministic: while Dynamo compiles in this thread (inside the backend), another thread runs an injected
    model; its attention calls must still run TE."""
    _, injected = _pair("llama_gqa")
    hits = []

    def backend(gm, example_inputs):
        def other():
            with torch.no_grad():
                injected(_ids(1, 6))
            hits.append(te_fx.get_te_attention_stats()["te_hits"])

        te_fx.reset_te_attention_stats()
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        return gm.forward

    try:
        torch.compile(lambda x: x.sin() + 1, backend=backend)(torch.randn(3))
    finally:
        torch._dynamo.reset()
    assert hits == [injected.config.num_hidden_layers]
