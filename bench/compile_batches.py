"""Issue 12's speed figures: ``torch.compile(model, backend="te_attn")`` against ``torch.compile(model)``
(Inductor) and te_fx's eager injection on the batches training feeds, one GPU, bf16, one run.

Times are medians in ms of timed training steps (forward + backward of the LM loss) after warm-ups
(bench.timing.median_ms); the first (compiling) step's seconds, the graphs compiled, graph breaks, te_attn's
compile report (nodes rewritten, the plans, the reasons of the others) and the te_fx ops the profiler saw in one
step. Cases (models from te_fx's tiny configs at real widths, each variant with the same weights and batch):
  1. Llama-3-8B shape, 2 layers, B1 S8192, mask of ones                      target te_attn >= 1.3x Inductor
  2. Mistral shape (sliding window 4096), 2 layers, B1 S8192, mask of ones   target >= 1.3x
  3. Gemma3 shape (sliding window 1024, head dim 256), 2 layers, mask of ones target >= 1.4x
  4. 1B-shaped Llama, 4 layers, B2 S4096, mask of ones, fp32 weights under bf16 autocast (HF Trainer's bf16)
                                                                             target >= 1.2x
  5. packed rows: 8 documents in B1 S8192 (position_ids restarting at 0, no mask), Llama-3-8B shape, 2 layers
                                                                             target >= 1.4x
  6. case 5's attention alone, fwd+bwd: Inductor's compiled SDPA with HF's packed mask built from position_ids
     against te_fx's op as te_attn runs it (the documents found from position_ids)  target >= 5x
and on every model case te_attn >= eager te_fx (a compiled model must not lose to the eager one).
``--small`` shrinks every case (hidden 64, 2 layers, S 64, fp32) for a CPU run with the reference executor and
``aot_eager`` in Inductor's place, measured against no target.

    python -m bench.compile_batches [--json PATH] [--device cuda|cpu] [--small] [--cases 1 3 ...]
"""

from __future__ import annotations

import contextlib
import copy
import time

import torch
import torch.nn.functional as F

import te_fx
from te_fx import ops
from te_fx.core.masks import position_starts

from . import models
from .eager_batches import DOCUMENTS, LLAMA_1B, _te_version, make_batch
from .hf_backend import Case, Target, _config, _counters, _dtype, _op_calls, _qkv, shrink
from .models import compile_counts
from .report import finish, side_by_side_arguments, variant_lines, versions_line
from .timing import median_ms, training_step

VARIANTS = ("eager_te_fx", "inductor", "te_attn")
RATIOS = {  # name: (numerator variant, denominator variant, label); > 1: te_attn faster
    "te_attn_vs_inductor": ("inductor", "te_attn", "te_attn vs Inductor"),
    "te_attn_vs_eager_te_fx": ("eager_te_fx", "te_attn", "te_attn vs eager te_fx"),
    "op_vs_inductor": ("inductor", "te_attn", "te_fx's op vs Inductor's SDPA"),
}
LLAMA = dict(models.LLAMA3_8B)
LLAMA_1B_LONG = {**LLAMA_1B, "max_position_embeddings": 32768}
MISTRAL = dict(models.MISTRAL_7B)
GEMMA3 = {**dict(models.GEMMA3), "layer_types": None}  # HF's 5:1 pattern: its first 2 layers are both sliding
NOT_SLOWER = Target("te_attn_vs_eager_te_fx", 1.0)

CASES = (
    Case("1 Llama-3-8B shape 2 layers B1 S8192", "model", "llama_gqa", LLAMA, 2, 1, 8192,
         targets=(Target("te_attn_vs_inductor", 1.3), NOT_SLOWER)),
    Case("2 Mistral shape 2 layers B1 S8192", "model", "mistral", MISTRAL, 2, 1, 8192,
         targets=(Target("te_attn_vs_inductor", 1.3), NOT_SLOWER)),
    Case("3 Gemma3 shape 2 layers B1 S8192", "model", "gemma3", GEMMA3, 2, 1, 8192,
         targets=(Target("te_attn_vs_inductor", 1.4), NOT_SLOWER)),
    Case("4 1B-shaped Llama 4 layers B2 S4096, autocast", "autocast", "llama_gqa", LLAMA_1B_LONG, 4, 2, 4096,
         targets=(Target("te_attn_vs_inductor", 1.2), NOT_SLOWER)),
    Case("5 packed B1 S8192 8 docs, Llama-3-8B shape 2 layers", "model", "llama_gqa", LLAMA, 2, 1, 8192,
         "packed", DOCUMENTS, (Target("te_attn_vs_inductor", 1.4), NOT_SLOWER)),
    Case("6 packed attention fwd+bwd, 8 docs S8192 H32 KV8 D128", "packed", "llama_gqa", LLAMA, 1, 1, 8192,
         "packed", DOCUMENTS, (Target("op_vs_inductor", 5.0),)),
)  # fmt: skip


def _inner(device: torch.device) -> str:
    return "inductor" if device.type == "cuda" else "aot_eager"


def model_case(case: Case, device: torch.device, executor: str, warmup: int, steps: int) -> dict:
    """Per variant: step ms, the first step's loss and layer 0's q_proj gradient norm; te_fx's counters (eager),
    te_attn's report, first-step seconds, graphs and graph breaks (compiled), te_fx ops in one step (te_fx's)."""
    from transformers import AutoModelForCausalLM

    autocast = case.kind == "autocast"
    weights = torch.float32 if autocast else _dtype(device)
    region = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(_config(case), attn_implementation="sdpa", dtype=weights).train()
    batch = make_batch(case, device)
    results = {}
    for name in VARIANTS:
        torch._dynamo.reset()
        te_fx.reset_compile_report()
        model = copy.deepcopy(base)
        if name == "eager_te_fx":
            te_fx.inject_te_attention(model, executor=executor)
        runner = model
        if name == "inductor":
            runner = torch.compile(model, backend=_inner(device))
        elif name == "te_attn":
            runner = torch.compile(model, backend="te_attn", options={"executor": executor, "inner": _inner(device)})

        step = training_step(model, runner, batch, region)
        te_fx.reset_te_attention_stats()
        graphs, breaks = compile_counts()
        start = time.perf_counter()
        r = {"loss": step().item(), "first_step_s": time.perf_counter() - start}
        r["q_grad_norm"] = model.model.layers[0].self_attn.q_proj.weight.grad.float().norm().item()
        if name == "eager_te_fx":
            r["counters"] = _counters()
        step()  # untimed: any recompile (gradients now allocated) stays out of the timing
        r["ms"] = median_ms(step, device, warmup=warmup, reps=steps)
        if name != "inductor":
            r["op_calls"] = _op_calls(step)
        if name != "eager_te_fx":
            now = compile_counts()
            r["graphs"], r["graph_breaks"] = now[0] - graphs, now[1] - breaks
        if name == "te_attn":
            report = te_fx.compile_report()
            r["rewritten"] = f"{sum(e['decision'] == 'te' for e in report)} of {len(report)}"
            r["plans"] = sorted(
                {f"{e['mask_kind']} {tuple(e['window_size'])}" for e in report if e["decision"] == "te"}
            )
            r["reasons"] = sorted({f"{e['reason']}: {e['detail']}" for e in report if e["decision"] != "te"})
        results[name] = r
        del model, runner, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    torch._dynamo.reset()
    results["max_abs_diff"] = max(abs(results[n]["loss"] - results["inductor"]["loss"]) for n in VARIANTS)
    return results


def packed_case(case: Case, device: torch.device, executor: str, warmup: int, steps: int) -> dict:
    """One layer's attention over packed documents, fwd+bwd, the mask's inputs given as position_ids: Inductor's
    compiled SDPA with HF's block-diagonal causal mask (made from them in the graph, K/V repeated) against te_fx's
    op as te_attn's graph calls it."""
    *heads_first, grad = _qkv(case, device)  # grad (B, S, H, D)
    q, k, v = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in heads_first)  # bshd, as projected
    positions = make_batch(case, device)["position_ids"]
    scale, rep = case.shape["head_dim"] ** -0.5, q.shape[2] // k.shape[2]

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """As HF's graph: the mask from position_ids, (B, H, S, D) views, K/V repeated."""
        document = position_starts(positions).cumsum(-1)
        index = torch.arange(positions.shape[-1], device=positions.device)
        mask = (document[:, :, None] == document[:, None, :]) & (index[None, :] <= index[:, None])
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k, v = (t.repeat_interleave(rep, dim=1) for t in (k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale).transpose(1, 2)

    def te(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """As te_attn's graph: the op on the projections' bshd tensors."""
        return ops.attention(q, k, v, mask_type="causal", window_size=(-1, 0), softmax_scale=scale,
                             position_ids=positions, executor=executor)  # fmt: skip

    calls = {"inductor": torch.compile(sdpa, backend=_inner(device)), "te_attn": te}
    results = {}
    for name, call in calls.items():
        results[name] = {"ms": median_ms(lambda c=call: c(q, k, v, positions).backward(grad), device, warmup, steps)}
    results["te_attn"]["op_calls"] = _op_calls(lambda: te(q, k, v, positions).backward(grad))
    with torch.no_grad():
        results["max_abs_diff"] = (sdpa(q, k, v, positions).float() - te(q, k, v, positions).float()).abs().max().item()
    return results


RUNS = {"model": model_case, "autocast": model_case, "packed": packed_case}


def measure(device: torch.device, small: bool, warmup: int, steps: int, numbers: list[int] | None = None) -> dict:
    """The cases (those numbered in ``numbers``, else all) with their ratios, versions and the device's name."""
    import transformers

    executor = "te" if device.type == "cuda" else "reference"
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "executor": executor,
        "transformer_engine": _te_version(), "small": small, "warmup": warmup, "steps": steps,
        "dtype": str(_dtype(device)).removeprefix("torch."), "inner": _inner(device), "cases": {},
    }  # fmt: skip
    for number, case in enumerate(CASES, 1):
        if numbers and number not in numbers:
            continue
        case = shrink(case) if small else case
        torch.manual_seed(0)
        r = RUNS[case.kind](case, device, executor, warmup, steps)
        ratios = {}
        for key in (t.ratio for t in case.targets):
            slower, faster, _ = RATIOS[key]
            ratios[key] = r[slower]["ms"] / r[faster]["ms"]
        results["cases"][case.name] = {"targets": {t.ratio: t.goal for t in case.targets}, "ratios": ratios, **r}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def verdicts(name: str, r: dict, small: bool = False) -> list[tuple[str, bool, str]]:
    """(label, PASS, detail) per target of one case; none for a ``--small`` run."""
    if small:
        return []
    return [(f"{name}: {RATIOS[key][2]}", r["ratios"][key] >= goal, f"{r['ratios'][key]:.2f}x (goal >= {goal}x)")
            for key, goal in r["targets"].items()]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = side_by_side_arguments(__doc__, argv, cases=True)
    results = measure(torch.device(args.device), args.small, args.warmup, args.steps, args.cases)
    print(versions_line(results, results["dtype"], f"compile {results['inner']}"))
    rows = []
    for name, r in results["cases"].items():
        print("\n".join([name, *variant_lines(r, 12)]))
        print(f"    max_abs_diff {r['max_abs_diff']:.3g}")
        for label, ok, detail in verdicts(name, r, results["small"]):
            print(f"    {'PASS' if ok else 'FAIL'} {label} {detail}")
        rows += verdicts(name, r, results["small"])
    finish(results, rows, args.json)


if __name__ == "__main__":
    main()
