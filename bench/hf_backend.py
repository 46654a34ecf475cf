"""Issue 11's speed figures: ``attn_implementation="te"`` against HF's SDPA, te_fx's eager injection, HF's eager
attention and ``torch.compile``, one GPU, bf16, one run.

Times are medians in ms of timed calls after warm-ups (bench.timing.median_ms). For te_fx's variants, its dispatch
counters of one step (or call) show how many attention calls ran TE and why the others fell back (eager only: a
compiled graph counts nothing), and ``op_calls`` the te_fx custom ops the profiler saw in one step, compiled or not.
Sanity figures: the largest difference of the losses (model cases) or outputs (attention cases) from the HF
reference. Cases:
  1. Llama-3-8B shape, 2 layers, B1 S8192, mask of ones, training step fwd+bwd of the LM loss, five models from
     ``AutoModelForCausalLM.from_config(config, attn_implementation=...)``: "sdpa" eager, "sdpa" +
     ``te_fx.inject_te_attention``, "te" eager, "sdpa" and "te" under plain ``torch.compile(model)``
                                                   targets te >= 1.0x injection, te compiled >= 1.3x sdpa compiled
  2. the same on a Gemma3 shape (sliding window 1024, head dim 256; its first 2 layers, both sliding)
                                                   targets te >= 1.3x sdpa, >= 1.0x injection, compiled >= 1.3x
  3. packed rows: 8 documents in B1 S8192, the attention alone fwd+bwd: te_fx's ``te_attention_forward`` with the
     collator's ``cu_seq_lens_q/k``, ``max_length_q/k`` and ``position_ids`` and the mask ``te_mask`` returns
     (from transformers' ``create_causal_mask``), against HF's ``sdpa_attention_forward`` with HF's packed 4D mask
     (both masks built once, outside the timing, as a model builds them once per forward)   target >= 5x
  4. GPT-OSS-shaped sinks, attention alone fwd+bwd, B1 S8192 H32 KV8 D128, causal: ``te_attention_forward`` with
     ``s_aux`` (a learnable (H,) parameter) against it without, and GPT-OSS's own eager attention
                                                   target sinks <= 1.1x causal (the ratio to HF's eager reported)
``--small`` shrinks every case (hidden 64, 2 layers, S 64, fp32) for a CPU run with the reference executor, measured
against no target; on a CPU the compiled variants use ``backend="aot_eager"`` (Inductor's cold CPU compile takes
tens of seconds per model).

    python -m bench.hf_backend [--json PATH] [--device cuda|cpu] [--small]
"""

from __future__ import annotations

import collections
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import te_fx
from te_fx.executors import executor_env
from te_fx.hf_interface.attention import te_attention_forward

from . import models
from .eager_batches import DOCUMENTS, SMALL, _te_version, make_batch
from .models import compile_counts
from .report import finish, side_by_side_arguments, variant_lines, versions_line
from .timing import median_ms, training_step

VARIANTS = ("sdpa", "injection", "te", "sdpa_compiled", "te_compiled")  # the model cases', in the order run
TE_VARIANTS = ("injection", "te", "te_compiled", "te_sinks", "te_causal")  # with counters (eager) and op_calls
RATIOS = {  # name: (numerator variant, denominator variant, label); a ratio > 1 is te_fx faster except sinks_vs_causal
    "te_vs_sdpa": ("sdpa", "te", "'te' vs 'sdpa'"),
    "te_vs_injection": ("injection", "te", "'te' vs inject_te_attention"),
    "te_compiled_vs_sdpa_compiled": ("sdpa_compiled", "te_compiled", "'te' compiled vs 'sdpa' compiled"),
    "sinks_vs_causal": ("te_sinks", "te_causal", "te_fx sinks time / te_fx causal time"),
    "hf_eager_vs_sinks": ("hf_eager", "te_sinks", "te_fx sinks vs HF's eager"),
}
LLAMA = dict(models.LLAMA3_8B)
GEMMA3 = {**dict(models.GEMMA3), "layer_types": None}  # HF's 5:1 pattern: its first 2 layers are both sliding


@dataclass(frozen=True)
class Target:
    """``ratio`` (a key of RATIOS) at least ``goal``, or at most it (``at_most``)."""

    ratio: str
    goal: float
    at_most: bool = False


@dataclass(frozen=True)
class Case:
    """One side-by-side measurement. ``kind``: "model" (a training step of ``family``'s config from te_fx's tiny
    models with ``shape`` over it), "packed" or "sinks" (the attention alone); ``inputs`` and ``lengths`` as in
    bench.eager_batches (whose make_batch builds the batch)."""

    name: str
    kind: str
    family: str
    shape: dict
    layers: int
    batch: int
    seq: int
    inputs: str = "ones"
    lengths: tuple[int, ...] = ()
    targets: tuple[Target, ...] = ()


CASES = (
    Case("1 Llama-3-8B shape 2 layers B1 S8192, fwd+bwd", "model", "llama_gqa", LLAMA, 2, 1, 8192,
         targets=(Target("te_vs_injection", 1.0), Target("te_compiled_vs_sdpa_compiled", 1.3))),
    Case("2 Gemma3 shape 2 layers B1 S8192, fwd+bwd", "model", "gemma3", GEMMA3, 2, 1, 8192,
         targets=(Target("te_vs_sdpa", 1.3), Target("te_vs_injection", 1.0),
                  Target("te_compiled_vs_sdpa_compiled", 1.3))),
    Case("3 packed attention fwd+bwd, 8 docs S8192 H32 KV8 D128", "packed", "llama_gqa", LLAMA, 1, 1, 8192,
         "packed", DOCUMENTS, (Target("te_vs_sdpa", 5.0),)),
    Case("4 GPT-OSS sinks attention fwd+bwd, S8192 H32 KV8 D128", "sinks", "gpt_oss", LLAMA, 1, 1, 8192,
         targets=(Target("sinks_vs_causal", 1.1, at_most=True),)),
)  # fmt: skip


def shrink(case: Case, seq: int = 64) -> Case:
    """``case`` at eager_batches.SMALL's widths, at most 2 layers, S ``seq``: documents scaled (still summing to S),
    a sliding window scaled with S (at least 2), the case's layer types and Gemma3's query scale at the small head
    dim."""
    lengths = [max(1, n * seq // case.seq) for n in case.lengths]
    if lengths:
        lengths[0] += seq - sum(lengths)
    shape = {**SMALL, **{k: v for k, v in case.shape.items() if k == "layer_types"}}
    if "sliding_window" in case.shape:
        shape["sliding_window"] = max(2, case.shape["sliding_window"] * seq // case.seq)
    if "query_pre_attn_scalar" in case.shape:
        shape["query_pre_attn_scalar"] = SMALL["head_dim"]
    return Case(case.name, case.kind, case.family, shape, min(case.layers, 2), case.batch, seq, case.inputs,
                tuple(lengths), case.targets)  # fmt: skip


def _dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU (the issue's figures), fp32 on a CPU (where the run is a check, not a measurement)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _config(case: Case):  # noqa: ANN202
    """The model case's config: te_fx's tiny config of ``case.family`` at ``case.shape`` and ``case.layers``."""
    from te_fx.tools.tiny_models import tiny_config

    return tiny_config(case.family, **case.shape, num_hidden_layers=case.layers)


def _compile(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Plain ``torch.compile(model)`` on a GPU; ``aot_eager`` on a CPU (the same graphs, without Inductor's C++
    compilation)."""
    return torch.compile(model) if device.type == "cuda" else torch.compile(model, backend="aot_eager")


def _counters() -> dict[str, int]:
    return {k: n for k, n in te_fx.get_te_attention_stats().items() if n}


def _op_calls(fn: Callable[[], object]) -> dict[str, int]:
    """te_fx's custom ops (``te_fx::attention_fwd`` / ``_bwd``) that one call of ``fn`` ran, as the profiler saw
    them: what shows that TE ran in a compiled graph, which counts nothing of its own."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return dict(collections.Counter(e.name for e in prof.events() if e.name.startswith("te_fx::")))


def model_case(case: Case, device: torch.device, executor: str, warmup: int, steps: int) -> dict:
    """Step ms, the first step's loss and layer 0's q_proj gradient norm per variant (one model at a time, each from
    ``from_config`` with the first one's weights); for te_fx's variants the counters of that step (eager ones) and
    the te_fx ops of a later one; for the compiled ones the seconds of the first (compiling) step and the graphs
    compiled and graph breaks over all their steps."""
    from transformers import AutoModelForCausalLM

    config, batch, state, results = _config(case), make_batch(case, device), None, {}
    for name in VARIANTS:
        torch._dynamo.reset()
        compiled = name.endswith("_compiled")
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(
                copy.deepcopy(config), attn_implementation="te" if name.startswith("te") else "sdpa",
                dtype=_dtype(device),
            ).train()  # fmt: skip
        if state is None:
            state = {k: t.detach().clone() for k, t in model.state_dict().items()}
        else:
            model.load_state_dict(state)
        if name == "injection":
            te_fx.inject_te_attention(model, executor=executor)
        runner = _compile(model, device) if compiled else model

        step = training_step(model, runner, batch, lambda: executor_env(executor))
        te_fx.reset_te_attention_stats()
        graphs, breaks = compile_counts()
        start = time.perf_counter()
        loss = step().item()
        first_s = time.perf_counter() - start
        r = {"loss": loss, "q_grad_norm": model.model.layers[0].self_attn.q_proj.weight.grad.float().norm().item()}
        if name in TE_VARIANTS and not compiled:
            r["counters"] = _counters()
        if compiled:
            r["compile_s"] = first_s
            step()  # a second untimed step: any recompile (grads now allocated) stays out of the timing
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        r["ms"] = median_ms(step, device, warmup=warmup, reps=steps)
        if device.type == "cuda":
            r["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if name in TE_VARIANTS:
            r["op_calls"] = _op_calls(step)
        if compiled:  # over all of this model's steps: a recompile shows as a second graph
            now = compile_counts()
            r["graphs"], r["graph_breaks"] = now[0] - graphs, now[1] - breaks
        results[name] = r
        del model, runner, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    torch._dynamo.reset()
    results["max_abs_diff"] = max(abs(results[n]["loss"] - results["sdpa"]["loss"]) for n in VARIANTS[1:])
    return results


def _masks(config, implementations: tuple[str, ...], embeds: torch.Tensor, **inputs: torch.Tensor | None) -> list:  # noqa: ANN001
    """The mask transformers' ``create_causal_mask`` builds for each attention implementation, as a model's forward
    calls it (no cache; ``attention_mask`` and ``position_ids`` from ``inputs``)."""
    from transformers import masking_utils

    masks = []
    for implementation in implementations:
        config = copy.deepcopy(config)
        config._attn_implementation = implementation
        masks.append(masking_utils.create_causal_mask(config, embeds, inputs.get("attention_mask"), None,
                                                      inputs.get("position_ids")))  # fmt: skip
    return masks


def _qkv(case: Case, device: torch.device) -> tuple[torch.Tensor, ...]:
    """q (B, H, S, D) and K/V with their own heads (B, Hkv, S, D), as HF's attention functions receive them, and a
    gradient for the output (B, S, H, D)."""
    heads, kv_heads, dim = case.shape["num_attention_heads"], case.shape["num_key_value_heads"], case.shape["head_dim"]
    q = torch.randn(case.batch, heads, case.seq, dim, device=device, dtype=_dtype(device), requires_grad=True)
    k, v = (torch.randn(case.batch, kv_heads, case.seq, dim, device=device, dtype=_dtype(device), requires_grad=True)
            for _ in range(2))  # fmt: skip
    return q, k, v, torch.randn(case.batch, case.seq, heads, dim, device=device, dtype=_dtype(device))


def _time_ops(calls: dict, grad: torch.Tensor, device: torch.device, executor: str, warmup: int, steps: int) -> dict:
    """ms of forward + backward per call (each a function returning HF's (output, weights)), and for the te_fx ones
    the counters of one forward."""
    results = {}
    for name, call in calls.items():

        def fwd_bwd(call=call) -> None:  # noqa: ANN001
            with executor_env(executor):
                out = call()[0]
            out.backward(grad)

        te_fx.reset_te_attention_stats()
        with torch.no_grad(), executor_env(executor):
            call()
        results[name] = {"counters": _counters()} if name in TE_VARIANTS else {}
        results[name]["ms"] = median_ms(fwd_bwd, device, warmup=warmup, reps=steps)
        if name in TE_VARIANTS:
            results[name]["op_calls"] = _op_calls(fwd_bwd)
    return results


def _max_diff(a, b, executor: str) -> float:  # noqa: ANN001
    with torch.no_grad(), executor_env(executor):
        return (a()[0].float() - b()[0].float()).abs().max().item()


def collator_kwargs(case: Case, device: torch.device) -> dict:
    """What ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` adds to a batch of ``case.lengths``
    documents besides the ids and labels, built from the lengths: int64 ``position_ids`` (1, S) restarting at each
    document (eager_batches.make_batch's), int32 ``cu_seq_lens_q/k`` (N + 1,) and Python int ``max_length_q/k``."""
    cu = F.pad(torch.tensor(case.lengths).cumsum(0), (1, 0)).to(device=device, dtype=torch.int32)
    longest = max(case.lengths)
    return {"position_ids": make_batch(case, device)["position_ids"], "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
            "max_length_q": longest, "max_length_k": longest}  # fmt: skip


def packed_case(case: Case, device: torch.device, executor: str, warmup: int, steps: int) -> dict:
    """The attention of one layer over packed documents, fwd+bwd: te_fx's attention function with the collator's
    kwargs (:func:`collator_kwargs`) and te_mask's mask, against HF's SDPA with its packed 4D mask and the same
    kwargs (which it ignores)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import LlamaAttention

    config = _config(case)
    with torch.device("meta"):  # only its attributes are read (is_causal, num_key_value_groups)
        module = LlamaAttention(config, layer_idx=0).train()
    kwargs = collator_kwargs(case, device)
    positions = kwargs["position_ids"]
    embeds = torch.zeros(case.batch, case.seq, 1, device=device, dtype=_dtype(device))
    te_mask, hf_mask = _masks(config, ("te", "sdpa"), embeds, position_ids=positions)
    q, k, v, grad = _qkv(case, device)
    scaling = case.shape["head_dim"] ** -0.5
    calls = {
        "sdpa": lambda: sdpa_attention_forward(module, q, k, v, hf_mask, dropout=0.0, scaling=scaling, **kwargs),
        "te": lambda: te_attention_forward(module, q, k, v, te_mask, dropout=0.0, scaling=scaling, **kwargs),
    }
    results = _time_ops(calls, grad, device, executor, warmup, steps)
    results["max_abs_diff"] = _max_diff(calls["te"], calls["sdpa"], executor)
    results["te_mask"] = {"dtype": str(te_mask.dtype).removeprefix("torch."), "shape": list(te_mask.shape)}
    return results


def sinks_case(case: Case, device: torch.device, executor: str, warmup: int, steps: int) -> dict:
    """GPT-OSS's attention on one full (causal, no window) layer, fwd+bwd: te_fx's attention function with
    ``s_aux=module.sinks`` as GptOssAttention passes it, the same without, and GPT-OSS's eager attention on HF's
    eager mask. Also te_fx's causal output against HF's SDPA (a sanity figure) and whether the sinks' gradient
    (through te_fx's sinks path) is finite."""
    from transformers import GptOssConfig
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.gpt_oss import modeling_gpt_oss

    heads = case.shape["num_attention_heads"]
    config = GptOssConfig(
        hidden_size=case.shape["hidden_size"], num_attention_heads=heads, vocab_size=case.shape["vocab_size"],
        num_key_value_heads=case.shape["num_key_value_heads"], head_dim=case.shape["head_dim"],
        num_hidden_layers=1, layer_types=["full_attention"], num_local_experts=2, num_experts_per_tok=1,
    )  # fmt: skip
    with torch.device("meta"):  # projections unused: only is_causal, num_key_value_groups, scaling, training, sinks
        module = modeling_gpt_oss.GptOssAttention(config, layer_idx=0).train()
    module.sinks = torch.nn.Parameter(torch.randn(heads, device=device, dtype=_dtype(device)))
    embeds = torch.zeros(case.batch, case.seq, 1, device=device, dtype=_dtype(device))
    ones = torch.ones(case.batch, case.seq, dtype=torch.long, device=device)
    te_mask, eager_mask = _masks(config, ("te", "eager"), embeds, attention_mask=ones)
    q, k, v, grad = _qkv(case, device)
    common = {"dropout": 0.0, "scaling": module.scaling, "sliding_window": module.sliding_window}
    calls = {
        "te_sinks": lambda: te_attention_forward(module, q, k, v, te_mask, s_aux=module.sinks, **common),
        "te_causal": lambda: te_attention_forward(module, q, k, v, te_mask, **common),
        "hf_eager": lambda: modeling_gpt_oss.eager_attention_forward(module, q, k, v, eager_mask, s_aux=module.sinks,
                                                                     **common),
    }  # fmt: skip
    results = _time_ops(calls, grad, device, executor, warmup, steps)
    results["max_abs_diff"] = _max_diff(calls["te_sinks"], calls["hf_eager"], executor)
    sdpa = lambda: sdpa_attention_forward(module, q, k, v, None, is_causal=True, **common)  # noqa: E731
    results["max_abs_diff_causal_vs_sdpa"] = _max_diff(calls["te_causal"], sdpa, executor)
    module.sinks.grad = None
    with executor_env(executor):
        calls["te_sinks"]()[0].backward(grad)
    results["sinks_grad_finite"] = bool(module.sinks.grad is not None and module.sinks.grad.isfinite().all())
    return results


RUNS = {"model": model_case, "packed": packed_case, "sinks": sinks_case}


def measure(device: torch.device, small: bool = False, warmup: int = 3, steps: int = 10) -> dict:
    """Every case with its ratios, versions and the device's name."""
    import transformers

    executor = "te" if device.type == "cuda" else "reference"
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "executor": executor,
        "transformer_engine": _te_version(), "small": small, "warmup": warmup, "steps": steps,
        "dtype": str(_dtype(device)).removeprefix("torch."),
        "compile_backend": "inductor" if device.type == "cuda" else "aot_eager", "cases": {},
    }  # fmt: skip
    for case in CASES:
        case = shrink(case) if small else case
        torch.manual_seed(0)
        r = RUNS[case.kind](case, device, executor, warmup, steps)
        ratios = {key: r[a]["ms"] / r[b]["ms"] for key, (a, b, _) in RATIOS.items() if a in r and b in r}
        targets = {t.ratio: {"goal": t.goal, "at_most": t.at_most} for t in case.targets}
        results["cases"][case.name] = {"targets": targets, "ratios": ratios, **r}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def _passes(r: dict, ratio: str, small: bool) -> bool | None:
    """Whether the case's ``ratio`` meets its target (None: no target, or a ``--small`` run)."""
    target = None if small else r["targets"].get(ratio)
    if target is None:
        return None
    value = r["ratios"][ratio]
    return value <= target["goal"] if target["at_most"] else value >= target["goal"]


def verdicts(name: str, r: dict, small: bool = False) -> list[tuple[str, bool, str]]:
    """(label, PASS, detail) per target of one case; none for a ``--small`` run. The sinks target's detail says
    which path te_fx's sinks call took (its counters)."""
    rows = []
    for ratio, target in ({} if small else r["targets"]).items():
        detail = f"{r['ratios'][ratio]:.2f}x (goal {'<=' if target['at_most'] else '>='} {target['goal']}x)"
        if ratio == "sinks_vs_causal" and "te_sinks" in r:
            detail += f", te_fx's sinks call: {r['te_sinks']['counters']}"
        rows.append((f"{name}: {RATIOS[ratio][2]}", _passes(r, ratio, small), detail))
    return rows


def main(argv: list[str] | None = None) -> None:
    args = side_by_side_arguments(__doc__, argv)
    results = measure(torch.device(args.device), args.small, args.warmup, args.steps)
    print(versions_line(results, results["dtype"], f"compile {results['compile_backend']}"))
    rows = []
    for name, r in results["cases"].items():
        keys = ("loss", "counters", "op_calls", "compile_s", "graphs", "graph_breaks")
        print("\n".join([name, *variant_lines(r, 16, keys)]))
        for ratio, value in r["ratios"].items():
            goal = {True: "PASS", False: "FAIL", None: "----"}[_passes(r, ratio, results["small"])]
            print(f"    {RATIOS[ratio][2]:<40} {value:6.2f}x  {goal}")
        sanity = {k: r[k] for k in ("max_abs_diff", "max_abs_diff_causal_vs_sdpa", "sinks_grad_finite") if k in r}
        print(f"    {sanity}")
        rows += verdicts(name, r, results["small"])
    finish(results, rows, args.json)


if __name__ == "__main__":
    main()
