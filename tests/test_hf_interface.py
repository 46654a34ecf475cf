"""``attn_implementation="te"`` on tiny models of every family (CPU, fp32, reference executor): each test compares a
model running "te" with the same weights running HF's "sdpa" (or "eager", for what SDPA cannot express): logits,
gradients, greedy generation, compiled graphs. Counters are checked too, but never instead of outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from steps import padded_cache_training_step
from transformers import AutoConfig, AutoModelForCausalLM, DataCollatorWithFlattening
from transformers import masking_utils as hf_masks

import te_fx
from te_fx.hf_interface import te_attention_forward, te_mask
from te_fx.hf_interface.mask import MaskInfo, read_mask
from te_fx.tools import tiny_models
from te_fx.tools.tiny_models import tiny_model

FAMILIES = [name for name in tiny_models.FAMILIES if name != "falcon"]  # Falcon does not use AttentionInterface
SLIDING = ["mistral", "qwen2", "gemma3"]
ATOL = RTOL = 1e-5
NEW_TOKENS = 6
ZERO_STATS = dict.fromkeys(te_fx.get_te_attention_stats(), 0)


@pytest.fixture(autouse=True)
def _reference_executor(monkeypatch):
    monkeypatch.setenv("TE_FX_EXECUTOR", "reference")


def _pair(family: str, reference: str = "sdpa", **overrides) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(HF's ``reference`` implementation, "te"): one randomly initialised tiny model, twice."""
    torch.manual_seed(0)
    plain = tiny_model(family, **overrides)
    te = tiny_model(family, **overrides)
    te.load_state_dict(plain.state_dict())
    plain.set_attn_implementation(reference)
    te.set_attn_implementation("te")
    return plain, te


def _ids(batch: int, seq_len: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def _expect_stats(**counts: int) -> None:
    assert te_fx.get_te_attention_stats() == {**ZERO_STATS, **counts}


def _step(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Logits of a training forward (labels -100 where the attention mask is 0), after its backward."""
    mask = kwargs.get("attention_mask")
    labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    out = model(ids, labels=labels, use_cache=False, **kwargs)
    out.loss.backward()
    return out.logits.detach()


def _assert_same_training_step(plain, te, ids, **kwargs) -> None:
    ref = _step(plain, ids, **kwargs)
    te_fx.reset_te_attention_stats()
    out = _step(te, ids, **kwargs)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    grads = dict(plain.named_parameters())
    for name, param in te.named_parameters():
        assert (param.grad is None) == (grads[name].grad is None), name
        if param.grad is not None:
            torch.testing.assert_close(param.grad, grads[name].grad, atol=ATOL, rtol=1e-4, msg=name)


def test_the_name_builds_models():
    config = AutoConfig.for_model("llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, attn_implementation="te")
    assert model.config._attn_implementation == "te"
    model(_ids(1, 8) % 64)
    _expect_stats(te_hits=1)


@pytest.mark.parametrize("padding", ["none", "left", "right", "both", "inner", "ones"])
@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_matches_sdpa(family, padding):
    """Key padding at the ends of rows runs TE (sliding layers' windows too); padding inside a row, which HF's
    SDPA mask builds with positions TE's key padding cannot keep under a window in training, runs HF's SDPA on HF's
    mask. Logits at every position and gradients equal "sdpa"'s."""
    plain, te = _pair(family)
    ids = _ids(3, 12)
    mask = torch.ones_like(ids)
    if padding in ("left", "both"):
        mask[1, :4] = 0
    if padding in ("right", "both"):
        mask[2, 9:] = 0
    if padding == "inner":
        mask[1, 3:5] = 0
    kwargs = {} if padding == "none" else {"attention_mask": mask}
    _assert_same_training_step(plain, te, ids.masked_fill(mask == 0, 0), **kwargs)
    layers = te.config.num_hidden_layers
    _expect_stats(fallback_mask=layers) if padding == "inner" else _expect_stats(te_hits=layers)


PACKED_POSITIONS = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2]])


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_position_ids_run_documents(family):
    """position_ids restarting at 0 (no mask): HF's SDPA builds a block-diagonal mask; "te" runs the documents in
    TE's thd format. Same logits and gradients; the documents really are separate."""
    plain, te = _pair(family)
    ids = _ids(1, PACKED_POSITIONS.shape[1])
    _assert_same_training_step(plain, te, ids, position_ids=PACKED_POSITIONS)
    _expect_stats(te_hits=te.config.num_hidden_layers)
    with torch.no_grad():
        alone = plain(ids[:, 5:15], use_cache=False).logits
    torch.testing.assert_close(
        te(ids, position_ids=PACKED_POSITIONS, use_cache=False).logits[:, 5:15], alone, atol=ATOL, rtol=RTOL
    )


def _collated(lengths=(3, 11, 1, 6)) -> dict:
    generator = torch.Generator().manual_seed(3)
    examples = [{"input_ids": torch.randint(3, 128, (n,), generator=generator).tolist()} for n in lengths]
    return DataCollatorWithFlattening(return_flash_attn_kwargs=True)(examples)


@pytest.mark.parametrize("family", ["llama_gqa", "mistral", "gemma3"])
def test_collator_packed_batches(family):
    batch = _collated()
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    plain, te = _pair(family)
    outputs = []
    for model in (plain, te):
        te_fx.reset_te_attention_stats()
        out = model(**batch, use_cache=False)
        out.loss.backward()
        outputs.append(out.logits.detach())
    _expect_stats(te_hits=te.config.num_hidden_layers)
    torch.testing.assert_close(outputs[1], outputs[0], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_matches_sdpa(family, cache, padded):
    plain, te = _pair(family)
    ids = _ids(2, 10)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0
        ids = ids.masked_fill(mask == 0, 0)
    kwargs = {"attention_mask": mask, "max_new_tokens": NEW_TOKENS, "do_sample": False, "eos_token_id": None,
              "pad_token_id": 0, "output_scores": True, "return_dict_in_generate": True}  # fmt: skip
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    ref = plain.generate(ids, **kwargs)
    te_fx.reset_te_attention_stats()
    out = te.generate(ids, **kwargs)
    assert torch.equal(out.sequences, ref.sequences)
    for step_out, step_ref in zip(out.scores, ref.scores, strict=True):
        torch.testing.assert_close(step_out, step_ref, atol=ATOL, rtol=RTOL)
    stats = te_fx.get_te_attention_stats()
    assert sum(stats.values()) == te.config.num_hidden_layers * NEW_TOKENS
    if cache == "dynamic":  # decode steps of a padded batch too: the KV cache's key padding runs on te_fx's op
        assert stats == {**ZERO_STATS, "te_hits": te.config.num_hidden_layers * NEW_TOKENS}


def test_key_padding_with_a_kv_cache_in_training_falls_back_counted():
    """A forward with autograd on against a padded KV cache: te_fx's op has no exact training route for a KV cache's
    queries, so HF's SDPA runs it, counted, with the plain model's logits and gradients."""
    plain, te = _pair("llama")
    ids = _ids(2, 11)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    results = [padded_cache_training_step(model, ids, mask, cached=8) for model in (plain, te)]
    _expect_stats(fallback_mask=te.config.num_hidden_layers)
    torch.testing.assert_close(results[1][0], results[0][0], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-4, rtol=1e-4)  # fp32 sums over 4096 terms


SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=128, initializer_range=0.2)  # fmt: skip


def _config_pair(model_type: str, reference: str, **overrides) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(``reference``, "te") from one config of ``model_type``: each model gets its own copy (a model built from a
    config writes its attention implementation into it)."""
    config = AutoConfig.for_model(model_type, **{**SMALL, **overrides})
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=reference)
    te = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="te")
    te.load_state_dict(plain.state_dict())
    assert plain.config._attn_implementation == reference and te.config._attn_implementation == "te"
    return plain, te


def _batches(batch: int = 2, seq_len: int = 12) -> dict[str, tuple[torch.Tensor, dict]]:
    """(input ids, the other inputs) without padding and right-padded."""
    ids = _ids(batch, seq_len)
    right = torch.ones_like(ids)
    right[0, seq_len - 3 :] = 0
    return {"no_padding": (ids, {}), "right_padding": (ids.masked_fill(right == 0, 0), {"attention_mask": right})}


@pytest.mark.parametrize("batch", ["no_padding", "right_padding"])
def test_softcapping_runs_the_models_eager_attention(batch):
    """Softcapping (Gemma2): SDPA cannot apply it, so "te" runs the model's eager attention (fallback_argument) on the
    mask built then, causal where nothing is padded."""
    plain, te = _config_pair("gemma2", "eager", sliding_window=4, attn_logit_softcapping=5.0)
    ids, inputs = _batches()[batch]
    _assert_same_training_step(plain, te, ids, **inputs)
    _expect_stats(fallback_argument=te.config.num_hidden_layers)


GPT_OSS = dict(num_local_experts=2, num_experts_per_tok=1, sliding_window=4,
               layer_types=["sliding_attention", "full_attention"] * 2)  # fmt: skip


@pytest.mark.parametrize("padding", ["none", "left", "right", "inner", "packed"])
def test_attention_sinks_run_on_the_executor(padding):
    """GPT-OSS's per-head sinks (``s_aux``) run on the executor's learnable softmax offset, sliding and full layers,
    padded and packed rows: logits and every gradient, the sinks' included, equal HF's eager attention (the only
    implementation of sinks in transformers). Padding inside a row under a window stays on HF's eager path."""
    plain, te = _config_pair("gpt_oss", "eager", **GPT_OSS)
    with torch.no_grad():  # sinks far from 0 and from each other, so that a wrong one shows
        for model in (plain, te):
            for i, layer in enumerate(model.model.layers):
                layer.self_attn.sinks.copy_(torch.linspace(-2.0, 3.0, 4) + i)
    ids = _ids(3, 12)
    if padding == "packed":
        _assert_same_training_step(plain, te, ids[:1, :10], position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]]))
        _expect_stats(te_hits=4)
        return
    mask = torch.ones_like(ids)
    mask[1, {"left": slice(0, 4), "right": slice(8, 12), "inner": slice(3, 6), "none": slice(0, 0)}[padding]] = 0
    _assert_same_training_step(plain, te, ids.masked_fill(mask == 0, 0), attention_mask=mask)
    assert all(layer.self_attn.sinks.grad.abs().min() > 0 for layer in te.model.layers)
    _expect_stats(te_hits=4) if padding != "inner" else _expect_stats(fallback_mask=4)


def test_per_token_sinks_run_the_models_eager_attention():
    """Sinks that are not one logit per head (a per-token ``s_aux``) are not TE's offset: the eager attention runs."""
    from transformers.models.gpt_oss import modeling_gpt_oss

    config = AutoConfig.for_model("gpt_oss", **{**SMALL, **GPT_OSS})
    module = modeling_gpt_oss.GptOssAttention(config, layer_idx=0)
    torch.nn.init.normal_(module.sinks)
    q, (k, v) = torch.randn(2, 4, 6, 8), (torch.randn(2, 2, 6, 8) for _ in range(2))
    mask = torch.zeros(6, 6).masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    ref, _ = modeling_gpt_oss.eager_attention_forward(module, q, k, v, mask, scaling=0.5)
    out, _ = te_attention_forward(module, q, k, v, None, scaling=0.5, s_aux=module.sinks[None, :, None])
    torch.testing.assert_close(out, ref)
    _expect_stats(fallback_argument=1)


@pytest.mark.parametrize("model_type", ["phimoe", "olmoe"])
def test_the_masks_window_wins_over_the_layers_argument(model_type):
    """PhiMoE builds a sliding-window mask but passes no ``sliding_window`` to its attention; OLMoE passes one but
    builds a full causal mask. HF's SDPA follows the mask, and so does "te" (on TE, no fallback)."""
    extra = dict(num_local_experts=2, num_experts=2, num_experts_per_tok=1, sliding_window=4)
    plain, te = _config_pair(model_type, "sdpa", **extra)
    _assert_same_training_step(plain, te, _batches()["no_padding"][0])
    _expect_stats(te_hits=te.config.num_hidden_layers)


def _source_says(model_type: str, text: str) -> bool:
    import importlib
    import inspect

    return text in inspect.getsource(importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}"))


@pytest.mark.skipif(
    not _source_says("doge", "allow_is_causal_skip=False"), reason="this transformers' Doge indexes any mask as 4D"
)
def test_a_mask_hf_must_materialize_is_hfs():
    """Doge adds its own dynamic mask to the causal one, so it asks for the mask materialized
    (``allow_is_causal_skip=False``): HF builds it and its SDPA runs."""
    plain, te = _config_pair("doge", "sdpa", num_hidden_layers=2, num_key_value_heads=4, keep_window_size=2048)
    for ids, inputs in _batches().values():
        _assert_same_training_step(plain, te, ids, **inputs)
        _expect_stats(fallback_mask=2)


def test_position_bias_runs_the_models_eager_attention():
    """T5's attention module with its relative position bias: te_attention_forward runs T5's eager attention."""
    from transformers import T5Config
    from transformers.models.t5 import modeling_t5

    if not hasattr(modeling_t5, "eager_attention_forward"):
        pytest.skip("this transformers' T5 has no eager attention function")
    config = T5Config(d_model=32, d_kv=8, num_heads=4)
    module = modeling_t5.T5Attention(config, has_relative_attention_bias=True)
    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    bias = torch.randn(1, 4, 6, 6)
    ref, _ = modeling_t5.eager_attention_forward(module, q, k, v, None, scaling=1.0, position_bias=bias)
    out, _ = te_attention_forward(module, q, k, v, None, scaling=1.0, position_bias=bias)
    torch.testing.assert_close(out, ref)
    _expect_stats(fallback_argument=1)


def test_arguments_pass_by_as_in_sdpa_except_a_models_own_kernel_indices():
    """Models hand their attention whatever the caller gave (a tokenizer's ``token_type_ids``): it passes by, as in
    HF's SDPA. DeepSeek-V3.2-style top-k ``indices``, meant for a kernel of the model's own, are an error."""
    plain, te = _pair("llama_gqa")
    ids = _ids(2, 8)
    with torch.no_grad():
        ref = plain(ids, token_type_ids=torch.zeros_like(ids)).logits
        out = te(ids, token_type_ids=torch.zeros_like(ids)).logits
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    q = torch.randn(1, 4, 6, 8)
    k = v = torch.randn(1, 2, 6, 8)
    with pytest.raises(NotImplementedError, match=r"\['indices'\]"):
        te_attention_forward(torch.nn.Module(), q, k, v, None, indices=torch.zeros(1, 6, 2, dtype=torch.int32))


def test_a_model_outside_the_attention_interface_is_refused():
    """Bloom accepts the name but runs its own attention code, which would read te_mask's values as a mask: a clear
    error instead (its counters would otherwise stay at zero while it computes something else)."""
    config = AutoConfig.for_model("bloom", vocab_size=128, hidden_size=32, n_layer=1, n_head=4)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="te")
    with pytest.raises(ValueError, match="BloomForCausalLM runs its own attention code"):
        model(_ids(1, 6))


def test_a_non_causal_layer_given_a_causal_mask_follows_the_mask():
    """Gemma with ``use_bidirectional_attention`` gets HF's causal mask function while its layers say they are not
    causal: HF's eager attention (and SDPA wherever a mask is built) follows the mask, and so does "te"."""
    plain, te = _config_pair("gemma", "eager", num_hidden_layers=2, use_bidirectional_attention=True)
    for ids, inputs in _batches().values():
        _assert_same_training_step(plain, te, ids, **inputs)


def test_custom_mask_function_is_built_by_hf():
    """An overlay te_fx cannot name (here an and_mask_function) gets HF's own SDPA mask, exactly."""

    def hide_key_2(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx != 2

    fn = hf_masks.and_masks(hf_masks.causal_mask_function, hide_key_2)
    kwargs = dict(batch_size=2, q_length=6, kv_length=6, mask_function=fn, attention_mask=None)
    expected = hf_masks.sdpa_mask(**kwargs, allow_is_causal_skip=False)
    assert torch.equal(te_mask(**kwargs, allow_is_causal_skip=False), expected)
    plain = te_mask(**{**kwargs, "mask_function": hf_masks.causal_mask_function})
    assert read_mask(plain) == MaskInfo(window_left=-1)


@pytest.mark.parametrize("family", ["llama_gqa", "gemma3"])
def test_autocast_bf16_runs_te_as_sdpa_does(family):
    """fp32 weights under bf16 autocast: every call on TE, within twice the plain model's own bf16 noise."""
    plain, te = _pair(family)
    ids = _ids(2, 12)
    fp32 = _step(plain, ids)
    plain.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = _step(plain, ids).float()
        te_fx.reset_te_attention_stats()
        out = _step(te, ids).float()
    _expect_stats(te_hits=te.config.num_hidden_layers)
    assert 0 < (bf16 - fp32).abs().max() < 1.0
    assert (out - bf16).abs().max() <= 2 * (bf16 - fp32).abs().max()


def test_te_executor_without_cuda_falls_back_counted(monkeypatch):
    monkeypatch.setenv("TE_FX_EXECUTOR", "te")
    plain, te = _pair("llama_gqa")
    _assert_same_training_step(plain, te, _ids(2, 8))
    _expect_stats(fallback_device=te.config.num_hidden_layers)


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def _recording_aot_eager(op_calls: list):
    """aot_eager that appends to ``op_calls`` how many calls of te_fx's op each graph Dynamo hands it holds."""
    from torch._dynamo.backends.debugging import aot_eager

    def backend(gm, example_inputs):
        ops = ("te_fx.attention_fwd", "te_fx.padded_attention_fwd")
        op_calls.append(sum(str(node.target).startswith(ops) for node in gm.graph.nodes))
        return aot_eager(gm, example_inputs)

    return backend


@pytest.mark.parametrize("batch", ["right_padded", "no_mask", "collator"])
@pytest.mark.parametrize("family", ["llama_gqa", "gemma3"])
def test_compiles_fullgraph_without_recompiling_per_length(family, batch):
    """``torch.compile(fullgraph=True, dynamic=True)``: no graph break; two sequence lengths, one graph; logits
    equal eager "sdpa"'s. Inference (no_grad): te_fx's op runs every layer given a padding mask (sliding ones on
    TE's key bias, exact wherever the padding sits); collator-packed rows run the documents of the collator's
    cu_seq_lens_q. Without a
    mask, HF builds its packed-documents mask from the position_ids under compile, whose documents a graph cannot
    read: HF's SDPA runs."""
    torch._dynamo.reset()
    plain, te = _pair(family)
    op_calls = []
    compiled = torch.compile(te, fullgraph=True, dynamic=True, backend=_recording_aot_eager(op_calls))
    frames = []
    for length in (10, 14):
        if batch == "collator":
            kwargs = _collated((3, length - 3))
        elif batch == "no_mask":
            kwargs = {"input_ids": _ids(2, length)}
        else:
            ids = _ids(2, length)
            mask = torch.ones_like(ids)
            mask[1, length - 3 :] = 0
            kwargs = {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}
        with torch.no_grad():
            ref = plain(**kwargs, use_cache=False).logits
            out = compiled(**kwargs, use_cache=False).logits
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
        from torch._dynamo.utils import counters

        frames.append(counters["stats"]["unique_graphs"])
    assert _graph_breaks() == 0
    assert frames[0] == frames[1]
    layers = getattr(te.config, "layer_types", None) or ["full_attention"] * te.config.num_hidden_layers
    assert op_calls and set(op_calls) == {0 if batch == "no_mask" else len(layers)}


@pytest.mark.parametrize("family", ["llama_gqa", "gemma3"])
def test_compiled_padding_anywhere_is_exact_at_every_position(family):
    """Under torch.compile te_mask cannot check where the padding sits: in inference, padding inside a row and at
    both ends runs TE's key bias, full-causal and sliding layers alike, with logits equal to "sdpa"'s at every
    position."""
    torch._dynamo.reset()
    plain, te = _pair(family)
    ids = _ids(3, 12)
    mask = torch.ones_like(ids)
    mask[1, 3:6] = 0
    mask[2, :2] = 0
    mask[2, 10:] = 0
    op_calls = []
    compiled = torch.compile(te, fullgraph=True, backend=_recording_aot_eager(op_calls))
    with torch.no_grad():
        ref = plain(ids, attention_mask=mask, use_cache=False).logits
        out = compiled(ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    assert op_calls == [te.config.num_hidden_layers]


def test_compiled_training_runs_every_layer_with_a_padding_mask_of_any_layout():
    """In training a compiled graph cannot see where the padding sits; te_fx's op reads it at run time, so one graph
    runs sliding and full-causal layers alike for a mask of ones, left padding and padding inside a row, each step
    equal to "sdpa"'s."""
    torch._dynamo.reset()
    plain, te = _pair("gemma3")
    op_calls = []
    te.forward = torch.compile(te.forward, fullgraph=True, backend=_recording_aot_eager(op_calls))
    ids = _ids(2, 12)
    for padded in ([], [(1, slice(0, 3))], [(0, slice(4, 6)), (1, slice(0, 2))]):
        mask = torch.ones_like(ids)
        for row, columns in padded:
            mask[row, columns] = 0
        _assert_same_training_step(plain, te, ids.masked_fill(mask == 0, 0), attention_mask=mask)
    assert op_calls == [te.config.num_hidden_layers]


@pytest.mark.parametrize("family", ["mistral", "llama_gqa"])
def test_a_mask_built_under_compile_and_read_outside_it_is_not_taken_as_checked(family):
    """te_mask under torch.compile cannot check where the padding sits; an attention call outside the compiled region
    (``torch.compiler.disable``) that reads that mask must not take it for one te_mask checked: padding inside a row
    stays exact at every position."""
    torch._dynamo.reset()
    plain, te = _pair(family)
    for layer in te.model.layers:
        layer.self_attn.forward = torch.compiler.disable(layer.self_attn.forward)
    te.forward = torch.compile(te.forward, backend="aot_eager")
    ids = _ids(2, 16)
    mask = torch.ones_like(ids)
    mask[0, 3:6] = 0
    _assert_same_training_step(plain, te, ids, attention_mask=mask)
    with torch.no_grad():
        torch.testing.assert_close(te(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits,
                                   atol=ATOL, rtol=RTOL)  # fmt: skip
