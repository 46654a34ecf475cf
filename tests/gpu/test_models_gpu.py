"""The model families in bf16 on a real GPU with real TE: eager injection and the te_attn backend against SDPA."""

import copy

import pytest
import torch

import te_fx
from te_fx.tools.tiny_models import supported_families, tiny_model

SEQ = 64
# bf16 over a few layers: TE's cuDNN kernels and SDPA's kernels round differently
LOGITS_TOL, GRAD_TOL = 2e-2, 5e-2


def _pair(family: str):
    torch._dynamo.reset()  # a model of the same structure would otherwise reuse the last test's graph
    torch.manual_seed(0)
    plain = tiny_model(family, dtype=torch.bfloat16).cuda().train()
    return plain, copy.deepcopy(plain)


def _inputs(batch: int = 2, pad: str | None = None):
    ids = torch.randint(3, 128, (batch, SEQ), device="cuda")
    mask = torch.ones_like(ids)
    if pad == "right":
        mask[1, SEQ - 13 :] = 0
    elif pad == "left":
        mask[1, :13] = 0
    return ids, mask


def _loss_and_grads(model, ids, mask):
    model.zero_grad(set_to_none=True)
    logits = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    logits[valid].float().square().mean().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _compare(out, ref, grads, ref_grads, mask, rel_error):
    errors = {"logits": rel_error(out[mask.bool()], ref[mask.bool()])}
    errors["grads"] = max(rel_error(grads[n], ref_grads[n]) for n in ref_grads if ref_grads[n].abs().sum() > 0)
    return errors


@pytest.mark.parametrize("family", supported_families())
def test_eager_injection_matches_sdpa(family, rel_error):
    plain, injected = _pair(family)
    te_fx.inject_te_attention(injected)
    ids, mask = _inputs()
    ref, ref_grads = _loss_and_grads(plain, ids, mask)
    te_fx.reset_te_attention_stats()
    out, grads = _loss_and_grads(injected, ids, mask)
    stats = te_fx.get_te_attention_stats()
    errors = _compare(out, ref, grads, ref_grads, mask, rel_error)
    print(f"eager {family}: {stats['te_hits']} TE calls, rel err {errors}, "
          f"fallbacks {({k: v for k, v in stats.items() if v and k != 'te_hits'})}")  # fmt: skip
    assert stats["te_hits"] == injected.config.num_hidden_layers
    assert errors["logits"] < LOGITS_TOL and errors["grads"] < GRAD_TOL


@pytest.mark.parametrize("family", ["llama_gqa", "mistral", "qwen2", "gemma3", "deepseek_v3", "phi3", "falcon"])
@pytest.mark.parametrize("pad", [None, "left"])
def test_te_attn_backend_matches_eager_sdpa(family, pad, rel_error):
    plain, compiled_model = _pair(family)
    compiled = torch.compile(compiled_model, backend="te_attn", options={"inner": "aot_eager"}, fullgraph=True)
    ids, mask = _inputs(pad=pad)
    ref, ref_grads = _loss_and_grads(plain, ids, mask)
    te_fx.reset_compile_report()
    out, grads = _loss_and_grads(compiled, ids, mask)
    report = te_fx.compile_report()
    errors = _compare(out, ref, {n.removeprefix("_orig_mod."): g for n, g in grads.items()}, ref_grads, mask, rel_error)
    decisions = [(e["decision"], e["mask_kind"] or e["reason"]) for e in report]
    print(f"te_attn {family} pad={pad}: rel err {errors}, report {decisions}")
    assert errors["logits"] < LOGITS_TOL and errors["grads"] < GRAD_TOL
    if family not in ("falcon", "mistral"):  # ALiBi float masks; sliding window with an attention_mask
        assert any(e["decision"] == "te" for e in report)


def test_te_attn_with_inductor_matches_compiled_sdpa(rel_error):
    plain, compiled_model = _pair("llama_gqa")
    ids, mask = _inputs(pad="right")
    stock = torch.compile(plain, fullgraph=True)
    ref, ref_grads = _loss_and_grads(stock, ids, mask)
    compiled = torch.compile(compiled_model, backend="te_attn", fullgraph=True)
    te_fx.reset_compile_report()
    out, grads = _loss_and_grads(compiled, ids, mask)
    errors = _compare(out, ref, grads, ref_grads, mask, rel_error)
    print(f"te_attn+inductor vs inductor: rel err {errors}, report {[e['decision'] for e in te_fx.compile_report()]}")
    assert all(e["decision"] == "te" for e in te_fx.compile_report())
    assert errors["logits"] < LOGITS_TOL and errors["grads"] < GRAD_TOL


def _packed_inputs(batch: int = 2):
    """Rows of several documents each: position_ids restart at 0 where a document starts (HF's packed mask)."""
    ids = torch.randint(3, 128, (batch, SEQ), device="cuda")
    lengths = [[20, 30, 14], [7, 57]][:batch]
    position_ids = torch.cat([torch.cat([torch.arange(n) for n in row]) for row in lengths]).view(batch, SEQ)
    return ids, position_ids.cuda()


@pytest.mark.parametrize("family", ["llama_gqa", "mistral", "qwen2", "gemma3"])
@pytest.mark.parametrize("pad", ["right", "left"])
def test_eager_padded_batch_runs_te(family, pad, rel_error):
    """Key padding at the ends of rows, with and without sliding windows: TE's padding_causal on every call."""
    plain, injected = _pair(family)
    te_fx.inject_te_attention(injected)
    ids, mask = _inputs(pad=pad)
    ref, ref_grads = _loss_and_grads(plain, ids, mask)
    te_fx.reset_te_attention_stats()
    out, grads = _loss_and_grads(injected, ids, mask)
    stats = te_fx.get_te_attention_stats()
    errors = _compare(out, ref, grads, ref_grads, mask, rel_error)
    print(f"eager padded {family} {pad}: {stats['te_hits']} TE calls, rel err {errors}")
    assert stats["te_hits"] == injected.config.num_hidden_layers
    assert errors["logits"] < LOGITS_TOL and errors["grads"] < GRAD_TOL


@pytest.mark.parametrize("family", ["llama_gqa", "gemma3"])
def test_eager_packed_rows_run_te(family, rel_error):
    """Packed documents (block-diagonal causal mask from position_ids): TE's thd format on every call."""
    plain, injected = _pair(family)
    te_fx.inject_te_attention(injected)
    ids, position_ids = _packed_inputs()
    results = []
    for model in (plain, injected):
        te_fx.reset_te_attention_stats()
        model.zero_grad(set_to_none=True)
        logits = model(ids, position_ids=position_ids, use_cache=False).logits
        logits.float().square().mean().backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    stats = te_fx.get_te_attention_stats()
    (ref, ref_grads), (out, grads) = results
    errors = _compare(out, ref, grads, ref_grads, torch.ones_like(ids), rel_error)
    print(f"eager packed {family}: {stats['te_hits']} TE calls, rel err {errors}")
    assert stats["te_hits"] == injected.config.num_hidden_layers
    assert errors["logits"] < LOGITS_TOL and errors["grads"] < GRAD_TOL


def test_eager_autocast_runs_te(rel_error):
    """fp32 weights under bf16 autocast (HF Trainer's bf16=True): every call on TE, as SDPA under autocast."""
    torch.manual_seed(0)
    plain = tiny_model("llama_gqa").cuda().train()
    injected = copy.deepcopy(plain)
    te_fx.inject_te_attention(injected)
    ids, mask = _inputs(pad="right")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref, ref_grads = _loss_and_grads(plain, ids, mask)
        te_fx.reset_te_attention_stats()
        out, grads = _loss_and_grads(injected, ids, mask)
    stats = te_fx.get_te_attention_stats()
    errors = _compare(out, ref, grads, ref_grads, mask, rel_error)
    print(f"eager autocast: {stats}, rel err {errors}")
    assert stats["te_hits"] == injected.config.num_hidden_layers
    assert errors["logits"] < LOGITS_TOL and errors["grads"] < GRAD_TOL


def test_eager_opt_runs_te_with_the_calls_scale(rel_error):
    """OPT scales q by head_dim ** -0.5 and calls SDPA with scale=1: TE runs with the call's scale."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=128, hidden_size=256, num_hidden_layers=2, ffn_dim=512, num_attention_heads=4,
                       max_position_embeddings=128, dropout=0.0, attn_implementation="sdpa")  # fmt: skip
    torch.manual_seed(0)
    plain = OPTForCausalLM(config).to("cuda", torch.bfloat16).train()
    injected = copy.deepcopy(plain)
    te_fx.inject_te_attention(injected)
    ids, mask = _inputs(pad="left")
    ref, ref_grads = _loss_and_grads(plain, ids, mask)
    te_fx.reset_te_attention_stats()
    out, grads = _loss_and_grads(injected, ids, mask)
    assert te_fx.get_te_attention_stats()["te_hits"] == config.num_hidden_layers
    errors = _compare(out, ref, grads, ref_grads, mask, rel_error)
    assert errors["logits"] < LOGITS_TOL and errors["grads"] < GRAD_TOL, errors


@pytest.mark.parametrize("checkpointing", [False, True])
def test_te_attn_under_autocast_and_checkpointing_runs_te(checkpointing, rel_error):
    """te_attn with fp32 weights under bf16 autocast (HF Trainer's bf16=True), with and without gradient
    checkpointing: every node on TE, as close to the same uncompiled step as bf16 allows."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    plain = tiny_model("llama_gqa").cuda().train()
    if checkpointing:
        plain.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    compiled_model = copy.deepcopy(plain)
    compiled = torch.compile(compiled_model, backend="te_attn", options={"inner": "aot_eager"})
    ids, mask = _inputs(pad="left")
    te_fx.reset_compile_report()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref, ref_grads = _loss_and_grads(plain, ids, mask)
        out, grads = _loss_and_grads(compiled, ids, mask)
    report = te_fx.compile_report()
    errors = _compare(out, ref, {n.removeprefix("_orig_mod."): g for n, g in grads.items()}, ref_grads, mask, rel_error)
    print(f"te_attn autocast checkpointing={checkpointing}: rel err {errors}, report {[e['decision'] for e in report]}")
    assert [e["decision"] for e in report] == ["te"] * plain.config.num_hidden_layers
    assert errors["logits"] < LOGITS_TOL and errors["grads"] < GRAD_TOL
