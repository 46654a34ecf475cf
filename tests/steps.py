"""Model steps shared by the tests of te_fx's ways in, and the runs of the bench scripts' tests."""

import json
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import DynamicCache

import te_fx


def padded_cache_training_step(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, cached: int):
    """(logits, layer 0's q_proj gradient) of a forward with autograd on over ``ids[:, cached:]`` against a
    DynamicCache that a no-grad forward filled with the first ``cached`` tokens, ``mask`` covering them all; te_fx's
    counters are reset before the step, so they count its attention calls."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :cached], attention_mask=mask[:, :cached], past_key_values=cache)
    te_fx.reset_te_attention_stats()
    logits = model(ids[:, cached:], attention_mask=mask, past_key_values=cache).logits
    logits.sum().backward()
    return logits, model.model.layers[0].self_attn.q_proj.weight.grad


def small_bench_results(main: Callable[[list[str]], None], folder: Path, warmup: int = 1, steps: int = 2) -> dict:
    """The JSON results of a side-by-side bench script's ``main`` run with ``--small`` on the CPU."""
    path = folder / "results.json"
    main(["--small", "--device", "cpu", "--warmup", str(warmup), "--steps", str(steps), "--json", str(path)])
    return json.loads(path.read_text())
