"""``attn_implementation="te"`` in bf16 on a real GPU with real TE, against ``"sdpa"`` with the same weights:
padded and packed training steps, generation, and a fullgraph compile with Inductor."""

import pytest
import torch
from transformers import DataCollatorWithFlattening

import te_fx
from te_fx.tools.tiny_models import supported_families, tiny_model

SEQ = 64
LOGITS_TOL, GRAD_TOL = 2e-2, 5e-2  # bf16 over a few layers: TE's and SDPA's kernels round differently


def _padded_batch(pad: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of two rows, the second padded by 13 tokens on the ``pad`` side ("none": not)."""
    ids = torch.randint(3, 128, (2, SEQ), device="cuda")
    mask = torch.ones_like(ids)
    if pad == "left":
        mask[1, :13] = 0
    elif pad == "right":
        mask[1, SEQ - 13 :] = 0
    return ids, mask


def _pair(family: str):
    torch._dynamo.reset()
    torch.manual_seed(0)
    plain = tiny_model(family, dtype=torch.bfloat16).cuda().train()
    te = tiny_model(family, dtype=torch.bfloat16).cuda().train()
    te.load_state_dict(plain.state_dict())
    plain.set_attn_implementation("sdpa")
    te.set_attn_implementation("te")
    return plain, te


def _step(model, **batch):
    """Logits and parameter gradients of a loss over the non-padding positions."""
    model.zero_grad(set_to_none=True)
    logits = model(**batch, use_cache=False).logits
    valid = batch["attention_mask"].bool() if "attention_mask" in batch else torch.ones_like(logits[..., 0]).bool()
    logits[valid].float().square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach()[valid], grads


def _assert_close(plain, te, rel_error, **batch):
    ref, ref_grads = _step(plain, **batch)
    te_fx.reset_te_attention_stats()
    out, grads = _step(te, **batch)
    stats = te_fx.get_te_attention_stats()
    errors = {"logits": rel_error(out, ref)}
    errors["grads"] = max(rel_error(grads[n], ref_grads[n]) for n in ref_grads if ref_grads[n].abs().sum() > 0)
    print(f"{type(te).__name__}: {stats['te_hits']} TE calls, rel err {errors}")
    assert errors["logits"] < LOGITS_TOL and errors["grads"] < GRAD_TOL
    return stats


@pytest.mark.parametrize("pad", ["none", "left", "right"])
@pytest.mark.parametrize("family", supported_families())
def test_training_step_runs_te(family, pad, rel_error):
    plain, te = _pair(family)
    ids, mask = _padded_batch(pad)
    stats = _assert_close(plain, te, rel_error, input_ids=ids, attention_mask=mask)
    assert stats["te_hits"] == te.config.num_hidden_layers


@pytest.mark.parametrize("family", ["llama_gqa", "gemma3"])
@pytest.mark.parametrize("packing", ["position_ids", "collator"])
def test_packed_documents_run_te(family, packing, rel_error):
    lengths = (5, 23, 1, 35)
    generator = torch.Generator().manual_seed(3)
    examples = [{"input_ids": torch.randint(3, 128, (n,), generator=generator).tolist()} for n in lengths]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=packing == "collator")(examples)
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k != "labels"}
    plain, te = _pair(family)
    stats = _assert_close(plain, te, rel_error, **batch)
    assert stats["te_hits"] == te.config.num_hidden_layers


@pytest.mark.parametrize("family", ["llama_gqa", "gemma3"])
def test_generate_matches_sdpa(family):
    plain, te = _pair(family)
    plain.eval(), te.eval()
    ids = torch.randint(3, 128, (1, 20), device="cuda")
    kwargs = {"max_new_tokens": 8, "do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    te_fx.reset_te_attention_stats()
    out = te.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    assert te_fx.get_te_attention_stats()["te_hits"] == 8 * te.config.num_hidden_layers
    ref = plain.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    # bf16 logits of two kernels may swap a near tie: the first tokens agree
    assert torch.equal(out[:, : ids.shape[1] + 4], ref[:, : ids.shape[1] + 4])


def test_generate_of_a_left_padded_batch_decodes_on_te():
    """A left-padded batch: every prefill and decode step on TE (decode with the KV cache's key padding)."""
    plain, te = _pair("llama_gqa")
    plain.eval(), te.eval()
    ids = torch.randint(3, 128, (3, 20), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    mask[1, :1] = 0
    kwargs = {"max_new_tokens": 8, "do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    te_fx.reset_te_attention_stats()
    out = te.generate(ids, attention_mask=mask, **kwargs)
    stats = {name: count for name, count in te_fx.get_te_attention_stats().items() if count}
    assert stats == {"te_hits": 8 * te.config.num_hidden_layers}
    ref = plain.generate(ids, attention_mask=mask, **kwargs)
    # bf16 logits of two kernels may swap a near tie: the first tokens agree
    assert torch.equal(out[:, : ids.shape[1] + 4], ref[:, : ids.shape[1] + 4])


def test_compiled_with_inductor_matches_compiled_sdpa(rel_error):
    plain, te = _pair("llama_gqa")
    ids = torch.randint(3, 128, (2, SEQ), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, SEQ - 13 :] = 0
    stock = torch.compile(plain, fullgraph=True)
    compiled = torch.compile(te, fullgraph=True)
    _assert_close(stock, compiled, rel_error, input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("pad", ["none", "left", "right"])
def test_gpt_oss_sinks_run_te(pad, rel_error):
    """GPT-OSS's attention sinks on TE's learnable softmax, sliding and full layers, in bf16: logits and gradients
    (the sinks' included) against HF's eager attention, the only implementation of sinks in transformers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "gpt_oss", vocab_size=128, hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, num_local_experts=2, num_experts_per_tok=1, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.bfloat16).cuda().train()
    te = AutoModelForCausalLM.from_config(config, attn_implementation="te", dtype=torch.bfloat16).cuda().train()
    te.load_state_dict(plain.state_dict())
    ids, mask = _padded_batch(pad)
    stats = _assert_close(plain, te, rel_error, input_ids=ids, attention_mask=mask)
    assert stats["te_hits"] == 2
    sink_grads = [layer.self_attn.sinks.grad for layer in te.model.layers]
    assert all(g is not None and torch.isfinite(g).all() for g in sink_grads)
