"""Eager training steps on the batches real training feeds: plain HF SDPA against ``inject_te_attention``, one GPU.

Forward + backward of the LM loss (labels = input_ids, -100 at padded positions), median ms of timed steps after
warm-ups (bench.timing.median_ms), for a plain model, a deep copy injected with te_fx and one more running
``attn_implementation="te"`` (reported beside, no target); te_fx's dispatch counters of one step show how many
attention calls ran TE and why the others fell back. Cases:
  1. right-padded B4 S4096, 1B-shaped Llama (16 layers), bf16          target te_fx >= 1.3x plain
  2. the same under bf16 autocast with fp32 weights (HF Trainer bf16)  target >= 1.3x
  3. bf16 autocast, fp32 weights, mask of ones, B2 S4096, 4 layers     target >= 0.97x, every call on TE
  4. packed rows: 8 documents in B1 S8192 (position_ids restart, no mask), Llama-3-8B shape, 2 layers, bf16
                                                                       target >= 1.3x
  5. the attention op alone for case 4's batch: SDPA with HF's block-diagonal mask against ops.attention with
     cu_seqlens                                                        target >= 5x
  6. Llama-3-8B shape, 2 layers, bf16, B1 S8192, mask of ones          reported, no target
``--small`` shrinks every case (hidden 64, 2 layers, S 64) for a CPU run with the reference executor.

    python -m bench.eager_batches [--json PATH] [--device cuda|cpu] [--small]
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import te_fx
from te_fx import ops
from te_fx.executors import executor_env

from .report import finish, side_by_side_arguments, versions_line
from .timing import median_ms

LLAMA_1B = {"hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
            "intermediate_size": 8192, "vocab_size": 32000}  # fmt: skip
LLAMA3_8B = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
             "intermediate_size": 14336, "vocab_size": 32000}  # fmt: skip
SMALL = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "vocab_size": 128,
    "initializer_range": 0.2,
}  # larger weights: sharper attention
PADDED = (4096, 3584, 2560, 1096)
DOCUMENTS = (2048, 1536, 1280, 1024, 896, 640, 512, 256)  # sum 8192


@dataclass(frozen=True)
class Case:
    """One side-by-side measurement; ``lengths`` are per-row lengths ("padded") or document lengths ("packed")."""

    name: str
    shape: dict
    layers: int
    batch: int
    seq: int
    inputs: str  # "padded", "ones" or "packed"
    autocast: bool = False
    lengths: tuple[int, ...] = ()
    target: float | None = None
    op_only: bool = False


CASES = (
    Case("1 right-padded B4 S4096, 1B-shaped, bf16", LLAMA_1B, 16, 4, 4096, "padded", lengths=PADDED, target=1.3),
    Case("2 right-padded B4 S4096, 1B-shaped, autocast", LLAMA_1B, 16, 4, 4096, "padded", True, PADDED, 1.3),
    Case("3 mask of ones B2 S4096, 1B-shaped 4 layers, autocast", LLAMA_1B, 4, 2, 4096, "ones", True, target=0.97),
    Case("4 packed B1 S8192 8 docs, 8B-shaped 2 layers, bf16", LLAMA3_8B, 2, 1, 8192, "packed", lengths=DOCUMENTS,
         target=1.3),
    Case("5 packed attention op fwd+bwd, S8192 H32 KV8 D128", LLAMA3_8B, 0, 1, 8192, "packed", lengths=DOCUMENTS,
         target=5.0, op_only=True),
    Case("6 mask of ones B1 S8192, 8B-shaped 2 layers, bf16", LLAMA3_8B, 2, 1, 8192, "ones"),
)  # fmt: skip


def shrink(case: Case, seq: int = 64) -> Case:
    """``case`` at hidden 64, 2 layers (0 for the op), S ``seq``; lengths scaled (documents still sum to S)."""
    lengths = [max(1, n * seq // case.seq) for n in case.lengths]
    if case.inputs == "packed":
        lengths[0] += seq - sum(lengths)
    layers = min(case.layers, 2)
    return Case(case.name, SMALL, layers, case.batch, seq, case.inputs, case.autocast, tuple(lengths), case.target,
                case.op_only)  # fmt: skip


def make_batch(case: Case, device: torch.device) -> dict:
    """input_ids, labels and attention_mask or position_ids as a collator would build them."""
    ids = torch.randint(3, case.shape["vocab_size"], (case.batch, case.seq), device=device)
    if case.inputs == "packed":
        positions = torch.cat([torch.arange(n, device=device) for n in case.lengths]).expand(case.batch, -1)
        return {"input_ids": ids, "labels": ids, "position_ids": positions, "use_cache": False}
    mask = torch.ones_like(ids)
    if case.inputs == "padded":
        mask = (torch.arange(case.seq, device=device) < torch.tensor(case.lengths, device=device)[:, None]).long()
    return {"input_ids": ids, "labels": ids.masked_fill(mask == 0, -100), "attention_mask": mask}


def _model(case: Case, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**case.shape, num_hidden_layers=case.layers, max_position_embeddings=32768)
    dtype = torch.float32 if case.autocast else torch.bfloat16
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype).train()


def model_case(case: Case, device: torch.device, executor: str, warmup: int, steps: int) -> dict:
    """Step ms, the first step's loss and layer 0's q_proj gradient norm, and one step's dispatch counters (te_fx's
    two ways in) for plain SDPA, the eager injection ("te_fx") and ``attn_implementation="te"`` ("te_backend")."""
    plain = _model(case, device)
    injected = copy.deepcopy(plain)
    te_fx.inject_te_attention(injected, executor=executor)
    backend = copy.deepcopy(plain)
    backend.set_attn_implementation("te")
    batch = make_batch(case, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if case.autocast else contextlib.nullcontext()
    results = {}
    for name, model in (("plain", plain), ("te_fx", injected), ("te_backend", backend)):

        def step(model: torch.nn.Module = model) -> torch.Tensor:
            model.zero_grad(set_to_none=True)
            with autocast, executor_env(executor):
                loss = model(**batch).loss
            loss.backward()
            return loss

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        te_fx.reset_te_attention_stats()
        loss = step().item()
        counters = {k: n for k, n in te_fx.get_te_attention_stats().items() if n}
        q_grad = model.model.layers[0].self_attn.q_proj.weight.grad.float().norm().item()  # flows through attention
        results[name] = {"ms": median_ms(step, device, warmup=warmup, reps=steps), "loss": loss, "q_grad_norm": q_grad}
        if device.type == "cuda":
            results[name]["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if name != "plain":
            results[name]["counters"] = counters
        model.zero_grad(set_to_none=True)
    return results


def op_case(case: Case, device: torch.device, executor: str, warmup: int, steps: int) -> dict:
    """Forward + backward of one attention call over packed documents: SDPA with HF's mask vs ops.attention."""
    if "cu_seqlens" not in inspect.signature(ops.attention).parameters:
        return {"skipped": "n/a: ops.attention has no cu_seqlens"}
    heads, kv_heads, dim = case.shape["num_attention_heads"], case.shape["num_key_value_heads"], case.shape["head_dim"]
    dtype, scale = torch.bfloat16 if device.type == "cuda" else torch.float32, dim**-0.5
    q = torch.randn(case.batch, case.seq, heads, dim, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(case.batch, case.seq, kv_heads, dim, device=device, dtype=dtype, requires_grad=True)
            for _ in range(2))  # fmt: skip
    grad = torch.randn_like(q)
    docs = torch.tensor(case.lengths, device=device)
    cu = F.pad(docs.cumsum(0), (1, 0)).to(torch.int32)
    doc = torch.repeat_interleave(torch.arange(len(case.lengths), device=device), docs)
    idx = torch.arange(case.seq, device=device)
    mask = ((doc[:, None] == doc[None, :]) & (idx[None, :] <= idx[:, None]))[None, None]  # (1, 1, S, S) as HF's

    def plain() -> torch.Tensor:
        kr, vr = (t.transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
        return F.scaled_dot_product_attention(q.transpose(1, 2), kr, vr, attn_mask=mask, scale=scale).transpose(1, 2)

    def te() -> torch.Tensor:
        return ops.attention(q, k, v, mask_type="causal", window_size=(-1, 0), softmax_scale=scale, cu_seqlens=cu,
                             executor=executor)  # fmt: skip

    with torch.no_grad():
        diff = (plain().float() - te().float()).abs().max().item()
    results = {"max_abs_diff": diff}
    for name, forward in (("plain", plain), ("te_fx", te)):
        results[name] = {"ms": median_ms(lambda f=forward: f().backward(grad), device, warmup=warmup, reps=steps)}
    return results


def measure(device: torch.device, small: bool = False, warmup: int = 3, steps: int = 10) -> dict:
    """Every case, plain and te_fx, with versions and the device's name."""
    import transformers

    executor = "te" if device.type == "cuda" else "reference"
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "executor": executor,
        "transformer_engine": _te_version(), "small": small, "warmup": warmup, "steps": steps, "cases": {},
    }  # fmt: skip
    for case in CASES:
        case = shrink(case) if small else case
        torch.manual_seed(0)
        run = op_case if case.op_only else model_case
        r = run(case, device, executor, warmup, steps)
        if "plain" in r:
            r["speedup"] = r["plain"]["ms"] / r["te_fx"]["ms"]
        if "te_backend" in r:
            r["speedup_te_backend"] = r["plain"]["ms"] / r["te_backend"]["ms"]
        results["cases"][case.name] = {"target": case.target, **r}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def _te_version() -> str | None:
    try:
        import transformer_engine
    except ImportError:
        return None
    return getattr(transformer_engine, "__version__", "unknown")


def verdict(name: str, r: dict, small: bool = False) -> tuple[bool | None, str]:
    """PASS (True) / FAIL (False) / no target (None) of one case, with the detail; case 3 also needs every
    attention call on TE. A ``--small`` run is measured against no target."""
    if "speedup" not in r:
        return None, r.get("skipped", "not measured")
    if r["target"] is None or small:
        return None, f"{r['speedup']:.2f}x (no target)"
    ok, detail = r["speedup"] >= r["target"], f"{r['speedup']:.2f}x (goal {r['target']}x)"
    if name.startswith("3 "):
        fallbacks = {k: n for k, n in r["te_fx"]["counters"].items() if k != "te_hits"}
        ok, detail = ok and not fallbacks, f"{detail}, fallbacks: {fallbacks or 'none'}"
    return ok, detail


def main(argv: list[str] | None = None) -> None:
    args = side_by_side_arguments(__doc__, argv)
    results = measure(torch.device(args.device), args.small, args.warmup, args.steps)
    print(versions_line(results))
    rows = []
    for name, r in results["cases"].items():
        ok, detail = verdict(name, r, results["small"])
        if "speedup" in r:
            goal = {True: "PASS", False: "FAIL", None: "----"}[ok]
            print(f"{name:<56} plain {r['plain']['ms']:8.2f} ms  te_fx {r['te_fx']['ms']:8.2f} ms"
                  f"  {r['speedup']:5.2f}x  {goal}  {r['te_fx'].get('counters', '')}")  # fmt: skip
            if "te_backend" in r:
                print(f"{'':<56} attn_implementation='te' {r['te_backend']['ms']:8.2f} ms"
                      f"  {r['speedup_te_backend']:5.2f}x  {r['te_backend']['counters']}")  # fmt: skip
        else:
            print(f"{name:<56} {detail}")
        if ok is not None:
            rows.append((name, ok, detail))
    finish(results, rows, args.json)


if __name__ == "__main__":
    main()
