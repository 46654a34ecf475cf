"""The demo: tiny HF models built from configs, run through te_fx's attention backend (``attn_implementation="te"``)
and its eager injection, compared with the plain SDPA model.

It prints, per attention layer, whether te_fx runs it on TE or leaves it to SDPA and why, for a batch without
padding and a right-padded one. With no CUDA GPU or no TransformerEngine it uses the reference executor (the same
call contract in plain PyTorch) and says so.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .. import te_attention
from ..executors import TEUnavailableError, executor_env, load_te_executor
from ..hf_interface import NAME
from .tiny_models import FAMILIES, tiny_model

__all__ = ["run_demo", "DEMO_FAMILIES"]

logger = logging.getLogger(__name__)

DEMO_FAMILIES = ("llama_gqa", "mistral", "qwen2", "gemma3", "deepseek_v3", "phi3")


def pick_executor() -> tuple[str, str, torch.device, torch.dtype]:
    """(executor, why, device, dtype): TE on a CUDA GPU in bf16 when both are there, else the reference on CPU."""
    if not torch.cuda.is_available():
        return "reference", "no CUDA GPU", torch.device("cpu"), torch.float32
    try:
        load_te_executor()
    except TEUnavailableError as error:
        return "reference", f"TransformerEngine unavailable ({error.__cause__})", torch.device("cuda"), torch.float32
    return "te", "CUDA GPU and TransformerEngine found", torch.device("cuda"), torch.bfloat16


@contextmanager
def _per_layer_dispatch(model: nn.Module) -> Iterator[dict[str, dict[str, int]]]:
    """Record, per self_attn module, the te_fx counters its forward calls added."""
    per_layer: dict[str, dict[str, int]] = {}
    handles = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] != "self_attn":
            continue

        def before(_module: nn.Module, _args: tuple, name: str = name) -> None:
            per_layer[name] = te_attention.get_te_attention_stats()

        def after(_module: nn.Module, _args: tuple, _out: object, name: str = name) -> None:
            now = te_attention.get_te_attention_stats()
            per_layer[name] = {k: now[k] - per_layer[name][k] for k in now if now[k] != per_layer[name][k]}

        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield per_layer
    finally:
        for handle in handles:
            handle.remove()


def _describe(calls: dict[str, int], executor: str) -> str:
    """One layer's calls: ``te_hits`` are the calls te_fx's op ran, on TE only with the "te" executor."""
    if not calls:
        return "no SDPA call"
    ran = "TE" if executor == "te" else f"{executor} executor"
    return ", ".join((ran if key == "te_hits" else f"SDPA ({key.removeprefix('fallback_')})") + f" x{n}"
                     for key, n in sorted(calls.items()))  # fmt: skip


def run_demo(families: tuple[str, ...] = DEMO_FAMILIES, seq_len: int = 24) -> bool:
    """Run the demo and print its report; returns True when every te_fx model matched the plain one."""
    executor, why, device, dtype = pick_executor()
    print(f"te_fx demo: executor {executor!r} ({why}), {device}, {dtype}")
    if executor != "te":
        print("TransformerEngine does not run here: the calls te_fx takes (counted te_hits) run on the reference "
              "executor, plain PyTorch on any device and dtype, marked 'reference executor' below; with TE they would "
              "run on TE")  # fmt: skip
    all_match = True
    for family in families:
        torch.manual_seed(0)
        plain = tiny_model(family, dtype=dtype).to(device).eval()
        backend = copy.deepcopy(plain)
        backend.set_attn_implementation(NAME)
        injected = copy.deepcopy(plain)
        te_attention.inject_te_attention(injected, executor=executor)
        ids = torch.randint(3, plain.config.vocab_size, (2, seq_len), device=device)
        padded = torch.ones_like(ids)
        padded[1, seq_len // 2 :] = 0
        print(f"\n{family}: {FAMILIES[family].skip_reason or 'separate q/k/v projections'}")
        for way, model in ((f'attn_implementation="{NAME}"', backend), ("inject_te_attention", injected)):
            print(f"  {way}")
            for label, mask in (("no padding", None), ("right padding", padded)):
                with torch.no_grad(), executor_env(executor), _per_layer_dispatch(model) as per_layer:
                    out = model(ids, attention_mask=mask).logits
                    ref = plain(ids, attention_mask=mask).logits
                valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
                error = (out - ref)[valid].abs().max().item()
                tolerance = 1e-4 if dtype == torch.float32 else 5e-2
                all_match &= error <= tolerance
                verdict = "ok" if error <= tolerance else "MISMATCH"
                print(f"    {label}: max |logits - plain SDPA| = {error:.2e} ({verdict})")
                for name, module in model.named_modules():
                    if name.rsplit(".", 1)[-1] == "self_attn":
                        runs_te_fx = model is backend or hasattr(module, "attn_module")
                        calls = per_layer.get(name, {})
                        status = _describe(calls, executor) if runs_te_fx else "not injected: SDPA unchanged"
                        print(f"      {name}: {status}")
    return all_match
