"""Compiled training step: ``torch.compile(backend="te_attn")`` against ``torch.compile()`` (Inductor), one GPU.

A Llama-style stack (hidden 4096, 32 heads, 8 KV heads, head dim 128, MLP 14336, vocab 32000, bf16) built from a
config, batch 1, S 8192, an attention_mask of ones passed as a tokenizer does; forward + backward of the LM loss,
median of timed steps after warm-ups (the first warm-ups include compilation). Also the attention op alone, forward
+ backward: SDPA as stock compiled HF runs it (materialised bool mask, repeated K/V) against te_fx's op.

    python -m bench.compile_step [--layers 4] [--seq 8192] [--steps 10] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import te_fx
from te_fx import ops
from te_fx.core.reasons import reason_text

from .report import finish
from .timing import median_ms


def _model(layers: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=14336,
        num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=32768,
    )  # fmt: skip
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16).train()


def _time_steps(step, warmup: int, steps: int) -> tuple[float, float]:
    """(median step ms, seconds of the warm-up steps, compilation included)."""
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end))
    return statistics.median(times), warm_s


def model_step(layers: int, seq: int, steps: int) -> dict:
    model = _model(layers)
    ids = torch.randint(0, 32000, (1, seq), device="cuda")
    mask = torch.ones_like(ids)
    results = {}
    variants = {
        "eager": model,
        "inductor": torch.compile(model),
        "te_attn": torch.compile(model, backend="te_attn"),
    }
    for name, compiled in variants.items():
        torch._dynamo.reset()
        te_fx.reset_compile_report()

        def step(compiled=compiled):
            model.zero_grad(set_to_none=True)
            compiled(ids, attention_mask=mask, labels=ids).loss.backward()

        torch.cuda.reset_peak_memory_stats()
        ms, warm_s = _time_steps(step, 3, steps)
        results[name] = {"step_ms": ms, "warmup_s": warm_s, "peak_gb": torch.cuda.max_memory_allocated() / 1e9}
        if name == "te_attn":
            report = te_fx.compile_report()
            results[name]["report"] = {
                "sdpa_nodes": len(report),
                "rewritten": sum(e["decision"] == "te" for e in report),
                "mask_kinds": sorted({str(e["mask_kind"]) for e in report}),
                "reasons": sorted({reason_text(e["reason"], e["detail"]) for e in report}),
            }
    return results


def attention_op(seq: int) -> dict:
    """Forward + backward of the attention op alone at B1, H32, KV8, D128, bf16, S=seq: eager, and compiled with
    Inductor (as inside a compiled model, where the mask building and te_fx's permutations are fused)."""
    batch, heads, kv_heads, dim, scale = 1, 32, 8, 128, 128**-0.5
    q = torch.randn(batch, seq, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(batch, seq, kv_heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))  # fmt: skip
    ones = torch.ones(batch, seq, dtype=torch.long, device="cuda")
    grad = torch.randn(batch, seq, heads, dim, device="cuda", dtype=torch.bfloat16)
    te_config = dict(mask_type="causal", window_size=(-1, 0), softmax_scale=scale, executor="te")

    def sdpa_hf_mask(q, k, v, ones):  # what stock compiled HF runs: a materialised bool mask, K/V repeated
        idx = torch.arange(seq, device=q.device)
        mask = ((idx[None, :] <= idx[:, None])[None, None] & ones.bool()[:, None, None, :]).expand(batch, 1, seq, seq)
        kr, vr = (t.transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
        return F.scaled_dot_product_attention(q.transpose(1, 2), kr, vr, attn_mask=mask, scale=scale).transpose(1, 2)

    def te_fx_padding_causal(q, k, v, ones):  # what te_attn makes of it
        return ops.attention(q, k, v, key_padding_mask=ones, **te_config)

    def te_fx_causal(q, k, v, ones):
        return ops.attention(q, k, v, **te_config)

    def sdpa_is_causal(q, k, v, ones):
        bhsd = (t.transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(*bhsd, is_causal=True, scale=scale, enable_gqa=True).transpose(1, 2)

    forwards = {f.__name__: f for f in (sdpa_hf_mask, te_fx_padding_causal, te_fx_causal, sdpa_is_causal)}
    variants = {**{f"{name} eager": f for name, f in forwards.items()},
                **{f"{name} compiled": torch.compile(f, fullgraph=True) for name, f in forwards.items()}}  # fmt: skip
    samples = {name: [] for name in variants}
    for _ in range(3):
        for name, forward in variants.items():
            step = lambda forward=forward: forward(q, k, v, ones).backward(grad)  # noqa: E731
            samples[name].append(median_ms(step, q.device, warmup=5, reps=10))
    return {name: statistics.median(v) for name, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--op-only", action="store_true", help="time the attention op alone")
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    results["attention_op_fwd_bwd_ms"] = op = attention_op(args.seq)
    if args.op_only:
        print(json.dumps(results, indent=1))
        return
    results["model_step"] = step = model_step(args.layers, args.seq, args.steps)
    print(f"device: {results['device']}  torch {results['torch']}")
    print(f"attention op fwd+bwd (B1 S{args.seq} H32 KV8 D128 bf16), ms:")
    for name, ms in op.items():
        print(f"  {name:<32} {ms:8.3f}")
    print(f"training step ({args.layers} layers, S{args.seq}), ms / warm-up s / peak GB:")
    for name, r in step.items():
        print(f"  {name:<10} {r['step_ms']:8.1f} {r['warmup_s']:8.1f} {r['peak_gb']:6.1f}")
    print(f"  te_attn report: {step['te_attn']['report']}")
    step_ratio = step["inductor"]["step_ms"] / step["te_attn"]["step_ms"]
    op_ratio = op["sdpa_hf_mask compiled"] / op["te_fx_padding_causal compiled"]
    targets = [
        ("compiled training step >= 1.3x over Inductor", step_ratio >= 1.3, f"{step_ratio:.2f}x"),
        ("attention op fwd+bwd (compiled) >= 3x over SDPA with HF's mask", op_ratio >= 3.0, f"{op_ratio:.2f}x"),
    ]
    finish(results, targets, args.json)


if __name__ == "__main__":
    main()
