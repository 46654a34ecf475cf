"""Eager-path speed (issue: per-call overhead and long-sequence fwd+bwd), measured side by side on one GPU.

Compares, with HF's input layout ((B, H, S, D) views of (B, S, H, D) projections):
  sdpa      torch SDPA as HF calls it with no mask (is_causal, enable_gqa)
  te_fx     te_fx's SDPA replacement (the function inject_te_attention installs) on the TE executor
  te_module TE's DotProductAttention called directly on contiguous bshd tensors (its own backend selection)
  te_call   TE's fused-attention function alone on contiguous bshd tensors: the floor for any TE-based path
Per-call times come from back-to-back calls between CUDA events (bench.timing.median_ms): the host runs ahead as
in a model, so a call costs the larger of its host time and its GPU time. Rounds are interleaved.

    python -m bench.eager_overhead [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from te_fx.executors.te import fused_attention
from te_fx.te_attention import _create_te_dot_product_attention, _make_te_sdpa

from .report import finish
from .timing import median_ms

SHAPES = {
    "B1 S128 H8 D64 causal fwd": dict(batch=1, seq=128, heads=8, kv_heads=8, head_dim=64, backward=False),
    "B2 S4096 H32 KV8 D128 causal fwd+bwd": dict(batch=2, seq=4096, heads=32, kv_heads=8, head_dim=128, backward=True),
}


def _variants(batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, backward: bool) -> dict:
    import transformer_engine.pytorch as te

    scale = head_dim**-0.5
    leaves = [
        torch.randn(batch, seq, h, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
        for h in (heads, kv_heads, kv_heads)
    ]
    grad = torch.randn(batch, seq, heads * head_dim, device="cuda", dtype=torch.bfloat16)
    te_sdpa = _make_te_sdpa(
        _create_te_dot_product_attention(heads, kv_heads, head_dim, softmax_scale=scale),
        heads,
        kv_heads,
        F.scaled_dot_product_attention,
        softmax_scale=scale,
    )
    plain_te = te.DotProductAttention(
        heads, head_dim, num_gqa_groups=kv_heads, qkv_format="bshd", attn_mask_type="causal", softmax_scale=scale
    )

    def run(attention):
        def step():
            q, k, v = (t.transpose(1, 2) for t in leaves)
            out = attention(q, k, v).transpose(1, 2).reshape(batch, seq, -1)  # what HF does with the output
            if backward:
                out.backward(grad)

        return step

    def te_call(q, k, v):
        out = fused_attention(*(t.transpose(1, 2) for t in (q, k, v)), "causal", (-1, 0), scale)
        return out.transpose(1, 2)

    def te_module(q, k, v):
        out = plain_te(*(t.transpose(1, 2).contiguous() for t in (q, k, v)))
        return out.view(batch, seq, heads, head_dim).transpose(1, 2)

    return {
        "sdpa": run(
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        ),
        "te_fx": run(lambda q, k, v: te_sdpa(q, k, v, is_causal=True, scale=scale, enable_gqa=True)),
        "te_module": run(te_module),
        "te_call": run(te_call),
    }


def measure(rounds: int = 5) -> dict:
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": {}}
    for name, shape in SHAPES.items():
        variants = _variants(**shape)
        samples = {key: [] for key in variants}
        for _ in range(rounds):
            for key, fn in variants.items():
                samples[key].append(median_ms(fn, torch.device("cuda"), warmup=10, reps=20))
        results["shapes"][name] = {key: statistics.median(v) for key, v in samples.items()}
    return results


def profile(calls: int = 300) -> None:
    """Host-side cProfile of te_fx's replacement at the smallest shape (where Python overhead dominates)."""
    import cProfile
    import pstats

    step = _variants(**SHAPES["B1 S128 H8 D64 causal fwd"])["te_fx"]
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        step()
    profiler.disable()
    torch.cuda.synchronize()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--profile", action="store_true", help="print a host-side profile of te_fx's calls")
    args = parser.parse_args()
    if args.profile:
        profile()
        return
    results = measure()
    print(f"device: {results['device']}  torch {results['torch']}")
    print(f"{'shape':<38} {'sdpa ms':>8} {'te_fx ms':>9} {'TE module':>10} {'TE call':>8} {'te_fx/sdpa':>11}")
    for name, r in results["shapes"].items():
        print(
            f"{name:<38} {r['sdpa']:8.4f} {r['te_fx']:9.4f} {r['te_module']:10.4f} {r['te_call']:8.4f}"
            f" {r['te_fx'] / r['sdpa']:11.2f}"
        )
    small = results["shapes"]["B1 S128 H8 D64 causal fwd"]
    large = results["shapes"]["B2 S4096 H32 KV8 D128 causal fwd+bwd"]
    targets = [
        (
            "per-call time within 1.5x of SDPA at B1 S128",
            small["te_fx"] / small["sdpa"] <= 1.5,
            f"te_fx/sdpa = {small['te_fx'] / small['sdpa']:.2f}",
        ),
        (
            "at least SDPA's speed at B2 S4096 fwd+bwd",
            large["sdpa"] / large["te_fx"] >= 1.0,
            f"sdpa/te_fx = {large['sdpa'] / large['te_fx']:.2f}",
        ),
    ]
    finish(results, targets, args.json)


if __name__ == "__main__":
    main()
