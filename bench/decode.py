"""Issue 13's decode figure: greedy decoding with StaticCache, the model's forward compiled with CUDA graphs
(``mode="reduce-overhead"``), one GPU, bf16, one run: tokens per second of HF's SDPA under Inductor, of
``torch.compile(backend="te_attn")`` and of ``attn_implementation="te"`` under Inductor, at B1 and B8.

The model is a 1B-shaped Llama (hidden 2048, 16 layers, 32 heads, 8 KV heads), the same weights in every variant;
a prompt of 128 tokens with a mask of ones, 128 new tokens. A variant's first generate of a batch size compiles and
records its graphs (its seconds are reported); its time is the median of ``--steps`` generates after ``--warmup``
more. Sanity: how many leading new tokens of every row equal the SDPA variant's (bf16 near ties may swap a token),
and te_attn's compile report (the attention nodes it rewrote). Targets: each te_fx variant's tokens/s at least
SDPA's, at each batch size. ``--small`` shrinks the model (hidden 64, 2 layers, prompt 16, 8 new tokens, fp32) for a
CPU run with the reference executor and ``backend="aot_eager"`` without CUDA graphs, measured against no target.

    python -m bench.decode [--json PATH] [--device cuda|cpu] [--small] [--warmup N] [--steps N]
"""

from __future__ import annotations

import statistics
import time

import torch
import transformers
from transformers import AutoModelForCausalLM

import te_fx
from te_fx.executors import executor_env
from te_fx.tools.tiny_models import tiny_config

from .eager_batches import LLAMA_1B, SMALL, _te_version
from .report import finish, side_by_side_arguments, versions_line

VARIANTS = ("sdpa", "te_attn", "te")  # HF's SDPA compiled, te_attn, attn_implementation="te" compiled
BATCHES = (1, 8)
FULL = {"config": {**LLAMA_1B, "num_hidden_layers": 16, "max_position_embeddings": 4096}, "prompt": 128, "new": 128}
SHRUNK = {"config": {**SMALL, "num_hidden_layers": 2}, "prompt": 16, "new": 8}
GREEDY = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0, "cache_implementation": "static",
          "disable_compile": True}  # fmt: skip


def _compile_options(variant: str, device: torch.device) -> dict:
    """torch.compile's arguments for ``variant``: CUDA graphs on a GPU; on a CPU aot_eager (no Inductor compile)."""
    if device.type == "cuda":
        return {"backend": "te_attn" if variant == "te_attn" else "inductor", "mode": "reduce-overhead"}
    if variant == "te_attn":
        return {"backend": "te_attn", "options": {"inner": "aot_eager"}}
    return {"backend": "aot_eager"}


def _model(config, variant: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:  # noqa: ANN001
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device, dtype).eval()
    if variant == "te":
        model.set_attn_implementation("te")
    model.forward = torch.compile(model.forward, **_compile_options(variant, device))
    return model


def _generate(model: torch.nn.Module, ids: torch.Tensor, new: int) -> torch.Tensor:
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, **GREEDY)
    if ids.is_cuda:
        torch.cuda.synchronize(ids.device)
    return out[:, ids.shape[1] :]


def _decode(model: torch.nn.Module, ids: torch.Tensor, new: int, warmup: int, steps: int) -> tuple[dict, torch.Tensor]:
    start = time.perf_counter()
    tokens = _generate(model, ids, new)
    first_s = time.perf_counter() - start
    for _ in range(warmup):
        _generate(model, ids, new)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        _generate(model, ids, new)
        times.append((time.perf_counter() - start) * 1e3)
    ms = statistics.median(times)
    return {"ms": ms, "tokens_per_s": ids.shape[0] * new / (ms / 1e3), "first_s": first_s}, tokens


def _equal_leading(tokens: torch.Tensor, reference: torch.Tensor) -> int:
    """The number of leading new tokens that every row shares with the reference."""
    differs = (tokens != reference).any(dim=0).nonzero()
    return int(differs[0]) if len(differs) else tokens.shape[1]


def measure(device: torch.device, small: bool = False, warmup: int = 2, steps: int = 5) -> dict:
    sizes = SHRUNK if small else FULL
    dtype = torch.float32 if small else torch.bfloat16
    executor = "reference" if device.type == "cpu" else "te"
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "transformers": transformers.__version__,
               "transformer_engine": _te_version(), "executor": executor, "dtype": str(dtype).removeprefix("torch."),
               "small": small, "batches": {}}  # fmt: skip
    config = tiny_config("llama_gqa", **sizes["config"])
    generator = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(3, config.vocab_size, (b, sizes["prompt"]), generator=generator) for b in BATCHES}
    with executor_env(executor):
        for variant in VARIANTS:
            torch._dynamo.reset()
            te_fx.reset_compile_report()
            model = _model(config, variant, device, dtype)
            for batch in BATCHES:
                r, tokens = _decode(model, prompts[batch].to(device), sizes["new"], warmup, steps)
                row = results["batches"].setdefault(f"B{batch}", {})
                reference = row.get("sdpa", {}).get("tokens")
                if reference is not None:
                    r["equal_leading_tokens"] = _equal_leading(tokens, torch.tensor(reference, device=device))
                row[variant] = {**r, "tokens": tokens.tolist()}
            if variant == "te_attn":
                report = te_fx.compile_report()
                results["te_attn_rewritten"] = f"{sum(e['decision'] == 'te' for e in report)} of {len(report)}"
            del model
    return results


def verdicts(results: dict) -> list[tuple[str, bool, str]]:
    """Each te_fx variant's tokens/s at least SDPA's, per batch size (no target for a --small run)."""
    if results["small"]:
        return []
    rows = []
    for batch, r in results["batches"].items():
        for variant in VARIANTS[1:]:
            ratio = r[variant]["tokens_per_s"] / r["sdpa"]["tokens_per_s"]
            rows.append((f"{batch} {variant} tokens/s vs SDPA", ratio >= 1.0, f"{ratio:.2f}x (goal >= 1.0x)"))
    return rows


def main(argv: list[str] | None = None) -> None:
    args = side_by_side_arguments(__doc__, argv)
    results = measure(torch.device(args.device), args.small, args.warmup, args.steps)
    print(versions_line(results, results["dtype"], f"te_attn rewrote {results.get('te_attn_rewritten')}"))
    for batch, r in results["batches"].items():
        for variant, v in r.items():
            shown = {k: round(v[k], 2) for k in ("first_s", "equal_leading_tokens") if k in v}
            print(f"{batch} {variant:<8} {v['ms']:9.1f} ms  {v['tokens_per_s']:9.1f} tokens/s  {shown}")
    finish(results, verdicts(results), args.json)


if __name__ == "__main__":
    main()
