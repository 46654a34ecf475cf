"""Model-level benchmark: HF models built from configs at real widths with fewer layers, trained and prefilled
under every way a user could run attention: eager SDPA, eager ``inject_te_attention``, ``torch.compile()``
(Inductor) and ``torch.compile(backend="te_attn")``."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

import te_fx
from te_fx.core.reasons import reason_text

from .timing import median_ms

__all__ = ["ModelCase", "run_model_case", "quick_models", "full_models", "smoke_models", "VARIANTS"]

VARIANTS = ("eager sdpa", "eager te_fx", "inductor", "te_attn")


@dataclass(frozen=True)
class ModelCase:
    """A config (``family`` + overrides) trained at (batch, seq) with an attention_mask of ones."""

    name: str
    family: str
    overrides: tuple[tuple[str, object], ...]
    batch: int
    seq: int

    def config(self):  # noqa: ANN201
        from te_fx.tools.tiny_models import tiny_config

        return tiny_config(self.family, **dict(self.overrides))


def _real(family: str, **fields: object) -> tuple[tuple[str, object], ...]:
    base = {"vocab_size": 32000, "max_position_embeddings": 32768, "initializer_range": 0.02}
    return tuple({**base, **fields}.items())


LLAMA3_8B = _real("llama_gqa", hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                  intermediate_size=14336)  # fmt: skip
QWEN2_7B = _real("qwen2", hidden_size=3584, num_attention_heads=28, num_key_value_heads=4, head_dim=128,
                 intermediate_size=18944, use_sliding_window=False, layer_types=None)  # fmt: skip
MISTRAL_7B = _real("mistral", hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                   intermediate_size=14336, sliding_window=4096)  # fmt: skip
GEMMA3 = _real("gemma3", hidden_size=2560, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
               intermediate_size=10240, sliding_window=1024, query_pre_attn_scalar=256)  # fmt: skip


def quick_models() -> list[ModelCase]:
    return [
        ModelCase("llama3-8b-like 4 layers", "llama_gqa", (*LLAMA3_8B, ("num_hidden_layers", 4)), 1, 8192),
        ModelCase("mistral-7b-like 2 layers", "mistral", (*MISTRAL_7B, ("num_hidden_layers", 2)), 1, 8192),
    ]


def full_models() -> list[ModelCase]:
    return quick_models() + [
        ModelCase("qwen2-7b-like 4 layers", "qwen2", (*QWEN2_7B, ("num_hidden_layers", 4)), 1, 8192),
        ModelCase("gemma3-like 6 layers", "gemma3", (*GEMMA3, ("num_hidden_layers", 6)), 1, 8192),
    ]


def smoke_models() -> list[ModelCase]:
    return [ModelCase("tiny llama_gqa", "llama_gqa", (), 2, 32), ModelCase("tiny mistral", "mistral", (), 2, 32)]


def _unique_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def compile_counts() -> tuple[int, int]:
    """(graphs compiled, graph breaks) so far in this process, as Dynamo counts them."""
    return _unique_graphs(), sum(torch._dynamo.utils.counters["graph_break"].values())


def run_model_case(case: ModelCase, device: torch.device, dtype: torch.dtype, executor: str, reps: int) -> dict:
    """Forward + backward, training step (that + AdamW) and prefill (no grad) per variant: ms, tokens/s, peak
    memory, warm-up seconds (compilation included), graphs compiled, and te_fx's dispatch summary."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        base = AutoModelForCausalLM.from_config(case.config(), attn_implementation="sdpa", dtype=dtype)
    ids = torch.randint(3, base.config.vocab_size, (case.batch, case.seq), device=device)
    mask = torch.ones_like(ids)
    inner = "inductor" if device.type == "cuda" else "aot_eager"
    results = {}
    for variant in VARIANTS:
        if variant == "inductor" and device.type != "cuda":
            continue  # Inductor's CPU compile of these models takes minutes: the CPU smoke run skips it
        torch._dynamo.reset()
        te_fx.reset_compile_report()
        te_fx.reset_te_attention_stats()
        model = copy.deepcopy(base).train()
        if variant == "eager te_fx":
            te_fx.inject_te_attention(model, executor=executor)
        runner = model
        if variant == "inductor":
            runner = torch.compile(model)
        elif variant == "te_attn":
            runner = torch.compile(model, backend="te_attn", options={"executor": executor, "inner": inner})
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

        # optimizer and runner bound as defaults: each closure uses this iteration's, not the loop's last
        def forward_backward(optimizer=optimizer, runner=runner) -> None:
            optimizer.zero_grad(set_to_none=True)
            runner(ids, attention_mask=mask, labels=ids).loss.backward()

        def train_step(optimizer=optimizer, forward_backward=forward_backward) -> None:
            forward_backward()
            optimizer.step()

        def prefill(runner=runner) -> None:
            with torch.no_grad():
                runner(ids, attention_mask=mask)

        graphs = _unique_graphs()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        train_step()
        warmup_s = time.perf_counter() - start
        step_ms = median_ms(train_step, device, warmup=2, reps=reps)
        fwd_bwd_ms = median_ms(forward_backward, device, warmup=1, reps=reps)
        peak_gb = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
        model.eval()
        prefill_ms = median_ms(prefill, device, warmup=2, reps=reps)
        report = te_fx.compile_report()
        results[variant] = {
            "fwd_bwd_ms": fwd_bwd_ms,
            "step_ms": step_ms,
            "tokens_per_s": case.batch * case.seq / (step_ms * 1e-3),
            "prefill_ms": prefill_ms,
            "peak_gb": peak_gb,
            "warmup_s": warmup_s,
            "graphs_compiled": _unique_graphs() - graphs,
            "te_fx_eager": {k: n for k, n in te_fx.get_te_attention_stats().items() if n},
            "te_fx_compile": {
                "sdpa_nodes": len(report),
                "rewritten": sum(e["decision"] == "te" for e in report),
                "reasons": sorted({reason_text(e["reason"], e["detail"]) for e in report if e["decision"] != "te"}),
            },
        }
        del runner, model, optimizer
    return results
