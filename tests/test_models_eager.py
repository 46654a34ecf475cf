"""Eager injection on tiny models of every family in ``te_fx.tools.tiny_models`` (CPU, fp32, reference executor).

Each test compares an injected model with an unpatched copy holding the same weights: logits, gradients, greedy
generation, checkpoints, module state and dropout. Counters are checked too, but never instead of outputs.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import io

import pytest
import torch
from steps import padded_cache_training_step
from transformers import AutoModelForCausalLM, DynamicCache

import te_fx
from te_fx.eager import params
from te_fx.tools.tiny_models import (
    FAMILIES,
    SLIDING_WINDOW,
    supported_families,
    tiny_config,
    tiny_model,
    unsupported_families,
)

SUPPORTED = supported_families()
UNSUPPORTED = unsupported_families()
SLIDING = ["mistral", "qwen2", "gemma3"]  # families whose tiny config has sliding-window layers
MIXED = ["qwen2", "gemma3"]  # sliding and full attention layers in one model
ALL_FAMILIES = [
    pytest.param(name, marks=[] if family.supported else [pytest.mark.skip(reason=f"{name}: {family.skip_reason}")])
    for name, family in FAMILIES.items()
]

ATOL = RTOL = 1e-5
SEQ_LEN = 16  # > SLIDING_WINDOW: sliding layers really cut keys off
NEW_TOKENS = 8
ZERO_STATS = dict.fromkeys(te_fx.get_te_attention_stats(), 0)


def _pair(family: str, **overrides) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(plain, injected): the same randomly initialised tiny model, the second with reference TE attention."""
    torch.manual_seed(0)
    plain = tiny_model(family, **overrides)
    injected = copy.deepcopy(plain)
    te_fx.inject_te_attention(injected, executor="reference")
    return plain, injected


def _num_layers(model: torch.nn.Module) -> int:
    return model.config.num_hidden_layers


def _attn_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [module for name, module in model.named_modules() if name.endswith("self_attn")]


def _input_ids(batch: int = 2, seq_len: int = SEQ_LEN, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, seq_len), generator=generator)  # no pad / bos / eos ids


def _expect_stats(**counts: int) -> None:
    assert te_fx.get_te_attention_stats() == {**ZERO_STATS, **counts}


def _assert_grads_close(plain: torch.nn.Module, injected: torch.nn.Module) -> None:
    plain_grads = {name: p.grad for name, p in plain.named_parameters()}
    injected_grads = {name: p.grad for name, p in injected.named_parameters()}
    assert plain_grads.keys() == injected_grads.keys()
    with_grad = [name for name, grad in plain_grads.items() if grad is not None]
    assert with_grad, "the loss reached no parameter"
    for name, grad in plain_grads.items():
        other = injected_grads[name]
        assert (grad is None) == (other is None), name
        if grad is not None:
            torch.testing.assert_close(other, grad, atol=ATOL, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def _padded_batch(side: str, seq_len: int = 12, pad: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows, the second padded by ``pad`` tokens on ``side`` (pad id 0 under attention_mask 0)."""
    ids = _input_ids(2, seq_len)
    mask = torch.ones_like(ids)
    cols = slice(0, pad) if side == "left" else slice(seq_len - pad, seq_len)
    mask[1, cols] = 0
    ids[1, cols] = 0
    return ids, mask


# --------------------------------------------------------------------------------------------- the family table


def test_family_table_has_the_variants_the_tests_rely_on():
    assert set(SUPPORTED) == {
        "llama", "llama_gqa", "mistral", "qwen2", "qwen3", "gemma", "gemma3", "granite", "deepseek_v3",
    }  # fmt: skip
    assert set(UNSUPPORTED) == {"phi3", "gpt_neox", "falcon"}
    for name, family in FAMILIES.items():
        assert family.name == name
        assert (family.skip_reason is None) == family.supported, name
        config = tiny_config(name)
        assert (config.vocab_size, config.hidden_size, config.num_attention_heads) == (128, 64, 4), name
        assert 2 <= config.num_hidden_layers <= 4, name

    def attn(name: str) -> torch.nn.Module:
        return _attn_modules(tiny_model(name))[0]

    assert tiny_config("llama").num_key_value_heads == 4 and tiny_config("llama_gqa").num_key_value_heads == 2
    for name in ("gemma3", "granite"):  # the point of these two: a scale that is not head_dim ** -0.5
        module = attn(name)
        assert abs(module.scaling - module.head_dim**-0.5) > 1e-3, name
    mla = attn("deepseek_v3")
    assert mla.qk_head_dim != mla.v_head_dim
    assert tiny_config("deepseek_v3").num_key_value_heads == 4
    assert all(type(layer.mlp).__name__ == "DeepseekV3MLP" for layer in tiny_model("deepseek_v3").model.layers)
    for name in SLIDING:
        assert tiny_config(name).sliding_window == SLIDING_WINDOW < SEQ_LEN, name
    for name in MIXED:
        assert {"sliding_attention", "full_attention"} <= set(tiny_config(name).layer_types), name


def test_tiny_config_overrides():
    config = tiny_config("qwen2", num_hidden_layers=3, attention_dropout=0.25)
    assert config.num_hidden_layers == 3 and len(config.layer_types) == 3 and config.attention_dropout == 0.25
    assert tiny_config("deepseek_v3", num_hidden_layers=3).first_k_dense_replace == 3
    torch.manual_seed(0)
    first = tiny_model("llama", dtype=torch.float64)
    torch.manual_seed(0)
    second = tiny_model("llama", dtype=torch.float64)
    assert first.dtype == torch.float64 and not first.training
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    with pytest.raises(ValueError, match="unknown tiny model family"):
        tiny_config("gpt2")


# --------------------------------------------------------------------------------------------- forward / backward


@pytest.mark.parametrize("family", SUPPORTED)
def test_every_attention_layer_is_injected(family):
    _, injected = _pair(family)
    modules = _attn_modules(injected)
    assert len(modules) == _num_layers(injected)
    assert all(hasattr(module, "attn_module") for module in modules)
    assert getattr(injected, "_te_attention_injected", False)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_logits_and_gradients_match(family):
    plain, injected = _pair(family)
    ids = _input_ids()
    ref = plain(ids, labels=ids)
    te_fx.reset_te_attention_stats()
    out = injected(ids, labels=ids)
    _expect_stats(te_hits=_num_layers(injected))  # one TE call per layer, nothing fell back
    torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=RTOL)
    ref.loss.backward()
    out.loss.backward()
    _assert_grads_close(plain, injected)


@pytest.mark.parametrize("seq_len", [5, SLIDING_WINDOW, SLIDING_WINDOW + 1, 20])
@pytest.mark.parametrize("family", SLIDING)
def test_sliding_window_inside_and_beyond_the_window(family, seq_len):
    plain, injected = _pair(family)
    ids = _input_ids(seq_len=seq_len)
    te_fx.reset_te_attention_stats()
    out = injected(ids).logits
    _expect_stats(te_hits=_num_layers(injected))  # sliding and full layers alike
    ref = plain(ids).logits
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    torch.manual_seed(0)
    unwindowed = tiny_model(family, sliding_window=64)(ids).logits
    if seq_len > SLIDING_WINDOW:  # guard: the window really changes this model's output, so the check above bites
        assert (unwindowed - ref).abs().max() > 1e-2
    else:
        torch.testing.assert_close(unwindowed, ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("family", SUPPORTED)
def test_all_ones_attention_mask_runs_te(family):
    plain, injected = _pair(family)
    ids = _input_ids()
    mask = torch.ones_like(ids)
    te_fx.reset_te_attention_stats()
    out = injected(ids, attention_mask=mask).logits
    _expect_stats(te_hits=_num_layers(injected))
    torch.testing.assert_close(out, plain(ids, attention_mask=mask).logits, atol=ATOL, rtol=RTOL)


def _forward_backward(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Logits of a training-style forward (labels: the ids, -100 where the attention mask is 0), after backward."""
    mask = kwargs.get("attention_mask")
    labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    out = model(ids, labels=labels, use_cache=False, **kwargs)
    out.loss.backward()
    return out.logits.detach()


@pytest.mark.parametrize("side", ["left", "right", "both", "inner"])
@pytest.mark.parametrize("family", SUPPORTED)
def test_padded_batch_logits_and_gradients_match(family, side):
    """Padding at the ends of rows runs TE (key padding, with the sliding layers' windows too); padding inside a
    row runs SDPA (fallback_mask). Either way logits (every position: a padded query sees what SDPA gives it) and
    gradients equal the plain model's."""
    plain, injected = _pair(family)
    ids = _input_ids(3, 12)
    mask = torch.ones_like(ids)
    if side in ("left", "both"):
        mask[1, :4] = 0
    if side in ("right", "both"):
        mask[2, 9:] = 0
    if side == "inner":
        mask[1, 3:5] = 0
        mask[2, 6] = 0
    ids = ids.masked_fill(mask == 0, 0)
    ref = _forward_backward(plain, ids, attention_mask=mask)
    te_fx.reset_te_attention_stats()
    out = _forward_backward(injected, ids, attention_mask=mask)
    layers = _num_layers(injected)
    _expect_stats(fallback_mask=layers) if side == "inner" else _expect_stats(te_hits=layers)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    _assert_grads_close(plain, injected)


PACKED_POSITIONS = torch.tensor([
    [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1],  # documents of 5, 9 (> SLIDING_WINDOW) and 2 tokens
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 1, 2, 3, 4],
])  # fmt: skip


@pytest.mark.parametrize("family", SUPPORTED)
def test_packed_rows_run_te_per_document(family):
    """Rows of packed documents (position_ids restarting at 0, no attention_mask, no cache): HF builds a
    block-diagonal causal mask; te_fx runs it as documents (thd plans), sliding layers' windows included. Logits and
    gradients equal the plain model's, which differ from the unpacked rows' (the documents really are separate)."""
    plain, injected = _pair(family)
    ids = _input_ids(2, 16)
    ref = _forward_backward(plain, ids, position_ids=PACKED_POSITIONS)
    te_fx.reset_te_attention_stats()
    out = _forward_backward(injected, ids, position_ids=PACKED_POSITIONS)
    _expect_stats(te_hits=_num_layers(injected))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    _assert_grads_close(plain, injected)
    with torch.no_grad():
        assert (plain(ids, use_cache=False).logits - ref).abs().max() > 1e-1  # guard: packing changes the output


@pytest.mark.parametrize("family", ["llama_gqa", "mistral", "gemma3"])
def test_data_collator_with_flattening_batches(family):
    """DataCollatorWithFlattening's batches: one row of concatenated examples, position_ids restarting, labels
    -100 at each example's first token."""
    from transformers import DataCollatorWithFlattening

    generator = torch.Generator().manual_seed(3)
    lengths = [3, 11, 1, 6]  # one longer than the sliding window, one of a single token
    examples = [{"input_ids": torch.randint(3, 128, (n,), generator=generator).tolist()} for n in lengths]
    batch = DataCollatorWithFlattening()(examples)
    assert batch["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in batch
    plain, injected = _pair(family)
    outputs = []
    for model in (plain, injected):
        te_fx.reset_te_attention_stats()
        out = model(**batch, use_cache=False)
        out.loss.backward()
        outputs.append(out.logits.detach())
    _expect_stats(te_hits=_num_layers(injected))
    torch.testing.assert_close(outputs[1], outputs[0], atol=ATOL, rtol=RTOL)
    _assert_grads_close(plain, injected)
    # guard: each example alone gives the same logits (the documents are really separate)
    start = lengths[0]
    with torch.no_grad():
        alone = plain(batch["input_ids"][:, start : start + lengths[1]], use_cache=False).logits
    torch.testing.assert_close(outputs[0][:, start : start + lengths[1]], alone, atol=ATOL, rtol=RTOL)


def _grad_vector(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("family", SUPPORTED)
def test_autocast_bf16_runs_te_within_bf16_noise(family):
    """fp32 weights under ``torch.autocast("cpu", torch.bfloat16)`` (HF Trainer's bf16=True): every attention call
    runs TE (te_fx casts as SDPA does). The injected model is compared with the plain model under the same
    autocast; the tolerance is measured, not guessed: twice the plain model's own bf16 noise (its distance from
    itself in fp32), for logits (max and mean) and the gradient's norm. A wrong mask moves logits by far more."""
    plain, injected = _pair(family)
    ids = _input_ids()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: key padding under autocast too
    fp32 = _forward_backward(plain, ids, attention_mask=mask)
    fp32_grad = _grad_vector(plain)
    plain.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = _forward_backward(plain, ids, attention_mask=mask).float()
        te_fx.reset_te_attention_stats()
        out = _forward_backward(injected, ids, attention_mask=mask).float()
    _expect_stats(te_hits=_num_layers(injected))
    bf16_grad, te_grad = _grad_vector(plain), _grad_vector(injected)
    noise = (bf16 - fp32).abs()
    error = (out - bf16).abs()
    assert 0 < noise.max() < 1.0  # autocast really ran in bf16, and bf16 is not hopeless here
    assert error.max() <= 2 * noise.max(), (error.max(), noise.max())
    assert error.mean() <= 2 * noise.mean(), (error.mean(), noise.mean())
    grad_noise = (bf16_grad - fp32_grad).norm()
    assert (te_grad - bf16_grad).norm() <= 2 * grad_noise, ((te_grad - bf16_grad).norm(), grad_noise)


# --------------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", SUPPORTED)
def test_greedy_generate_matches(family, cache, padded):
    plain, injected = _pair(family)
    ids, mask = _padded_batch("left") if padded else (_input_ids(seq_len=12), None)
    kwargs = {
        "attention_mask": torch.ones_like(ids) if mask is None else mask,
        "max_new_tokens": NEW_TOKENS,
        "do_sample": False,
        "eos_token_id": None,  # always NEW_TOKENS steps, so the counts below are exact
        "pad_token_id": 0,
        "output_scores": True,
        "return_dict_in_generate": True,
    }
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    ref = plain.generate(ids, **kwargs)
    te_fx.reset_te_attention_stats()
    out = injected.generate(ids, **kwargs)
    assert out.sequences.shape == (2, ids.shape[1] + NEW_TOKENS)
    assert torch.equal(out.sequences, ref.sequences)
    for step_out, step_ref in zip(out.scores, ref.scores, strict=True):
        torch.testing.assert_close(step_out, step_ref, atol=ATOL, rtol=RTOL)
    stats = te_fx.get_te_attention_stats()
    assert sum(stats.values()) == _num_layers(injected) * NEW_TOKENS  # every attention call went through te_fx
    assert stats["te_hits"] >= _num_layers(injected)  # at least the prefill ran TE
    if cache == "dynamic":  # every DynamicCache mask is (sliding) causal, all visible, or that with key padding
        assert stats["fallback_mask"] == 0


def test_key_padding_with_a_kv_cache_in_training_falls_back_counted():
    """A forward with autograd on against a padded KV cache: te_fx's op has no exact training route for a KV cache's
    queries, so SDPA runs it, counted, with the plain model's logits and gradients."""
    plain, injected = _pair("llama")
    ids, mask = _padded_batch("left", seq_len=11)
    results = [padded_cache_training_step(model, ids, mask, cached=8) for model in (plain, injected)]
    _expect_stats(fallback_mask=_num_layers(injected))
    torch.testing.assert_close(results[1][0], results[0][0], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-4, rtol=1e-4)  # fp32 sums over many terms


@pytest.mark.parametrize("family", SUPPORTED)
def test_chunked_prefill_with_cache(family):
    """A second chunk of 6 queries against 16 cached keys: HF's mask is causal aligned bottom-right."""
    plain, injected = _pair(family)
    ids = _input_ids()
    cache_arg = "cache" if "cache" in inspect.signature(plain.forward).parameters else "past_key_values"  # < 5.24

    def chunked(model: torch.nn.Module) -> torch.Tensor:
        cache = DynamicCache(config=model.config)
        first = model(ids[:, :10], use_cache=True, **{cache_arg: cache}).logits
        second = model(ids[:, 10:], use_cache=True, **{cache_arg: cache}).logits
        return torch.cat([first, second], dim=1)

    ref = chunked(plain)
    te_fx.reset_te_attention_stats()
    out = chunked(injected)
    _expect_stats(te_hits=2 * _num_layers(injected))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ref, plain(ids).logits, atol=ATOL, rtol=RTOL)  # guard: the cache path is exact


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_window_mha_decode_runs_te(family):
    """Without GQA the decode query is not packed, so sliding-window decode steps (keys beyond the window) run TE."""
    plain, injected = _pair(family, num_key_value_heads=4)
    ids = _input_ids(seq_len=12)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    kwargs.update(attention_mask=torch.ones_like(ids), output_scores=True, return_dict_in_generate=True)
    ref = plain.generate(ids, **kwargs)
    te_fx.reset_te_attention_stats()
    out = injected.generate(ids, **kwargs)
    _expect_stats(te_hits=_num_layers(injected) * 6)
    assert torch.equal(out.sequences, ref.sequences)
    for step_out, step_ref in zip(out.scores, ref.scores, strict=True):
        torch.testing.assert_close(step_out, step_ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_sliding_window_gqa_decode_runs_te(family):
    plain, injected = _pair(family)
    ids = _input_ids(seq_len=12)
    kwargs = {"max_new_tokens": 4, "do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    ref = plain.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    te_fx.reset_te_attention_stats()
    out = injected.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    assert torch.equal(out, ref)
    _expect_stats(te_hits=_num_layers(injected) * 4)  # the sliding masks of these decode steps are exact


# --------------------------------------------------------------------------------------------- unsupported layouts


@pytest.mark.parametrize("family", UNSUPPORTED)
def test_unsupported_family_is_left_alone(family):
    plain, injected = _pair(family)
    # GPT-NeoX and Falcon name theirs `attention` / `self_attention`, which inject_te_attention does not visit
    modules = [module for module in injected.modules() if type(module).__name__.endswith("Attention")]
    assert len(modules) == _num_layers(injected)
    for module in modules:  # the documented skip reason holds: fused q/k/v, no layout te_fx can infer
        assert any(hasattr(module, name) for name in ("qkv_proj", "query_key_value")), FAMILIES[family].skip_reason
        assert params.infer_attn_params(module) is None
        assert te_fx.inject_te_attention_into_module(copy.deepcopy(module), executor="reference") is False
    assert not any(hasattr(module, "attn_module") for module in injected.modules())
    assert not getattr(injected, "_te_attention_injected", False)
    ids = _input_ids()
    assert torch.equal(injected(ids).logits, plain(ids).logits)
    _expect_stats()


# --------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("family", SUPPORTED)
def test_state_dict_round_trip(family):
    plain, injected = _pair(family)
    assert list(injected.state_dict()) == list(plain.state_dict())
    for name, value in injected.state_dict().items():
        assert torch.equal(value, plain.state_dict()[name]), name
    ids = _input_ids()
    expected = plain(ids).logits

    buffer = io.BytesIO()
    torch.save(injected.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(123)
    fresh_plain = tiny_model(family)
    assert not torch.allclose(fresh_plain(ids).logits, expected)
    fresh_plain.load_state_dict(torch.load(buffer), strict=True)
    torch.testing.assert_close(fresh_plain(ids).logits, expected, atol=0, rtol=0)

    torch.manual_seed(123)
    fresh_injected = tiny_model(family)
    te_fx.inject_te_attention(fresh_injected, executor="reference")
    fresh_injected.load_state_dict(plain.state_dict(), strict=True)
    torch.testing.assert_close(fresh_injected(ids).logits, expected, atol=ATOL, rtol=RTOL)


def test_te_module_state_stays_out_of_checkpoints():
    """TE's DotProductAttention carries state (``_extra_state``); a buffer on ``attn_module`` stands in for it."""
    plain, injected = _pair("llama_gqa")
    for module in _attn_modules(injected):
        module.attn_module.register_buffer("te_state", torch.zeros(3))
    assert list(injected.state_dict()) == list(plain.state_dict())
    result = injected.load_state_dict(plain.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_save_pretrained_loads_into_a_plain_model(tmp_path):
    plain, injected = _pair("llama_gqa")
    injected.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert not any(hasattr(module, "attn_module") for module in reloaded.modules())
    ids = _input_ids()
    torch.testing.assert_close(reloaded(ids).logits, plain(ids).logits, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------- module state


def test_deepcopy_of_an_injected_model_is_independent():
    plain, injected = _pair("llama")
    copied = copy.deepcopy(injected)
    with torch.no_grad():
        for model in (plain, copied):
            for module in _attn_modules(model):
                module.o_proj.weight.mul_(2.0)
    ids = _input_ids()
    torch.testing.assert_close(copied(ids).logits, plain(ids).logits, atol=ATOL, rtol=RTOL)


def test_user_mask_rewritten_through_data_is_classified_again_in_the_next_forward():
    """A 4D mask the user passes reaches SDPA as is; a write through ``.data`` (or numpy) keeps its version counter,
    so the per-mask decision must not outlive the forward it was made in."""
    plain, injected = _pair("llama_gqa")
    ids = _input_ids()
    mask = torch.ones(SEQ_LEN, SEQ_LEN, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(injected(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits,
                                   atol=ATOL, rtol=RTOL)  # fmt: skip
        assert te_fx.get_te_attention_stats()["te_hits"] == _num_layers(injected)
        te_fx.reset_te_attention_stats()
        mask.data[1, :, :, 5] = False  # padding inside row 1, invisible to mask._version
        torch.testing.assert_close(injected(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits,
                                   atol=ATOL, rtol=RTOL)  # fmt: skip
    assert te_fx.get_te_attention_stats() == {**ZERO_STATS, "fallback_mask": _num_layers(injected)}


def test_user_mask_rewritten_between_calls_of_the_decoder_or_of_one_module_is_classified_again():
    """The decisions also end with a forward of the decoder alone (``model.model``, as embedding and reward heads
    call it) and with a call of a module injected through ``inject_te_attention_into_module``."""
    plain, injected = _pair("llama")
    single = copy.deepcopy(plain)
    for module in _attn_modules(single):
        assert te_fx.inject_te_attention_into_module(module, executor="reference")
    ids = _input_ids(batch=1)
    mask = torch.ones(SEQ_LEN, SEQ_LEN, dtype=torch.bool).tril()[None, None].clone()
    half = SEQ_LEN // 2
    for model in (injected, single):
        with torch.no_grad():
            mask.data.copy_(torch.ones(SEQ_LEN, SEQ_LEN, dtype=torch.bool).tril())
            model.model(ids, attention_mask=mask)
            te_fx.reset_te_attention_stats()
            mask.data[0, 0, :, half] = False  # padding inside the row, invisible to mask._version
            torch.testing.assert_close(
                model.model(ids, attention_mask=mask).last_hidden_state,
                plain.model(ids, attention_mask=mask).last_hidden_state,
                atol=ATOL,
                rtol=RTOL,
            )
        assert te_fx.get_te_attention_stats() == {**ZERO_STATS, "fallback_mask": _num_layers(model)}


def _layer_call(model, hidden, mask):
    """One decoder layer called on its own, as pipeline stages and user loops do."""
    positions = torch.arange(hidden.shape[1])[None]
    embeddings = model.model.rotary_emb(hidden, positions)
    out = model.model.layers[0](hidden, attention_mask=mask, position_embeddings=embeddings, position_ids=positions)
    return out[0] if isinstance(out, tuple) else out


def test_user_mask_rewritten_between_calls_of_one_decoder_layer_is_classified_again():
    plain, injected = _pair("llama")
    hidden = torch.randn(1, SEQ_LEN, plain.config.hidden_size, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(SEQ_LEN, SEQ_LEN, dtype=torch.bool).tril()[None, None].clone()
    with torch.no_grad():
        _layer_call(injected, hidden, mask)
        te_fx.reset_te_attention_stats()
        mask.data[0, 0, :, SEQ_LEN // 2] = False  # padding inside the row, invisible to mask._version
        torch.testing.assert_close(_layer_call(injected, hidden, mask), _layer_call(plain, hidden, mask),
                                   atol=ATOL, rtol=RTOL)  # fmt: skip
    assert te_fx.get_te_attention_stats() == {**ZERO_STATS, "fallback_mask": 1}


def test_a_forward_interrupted_by_keyboard_interrupt_leaves_no_decision_behind():
    """KeyboardInterrupt skips PyTorch's forward hooks: the next forward must still start afresh."""
    plain, injected = _pair("llama_gqa")
    ids = _input_ids()
    mask = torch.ones(SEQ_LEN, SEQ_LEN, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)

    def interrupt(_module, _args):
        raise KeyboardInterrupt

    handle = injected.model.layers[1].register_forward_pre_hook(interrupt)
    with torch.no_grad():
        with pytest.raises(KeyboardInterrupt):
            injected(ids, attention_mask=mask)
        handle.remove()
        injected(ids, attention_mask=mask)
        mask.data[1, :, :, 3] = False  # padding inside row 1
        te_fx.reset_te_attention_stats()
        torch.testing.assert_close(injected(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits,
                                   atol=ATOL, rtol=RTOL)  # fmt: skip
    assert te_fx.get_te_attention_stats() == {**ZERO_STATS, "fallback_mask": _num_layers(injected)}


def test_a_mask_is_classified_once_per_forward_not_per_layer(monkeypatch):
    """HF hands every layer the same mask object: one classification (one host sync) per forward of the model."""
    from te_fx.core import masks

    plain, injected = _pair("llama", num_hidden_layers=3)
    calls = []
    real = masks._classify
    monkeypatch.setattr(masks, "_classify", lambda *args: calls.append(args) or real(*args))
    mask = torch.ones(SEQ_LEN, SEQ_LEN, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    with torch.no_grad():
        for _ in range(2):
            injected(_input_ids(), attention_mask=mask)
    assert te_fx.get_te_attention_stats()["te_hits"] == 2 * 3
    assert len(calls) == 2


def test_mla_keeps_every_kv_head_whatever_num_key_value_heads_says():
    """DeepSeek's kv_b_proj gives each query head its own K and V; a config with fewer KV heads must not make te_fx
    drop K/V heads (HF calls SDPA with enable_gqa and equal head counts here)."""
    plain, injected = _pair("deepseek_v3", num_key_value_heads=1, qk_nope_head_dim=8, qk_rope_head_dim=8,
                            v_head_dim=16)  # fmt: skip
    ids = _input_ids()
    with torch.no_grad():
        torch.testing.assert_close(injected(ids).logits, plain(ids).logits, atol=ATOL, rtol=RTOL)
    assert te_fx.get_te_attention_stats()["te_hits"] == _num_layers(injected)


def test_remove_te_attention_gives_back_the_plain_model():
    plain, injected = _pair("llama_gqa")
    te_fx.remove_te_attention(injected)
    assert not any(hasattr(module, "attn_module") for module in injected.modules())
    assert not hasattr(injected, "_te_attention_injected")
    assert not any(
        m._forward_pre_hooks or m._forward_hooks or m._forward_hooks_always_called for m in injected.modules()
    )
    assert injected.state_dict().keys() == plain.state_dict().keys()
    ids = _input_ids()
    torch.testing.assert_close(injected(ids).logits, plain(ids).logits, atol=0, rtol=0)
    assert te_fx.get_te_attention_stats() == ZERO_STATS
    te_fx.inject_te_attention(injected, executor="reference")  # and it can be injected again
    injected(ids)
    assert te_fx.get_te_attention_stats()["te_hits"] == _num_layers(injected)


def test_remove_te_attention_gives_back_a_forward_installed_before_injection():
    """Accelerate's hooks and user wrappers set ``module.forward``: injection runs them, removal restores them."""
    import functools

    plain, injected = _pair("llama")
    for model in (plain, injected):
        attention = model.model.layers[0].self_attn
        own = attention.forward

        def halved(*args, own=own, **kwargs):
            out, weights = own(*args, **kwargs)
            return out * 0.5, weights

        attention.forward = functools.update_wrapper(halved, own)
    te_fx.remove_te_attention(injected)
    te_fx.inject_te_attention(injected, executor="reference")
    ids = _input_ids()
    with torch.no_grad():
        torch.testing.assert_close(injected(ids).logits, plain(ids).logits, atol=ATOL, rtol=RTOL)
        te_fx.remove_te_attention(injected)
        torch.testing.assert_close(injected(ids).logits, plain(ids).logits, atol=ATOL, rtol=RTOL)
    assert vars(injected.model.layers[0].self_attn)["forward"].__wrapped__ is not None


def test_data_parallel_replication_of_an_injected_model_is_refused(monkeypatch):
    """A replica would share the original module's patched forward (its weights, its device): a clear error instead.
    The GPU broadcast of torch's replicate() is emulated by copies on the CPU."""
    replicate_module = importlib.import_module("torch.nn.parallel.replicate")  # the package exports the function

    monkeypatch.setattr(replicate_module, "_get_device_index", lambda device, optional=False: 0)
    monkeypatch.setattr(
        replicate_module,
        "_broadcast_coalesced_reshape",
        lambda tensors, devices, detach=False: [[t.detach().clone() for t in tensors] for _ in devices],
    )
    plain, injected = _pair("llama")
    assert replicate_module.replicate(plain, [0], detach=True)  # the emulation works for a plain model
    with pytest.raises(RuntimeError, match="DistributedDataParallel"):
        replicate_module.replicate(injected, [0], detach=True)
    te_fx.remove_te_attention(injected)
    assert replicate_module.replicate(injected, [0], detach=True)


@pytest.mark.parametrize("family", ["llama_gqa", "gemma3", "deepseek_v3"])
def test_train_eval_and_dtype_follow_the_model(family):
    plain, injected = _pair(family)
    te_modules = [module.attn_module for module in _attn_modules(injected)]
    assert te_modules and not any(module.training for module in te_modules)

    ids = _input_ids()
    plain.train()
    injected.train()
    assert all(module.training for module in te_modules)
    te_fx.reset_te_attention_stats()
    torch.testing.assert_close(injected(ids).logits, plain(ids).logits, atol=ATOL, rtol=RTOL)  # dropout is 0
    _expect_stats(te_hits=_num_layers(injected))

    plain.eval().to(torch.float64)
    injected.eval().to(torch.float64)
    assert not any(module.training for module in te_modules)
    assert all(p.dtype == torch.float64 for p in injected.parameters())
    assert [module.attn_module for module in _attn_modules(injected)] == te_modules
    te_fx.reset_te_attention_stats()
    out = injected(ids).logits
    _expect_stats(te_hits=_num_layers(injected))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, plain(ids).logits, atol=1e-10, rtol=1e-10)


# --------------------------------------------------------------------------------------------- dropout


def _layer0_attention_samples(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Layer 0's self_attn output for ``ids`` (its input does not depend on attention dropout)."""
    captured = []
    handle = _attn_modules(model)[0].register_forward_hook(lambda _m, _i, out: captured.append(out[0].detach()))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    return captured[0]


def test_attention_dropout_in_eval_and_train():
    plain, injected = _pair("llama", attention_dropout=0.5)
    layers = _num_layers(injected)
    ids = _input_ids()
    te_fx.reset_te_attention_stats()
    eval_out = injected(ids).logits
    torch.testing.assert_close(eval_out, plain(ids).logits, atol=ATOL, rtol=RTOL)  # eval: no dropout at all
    _expect_stats(te_hits=layers)

    injected.train()
    te_fx.reset_te_attention_stats()
    torch.manual_seed(1)
    first = injected(ids).logits
    torch.manual_seed(1)
    again = injected(ids).logits
    torch.manual_seed(2)
    other = injected(ids).logits
    _expect_stats(te_hits=3 * layers)  # the call's dropout_p equals the TE module's: TE applies it
    assert torch.isfinite(first).all()
    assert torch.equal(first, again)  # drawn from torch's RNG
    assert (first - other).abs().max() > 1e-2
    assert (first - eval_out).abs().max() > 1e-2

    # Same distribution as SDPA's dropout: attention is linear in the kept probabilities, so with inverted dropout
    # the mean over many samples is the eval output; the spread must match SDPA's too.
    batch = _input_ids(batch=1, seq_len=12).expand(512, -1)
    exact = _layer0_attention_samples(plain, batch[:1])[0]  # plain is still in eval mode
    plain.train()
    te_samples = _layer0_attention_samples(injected, batch)
    sdpa_samples = _layer0_attention_samples(plain, batch)
    scale = exact.abs().mean()
    for samples in (te_samples, sdpa_samples):
        assert (samples.mean(0) - exact).abs().mean() < 0.1 * scale
    te_spread, sdpa_spread = te_samples.std(0).mean(), sdpa_samples.std(0).mean()
    assert te_spread > 0.1 * scale
    assert abs(te_spread - sdpa_spread) < 0.1 * sdpa_spread


def test_dropout_that_differs_from_the_te_module_falls_back():
    plain, injected = _pair("llama", attention_dropout=0.5)
    for model in (plain, injected):
        model.train()
        for module in _attn_modules(model):
            module.attention_dropout = 0.25  # the TE module was built with 0.5
    ids = _input_ids()
    torch.manual_seed(3)
    ref = plain(ids).logits
    te_fx.reset_te_attention_stats()
    torch.manual_seed(3)
    out = injected(ids).logits
    _expect_stats(fallback_dropout=_num_layers(injected))
    assert torch.equal(out, ref)  # the original SDPA ran, with the same random stream


# --------------------------------------------------------------------------------------------- softmax scale


@pytest.mark.parametrize("family", ["gemma3", "granite"])
def test_a_call_scale_that_differs_from_the_te_module_runs_with_the_calls_scale(family):
    """te_fx's own attention modules take each call's scale; a stand-in cannot (tests/test_te_sdpa.py)."""
    plain, injected = _pair(family)
    for model in (plain, injected):
        for module in _attn_modules(model):
            module.scaling = 0.3  # the TE module was built with the config's scale
    ids = _input_ids()
    ref = plain(ids).logits
    te_fx.reset_te_attention_stats()
    out = injected(ids).logits
    _expect_stats(te_hits=_num_layers(injected))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)


def test_opt_which_scales_the_query_itself_runs_on_te():
    """OPT multiplies q by head_dim ** -0.5 and calls SDPA with scale=1: the product is what matters."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                       max_position_embeddings=64, attn_implementation="sdpa")  # fmt: skip
    torch.manual_seed(0)
    plain = OPTForCausalLM(config).eval()
    injected = copy.deepcopy(plain)
    te_fx.inject_te_attention(injected, executor="reference")
    ids = _input_ids()
    te_fx.reset_te_attention_stats()
    torch.testing.assert_close(injected(ids).logits, plain(ids).logits, atol=ATOL, rtol=RTOL)
    _expect_stats(te_hits=config.num_hidden_layers)


def test_a_query_projection_that_also_computes_a_gate_is_not_injected():
    """Qwen3-Next's q_proj gives queries and an output gate (twice H * D) and its module has no head count: the
    width says 2H heads, the config H. te_fx does not guess which; the module keeps SDPA."""
    from types import SimpleNamespace

    from torch import nn

    class GatedAttention(nn.Module):
        def __init__(self, heads, kv_heads, head_dim, gated=True):
            super().__init__()
            self.config = SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv_heads)
            self.head_dim = head_dim
            self.q_proj = nn.Linear(64, (2 if gated else 1) * heads * head_dim)
            self.k_proj = nn.Linear(64, kv_heads * head_dim)
            self.v_proj = nn.Linear(64, kv_heads * head_dim)

    assert params.infer_attn_params(GatedAttention(4, 2, 16)) is None
    assert params.infer_attn_params(GatedAttention(4, 2, 16, gated=False))["num_heads"] == 4
