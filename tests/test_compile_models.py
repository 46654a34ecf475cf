"""``torch.compile(model, backend="te_attn")`` on the tiny model families (CPU, fp32, reference executor).

Every compiled model is compared with the uncompiled one holding the same parameters: logits and the gradients of
all parameters, without an attention_mask, with one of ones, and with right, left and in-row ("holes") padding
(valid positions only, the loss over valid positions only). The compile report must say, layer by layer, what the
graph allows: which SDPA nodes become TE attention, with which mask kind and window, and why the others stay on SDPA.

The assertions hold for transformers 5.17 and 5.24 alike. The two differ in how a model without attention_mask
reaches SDPA under compile (5.24 passes ``is_causal=True`` for full-attention layers, 5.17 materialises the causal
mask from index arithmetic); a spy backend records which form each SDPA node of the Dynamo graph has, and the
expectations follow from that form, not from the version number.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch.torch_version import TorchVersion
from transformers import DynamicCache

import te_fx
from te_fx.compile.fx_pass import _SDPA_TARGETS, _sdpa_arguments
from te_fx.core.reasons import REASONS
from te_fx.tools.tiny_models import FAMILIES, PAD_TOKEN_ID, SLIDING_WINDOW, tiny_model

OPTIONS = {"executor": "reference", "inner": "aot_eager"}
BATCH, SEQ = 2, 16  # SEQ > SLIDING_WINDOW: sliding layers really cut keys off
LOGIT_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-5, atol=1e-5)
MASK_KINDS = ["none", "ones", "right", "left", "holes"]

# The rewritten layer's KV head count: repeat_kv is elided (GQA/MQA run natively). Falcon's new decoder
# architecture broadcasts its KV heads with ``torch.broadcast_to`` before SDPA, which the pass does not undo: TE
# gets the broadcast heads, still exact.
# Falcon repeats K/V itself up to transformers 5.24; from 5.25 its SDPA call takes them with their own heads
FALCON_KV_HEADS = 2 if TorchVersion(transformers.__version__) >= (5, 25) else 4
EXPECTED_KV_HEADS = {
    "llama": 4, "llama_gqa": 2, "mistral": 2, "qwen2": 2, "qwen3": 2, "gemma": 1, "gemma3": 2, "granite": 2,
    "deepseek_v3": 4, "phi3": 2, "gpt_neox": 4, "falcon": FALCON_KV_HEADS, "falcon_alibi": FALCON_KV_HEADS,
}  # fmt: skip
EXPECTED_HEAD_DIM = {"deepseek_v3": 24}  # MLA: QK head dim 16 + 8 (V head dim 16); 16 everywhere else

# (family, config overrides). Falcon's tiny config uses rotary embeddings (alibi=False) and a plain causal mask, so
# the pass rewrites it; with ALiBi the mask is a float bias and must stay on SDPA.
CASES = {name: (name, {}) for name in FAMILIES}
CASES["falcon_alibi"] = ("falcon", {"alibi": True})


# --------------------------------------------------------------------------------------------- helpers


@dataclasses.dataclass
class GraphRecord:
    """One invocation of te_attn: per SDPA node, whether it has an attn_mask node and is_causal, and the report
    entries te_attn produced for it."""

    forms: list[tuple[bool, bool]]
    entries: list[dict]
    dynamic: bool = False  # whether the graph has symbolic sizes


def _spy_backend(records: list[GraphRecord], options: dict = OPTIONS):
    """A Dynamo backend that records the SDPA nodes' form, then runs te_attn (looked up by name)."""

    def backend(gm, example_inputs):
        forms = []
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in _SDPA_TARGETS:
                args = _sdpa_arguments(node)
                forms.append((isinstance(args["attn_mask"], torch.fx.Node), args["is_causal"] is True))
        before = len(te_fx.compile_report())
        compiled = torch._dynamo.lookup_backend("te_attn")(gm, example_inputs, options=dict(options))
        records.append(GraphRecord(forms, te_fx.compile_report()[before:], _is_dynamic(example_inputs)))
        _assert_reasons_are_keys(records[-1].entries)
        return compiled

    return backend


def _assert_reasons_are_keys(entries: list[dict]) -> None:
    """Every entry left on SDPA names its reason by a key of the one reason table, with a detail; a rewritten one
    says "rewritten"."""
    for entry in entries:
        if entry["decision"] == "te":
            assert entry["reason"] == "rewritten" and entry["detail"] == "", entry
        else:
            assert entry["decision"] == "sdpa" and entry["reason"] in REASONS and entry["detail"], entry


def _is_dynamic(example_inputs) -> bool:
    symbolic = lambda size: isinstance(size, torch.SymInt)  # noqa: E731
    return any(
        symbolic(x) or (isinstance(x, torch.Tensor) and any(symbolic(size) for size in x.shape)) for x in example_inputs
    )


def _input_ids(batch: int = BATCH, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, seq), generator=generator)


def _attention_mask(kind: str, batch: int = BATCH, seq: int = SEQ) -> torch.Tensor | None:
    """None, or a (batch, seq) int64 mask (1 = keep): all ones, the first row right or left padded (the last row
    unpadded: a batch mixing both), or padding holes inside rows."""
    if kind == "none":
        return None
    mask = torch.ones(batch, seq, dtype=torch.long)
    if kind == "right":
        mask[0, seq - 5 :] = 0
    elif kind == "left":
        mask[0, : min(6, seq - 1)] = 0
    elif kind == "holes":
        mask[0, 3:6] = 0
        mask[-1, [1, seq // 2, seq // 2 + 1]] = 0
    elif kind != "ones":
        raise ValueError(kind)
    return mask


def _batch(kind: str, batch: int = BATCH, seq: int = SEQ, seed: int = 1):
    """(input_ids, attention_mask, labels): padded positions hold the pad token and label -100."""
    ids = _input_ids(batch, seq, seed)
    mask = _attention_mask(kind, batch, seq)
    labels = _input_ids(batch, seq, seed + 100)
    if mask is not None:
        ids = ids.masked_fill(mask == 0, PAD_TOKEN_ID)
        labels = labels.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _valid(mask: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(ids, dtype=torch.bool) if mask is None else mask != 0


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross entropy over valid positions only (label -100 elsewhere)."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def _forward_backward(call, model, ids, mask, labels):
    """(logits, {name: grad of model's parameter}) of one training step of ``call`` (model or its compilation)."""
    model.zero_grad(set_to_none=True)
    logits = call(input_ids=ids, attention_mask=mask).logits
    _loss(logits, labels).backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


def _assert_step_matches(model, compiled, ids, mask, labels, logit_tol=LOGIT_TOL, grad_tol=GRAD_TOL):
    """Logits at every position where eager's are finite (padding positions included; every valid one is) and all
    parameter gradients of the compiled model equal the eager model's."""
    ref_logits, ref_grads = _forward_backward(model, model, ids, mask, labels)
    out_logits, out_grads = _forward_backward(compiled, model, ids, mask, labels)
    finite = torch.isfinite(ref_logits).all(dim=-1)
    assert finite[_valid(mask, ids)].all()
    torch.testing.assert_close(out_logits[finite], ref_logits[finite], **logit_tol)
    assert out_grads.keys() == ref_grads.keys()
    assert any("attn" in name or "attention" in name for name in ref_grads), "the loss reached no attention weight"
    for name, grad in ref_grads.items():
        torch.testing.assert_close(out_grads[name], grad, **grad_tol, msg=lambda m, n=name: f"grad of {n}: {m}")


def _sliding_layers(config) -> list[bool]:
    """Per layer, whether it is a sliding-window layer."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return [kind == "sliding_attention" for kind in layer_types]
    return [getattr(config, "sliding_window", None) is not None] * config.num_hidden_layers


def _check_record(record: GraphRecord, case: str, config, has_mask: bool, seq: int = SEQ) -> None:
    """The report of one compiled graph (first run at length ``seq``) is what its SDPA nodes allow, layer by
    layer."""
    sliding = _sliding_layers(config)
    assert len(record.forms) == len(record.entries) == config.num_hidden_layers == len(sliding)
    for layer, ((mask_node, is_causal), entry, is_sliding) in enumerate(zip(record.forms, record.entries, sliding)):
        where = f"{case} layer {layer} (S={seq}): {entry}"
        assert entry["executor"] == "reference", where
        assert entry["num_heads"] == config.num_attention_heads, where
        assert entry["head_dim"] == EXPECTED_HEAD_DIM.get(case, 16), where
        assert entry["num_kv_heads"] == EXPECTED_KV_HEADS[case], where
        assert mask_node != is_causal, where  # HF passes either a mask or is_causal=True
        if has_mask:  # HF cannot express key padding with is_causal
            assert mask_node, where
        if is_sliding and not mask_node:
            # transformers 5.24 drops the window when every query sees all earlier keys anyway (length <= window,
            # guarded); 5.17 always materialises the sliding mask
            assert seq <= SLIDING_WINDOW, where
        if case == "falcon_alibi":
            assert entry["decision"] == "sdpa", where
            assert entry["reason"] == "fallback_mask" and entry["detail"], where  # ALiBi: a float bias
            assert entry["mask_kind"] is None and entry["window_size"] is None, where
        else:
            assert entry["decision"] == "te" and entry["reason"] == "rewritten", where
            assert entry["mask_kind"] == ("padding_causal" if has_mask else "causal"), where
            # HF's sliding window w lets a query see itself and w - 1 keys before it: TE window (w - 1, 0). A
            # materialised sliding mask must be classified with its window even when it is traced at a length
            # inside the window (5.17 at S=5): the dynamic graph serves longer sequences too.
            windowed = is_sliding and mask_node
            assert entry["window_size"] == ((SLIDING_WINDOW - 1, 0) if windowed else (-1, 0)), where


class CompiledCase:
    """A tiny model of one case in train mode and its te_attn compilation, shared by the mask kinds of the case."""

    def __init__(self, case: str) -> None:
        family, overrides = CASES[case]
        torch._dynamo.reset()
        torch.manual_seed(0)
        self.case = case
        self.model = tiny_model(family, **overrides).train()
        self.config = self.model.config
        self.records: list[GraphRecord] = []
        self.by_mask_presence: dict[bool, GraphRecord] = {}
        self.compiled = torch.compile(self.model, backend=_spy_backend(self.records), fullgraph=True)

    def check_step(self, ids, mask, labels) -> GraphRecord:
        """Compare one training step with eager; returns the record of the graph that ran. Each mask presence
        compiles exactly once: masks of other values (ones, padding, holes) reuse the graph."""
        before = len(self.records)
        _assert_step_matches(self.model, self.compiled, ids, mask, labels)
        new = self.records[before:]
        has_mask = mask is not None
        if has_mask in self.by_mask_presence:
            assert not new, "a mask of other values recompiled the model"
        else:
            assert len(new) == 1, f"{len(new)} graphs for one model call (fullgraph)"
            self.by_mask_presence[has_mask] = new[0]
        return self.by_mask_presence[has_mask]


@pytest.fixture(scope="module", params=list(CASES))
def compiled_case(request):
    case = CompiledCase(request.param)
    yield case
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------- train mode, per family


@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_train_step_matches_eager(compiled_case, mask_kind):
    ids, mask, labels = _batch(mask_kind)
    record = compiled_case.check_step(ids, mask, labels)
    _check_record(record, compiled_case.case, compiled_case.config, has_mask=mask is not None)


def test_every_fallback_is_a_reason_key(compiled_case):
    """Over every family's compiled graphs (with and without an attention_mask), each report entry that stays on
    SDPA carries a key of te_fx.core.reasons.REASONS and a detail: the report speaks the eager counters' terms."""
    for mask_kind in ("none", "right"):
        compiled_case.check_step(*_batch(mask_kind))
    assert set(compiled_case.by_mask_presence) == {False, True}
    for record in compiled_case.by_mask_presence.values():
        assert record.entries, compiled_case.case
        _assert_reasons_are_keys(record.entries)
    if compiled_case.case == "falcon_alibi":  # a float bias: the table's mask reason, not free text
        assert {e["reason"] for e in compiled_case.by_mask_presence[True].entries} == {"fallback_mask"}


# --------------------------------------------------------------------------------------------- dynamic lengths

DYNAMIC_LENGTHS = (16, 20, 24, 9, 5)  # 5 < SLIDING_WINDOW: the whole row inside the window


def _counting_backend(name: str, calls: list):
    """A stock backend that records, per compiled graph, whether it is dynamic."""

    def backend(gm, example_inputs):
        calls.append(_is_dynamic(example_inputs))
        return torch._dynamo.lookup_backend(name)(gm, example_inputs)

    return backend


@pytest.mark.parametrize(
    ("case", "mask_kind"),
    [
        ("qwen2", "none"),
        ("llama_gqa", "left"),
    ],
)
def test_dynamic_lengths_add_no_recompilation(case, mask_kind):
    """Compile once, run several lengths: te_attn compiles exactly as often as the stock aot_eager backend (the
    pass adds no guards), results match eager at every length, and the report of the dynamic graph is the static
    one's (the mask kinds hold at every length)."""
    family, overrides = CASES[case]
    torch.manual_seed(0)
    model = tiny_model(family, **overrides, num_hidden_layers=2).train()  # one sliding, one full layer
    counts = {}
    for name in ("aot_eager", "te_attn"):
        torch._dynamo.reset()
        te_fx.reset_compile_report()
        calls: list[bool] = []
        records: list[GraphRecord] = []
        backend = _spy_backend(records) if name == "te_attn" else _counting_backend(name, calls)
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        first_lengths = []
        for seq in DYNAMIC_LENGTHS:
            ids, mask, labels = _batch(mask_kind, seq=seq, seed=seq)
            before = len(records)
            _assert_step_matches(model, compiled, ids, mask, labels)
            first_lengths += [seq] * (len(records) - before)
        if name == "te_attn":
            calls = [record.dynamic for record in records]
            assert len(te_fx.compile_report()) == len(records) * model.config.num_hidden_layers
            for record, seq in zip(records, first_lengths):
                _check_record(record, case, model.config, has_mask=mask_kind != "none", seq=seq)
        counts[name] = calls
    torch._dynamo.reset()
    assert counts["te_attn"] == counts["aot_eager"]
    assert counts["te_attn"][-1], "no dynamic graph was compiled: the test checks nothing dynamic"


def test_real_size_window_traced_inside_it_holds_for_longer_sequences():
    """A 4096-token window, first compiled at lengths inside it (a dynamic graph from the third length on), then run
    past it: the window must hold there (read from the subgraph's constants, or a guard recompiles), never plain
    causal attention."""
    torch.manual_seed(0)
    model = tiny_model("mistral", sliding_window=4096, max_position_embeddings=8192, num_hidden_layers=1)
    torch._dynamo.reset()
    te_fx.reset_compile_report()
    compiled = torch.compile(model, backend="te_attn", options=OPTIONS)
    for seq in (16, 20, 24, 4200):
        ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(seq))
        with torch.no_grad():
            ref, out = model(ids, use_cache=False).logits, compiled(ids, use_cache=False).logits
        torch.testing.assert_close(out, ref, **LOGIT_TOL, msg=f"length {seq}")
    assert ("te", (4095, 0)) in {(entry["decision"], entry["window_size"]) for entry in te_fx.compile_report()}
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------- inference


@pytest.mark.parametrize("case", ["llama_gqa", "gemma3", "phi3"])
def test_eval_mode_no_grad_inference(case):
    family, overrides = CASES[case]
    torch.manual_seed(0)
    model = tiny_model(family, **overrides)
    assert not model.training
    torch._dynamo.reset()
    records: list[GraphRecord] = []
    compiled = torch.compile(model, backend=_spy_backend(records), fullgraph=True)
    for mask_kind in ("none", "right"):
        ids, mask, _ = _batch(mask_kind)
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask).logits
            out = compiled(input_ids=ids, attention_mask=mask).logits
        valid = _valid(mask, ids)
        torch.testing.assert_close(out[valid], ref[valid], **LOGIT_TOL)
        assert not out.requires_grad
        _check_record(records[-1], case, model.config, has_mask=mask is not None)
    assert len(records) == 2
    torch._dynamo.reset()


def test_eval_mode_with_grad():
    """model.eval() but gradients wanted (e.g. input attribution): the op still runs its backward."""
    torch.manual_seed(0)
    model = tiny_model("mistral")
    torch._dynamo.reset()
    records: list[GraphRecord] = []
    compiled = torch.compile(model, backend=_spy_backend(records), fullgraph=True)
    ids, mask, labels = _batch("none")
    _assert_step_matches(model, compiled, ids, mask, labels)
    assert len(records) == 1
    _check_record(records[0], "mistral", model.config, has_mask=False)
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------- inner inductor


def test_inner_inductor_train_step():
    torch.manual_seed(0)
    model = tiny_model("llama_gqa", num_hidden_layers=1).train()
    torch._dynamo.reset()
    records: list[GraphRecord] = []
    compiled = torch.compile(
        model, backend=_spy_backend(records, {"executor": "reference", "inner": "inductor"}), fullgraph=True
    )
    ids, mask, labels = _batch("left")
    _assert_step_matches(model, compiled, ids, mask, labels)
    assert len(records) == 1
    _check_record(records[0], "llama_gqa", model.config, has_mask=True)
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------- KV cache


def _cached_steps(call, config, ids, chunks):
    """Logits of successive calls over ``chunks`` (lengths) of ``ids`` sharing one DynamicCache."""
    cache = DynamicCache(config=config)
    logits, start = [], 0
    with torch.no_grad():
        for length in chunks:
            piece = ids[:, start : start + length]
            logits.append(call(input_ids=piece, past_key_values=cache, use_cache=True).logits)
            start += length
    return logits


def test_token_by_token_decode_with_cache():
    """Prefill, then one token at a time: q_len 1 against all cached keys is "all visible"."""
    torch.manual_seed(0)
    model = tiny_model("llama_gqa", num_hidden_layers=1)
    torch._dynamo.reset()
    records: list[GraphRecord] = []
    compiled = torch.compile(model, backend=_spy_backend(records), fullgraph=True)
    ids = _input_ids(seq=13)
    chunks = [10, 1, 1, 1]
    refs = _cached_steps(model, model.config, ids, chunks)
    for out, ref in zip(_cached_steps(compiled, model.config, ids, chunks), refs):
        torch.testing.assert_close(out, ref, **LOGIT_TOL)
    decisions = [(e["decision"], e["mask_kind"], e["window_size"]) for r in records for e in r.entries]
    assert decisions[0] == ("te", "causal", (-1, 0))  # the prefill
    assert len(decisions) >= 2 and set(decisions[1:]) == {("te", "no_mask", (-1, -1))}  # the decode steps
    torch._dynamo.reset()


@pytest.mark.parametrize("mask", ["none", "ones", "left"])
def test_chunked_prefill_with_cache(mask):
    """A chunk of 3 tokens after 8 cached ones (q_len < kv_len): HF's causal mask is aligned bottom-right (TE's
    top-left "causal" would be off by ~6), with the attention_mask's key padding where one is passed."""
    torch.manual_seed(0)
    model = tiny_model("llama", num_hidden_layers=1)
    torch._dynamo.reset()
    records: list[GraphRecord] = []
    compiled = torch.compile(model, backend=_spy_backend(records), fullgraph=True)
    ids = _input_ids(batch=2, seq=11)
    chunks = [8, 3]
    padding = _attention_mask("left", batch=2, seq=11) if mask == "left" else torch.ones(2, 11, dtype=torch.long)

    def steps(call):
        cache = DynamicCache(config=model.config)
        logits = []
        with torch.no_grad():
            for start, length in zip((0, 8), chunks):
                attention_mask = None if mask == "none" else padding[:, : start + length]
                piece = ids[:, start : start + length]
                logits.append(call(input_ids=piece, attention_mask=attention_mask, past_key_values=cache).logits)
        return logits

    for out, ref in zip(steps(compiled), steps(model)):
        torch.testing.assert_close(out, ref, **LOGIT_TOL)
    torch._dynamo.reset()
    prefill, chunk = (record.entries[0] for record in records)
    padded = mask != "none"
    assert (prefill["decision"], prefill["mask_kind"]) == ("te", "padding_causal" if padded else "causal")
    expected = ("te", "padding_causal_bottom_right" if padded else "causal_bottom_right", (-1, 0))
    assert (chunk["decision"], chunk["mask_kind"], chunk["window_size"]) == expected


@pytest.mark.parametrize("family", ["llama_gqa", "qwen2", "mistral", "gemma3"])
def test_greedy_generate_of_a_padded_batch_decodes_on_te(family):
    """generate() of a left-padded batch under te_attn gives the plain model's tokens and scores; every decode step
    of every layer runs te_fx's op with the key padding (q_len 1: the keys its mask's row shows), a sliding layer's
    rolling cache too (its mask is indexed by a position counter of the cache's own)."""
    torch.manual_seed(0)
    model = tiny_model(family).eval()
    ids = _input_ids(batch=BATCH, seq=12)
    mask = _attention_mask("left", seq=12)
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0,
                  output_scores=True, return_dict_in_generate=True)  # fmt: skip
    with torch.no_grad():
        ref = model.generate(ids, **kwargs)
        torch._dynamo.reset()
        records: list[GraphRecord] = []
        model.forward = torch.compile(model.forward, backend=_spy_backend(records))
        out = model.generate(ids, **kwargs)
    torch._dynamo.reset()
    assert torch.equal(out.sequences, ref.sequences)
    for step_out, step_ref in zip(out.scores, ref.scores, strict=True):
        torch.testing.assert_close(step_out, step_ref, **LOGIT_TOL)
    decode = [record.entries for record in records[1:]]
    assert decode, "no decode graph was compiled"
    for entries in decode:
        assert len(entries) == model.config.num_hidden_layers
        assert all((entry["decision"], entry["mask_kind"]) == ("te", "padding") for entry in entries), entries


def test_key_padding_with_a_kv_cache_in_training_stays_on_sdpa():
    """A forward with autograd on against a KV cache with key padding: te_fx's op has no exact training route for
    a KV cache's queries, so the node stays on SDPA, counted, and logits and gradients equal the plain model's."""
    torch.manual_seed(0)
    model = tiny_model("llama", num_hidden_layers=1)
    plain = copy.deepcopy(model)
    torch._dynamo.reset()
    records: list[GraphRecord] = []
    compiled = torch.compile(model, backend=_spy_backend(records), fullgraph=True)
    ids = _input_ids(batch=2, seq=11)
    mask = _attention_mask("left", batch=2, seq=11)
    outputs = []
    for call, owner in ((compiled, model), (plain, plain)):
        cache = DynamicCache(config=owner.config)
        with torch.no_grad():
            call(input_ids=ids[:, :8], attention_mask=mask[:, :8], past_key_values=cache)
        logits = call(input_ids=ids[:, 8:], attention_mask=mask, past_key_values=cache).logits
        logits.sum().backward()
        outputs.append((logits, owner.model.layers[0].self_attn.q_proj.weight.grad))
    torch._dynamo.reset()
    torch.testing.assert_close(outputs[0][0], outputs[1][0], **LOGIT_TOL)
    torch.testing.assert_close(outputs[0][1], outputs[1][1], **LOGIT_TOL)
    chunk = records[-1].entries[0]
    assert chunk["decision"] == "sdpa" and chunk["reason"] == "fallback_mask" and "training" in chunk["detail"]


def test_a_batch_size_that_changes_between_steps_keeps_te():
    """A new batch size recompiles with dynamic sizes, where Dynamo gives input_ids and attention_mask a batch
    symbol each: the padding mask is still converted (te_fx's op checks at run time that the two agree), the next
    batch size reuses that graph, and logits equal the plain model's."""
    torch.manual_seed(0)
    model = tiny_model("llama_gqa").train()
    plain = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="te_attn", options=OPTIONS)
    for batch in (2, 3, 4):
        te_fx.reset_compile_report()
        ids = torch.randint(3, model.config.vocab_size, (batch, SEQ))
        mask = torch.ones_like(ids)
        mask[-1, SEQ - 4 :] = 0
        out = compiled(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(out, plain(input_ids=ids, attention_mask=mask).logits, **LOGIT_TOL)
        decisions = [entry["decision"] for entry in te_fx.compile_report()]
        assert decisions == ([] if batch == 4 else ["te"] * model.config.num_hidden_layers), (batch, decisions)
    torch._dynamo.reset()


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_keeps_te(reentrant):
    """``gradient_checkpointing_enable()``: the SDPA nodes sit in checkpointed regions' bodies; the pass rewrites
    them there (the key padding input joins the region's operands), and logits and gradients equal the plain
    checkpointed model's."""
    torch.manual_seed(0)
    model = tiny_model("llama_gqa").train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    plain = copy.deepcopy(model)
    torch._dynamo.reset()
    te_fx.reset_compile_report()
    ids, mask, _ = _batch("left")
    weight = torch.randn(*ids.shape, model.config.vocab_size) / ids.numel()
    # transformers >= 5.25 sets a hub-kernels variable inside each layer's forward: Dynamo refuses to trace the
    # checkpointed layers (stock torch.compile too) unless that side effect is not replayed in the backward
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        out = torch.compile(model, backend="te_attn", options=OPTIONS)(input_ids=ids, attention_mask=mask,
                                                                       use_cache=False)  # fmt: skip
    ref = plain(input_ids=ids, attention_mask=mask, use_cache=False)
    (out.logits * weight).sum().backward()
    (ref.logits * weight).sum().backward()
    report = te_fx.compile_report()
    layers = model.config.num_hidden_layers
    assert [(entry["decision"], entry["mask_kind"]) for entry in report] == [("te", "padding_causal")] * layers
    torch.testing.assert_close(out.logits, ref.logits, **LOGIT_TOL)
    for (name, param), ref_param in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(param.grad, ref_param.grad, **GRAD_TOL, msg=lambda m, n=name: f"grad of {n}: {m}")
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------- packed rows

PACKED = [
    [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4], list(range(16))],
    [[0, 1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3], [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]],
]


@pytest.mark.parametrize("case", ["llama_gqa", "mistral", "qwen2", "gemma3"])
def test_packed_rows_from_position_ids_run_documents(case):
    """Packed rows (position_ids restarting, no attention_mask, use_cache=False): HF's packed-documents mask
    subgraph becomes te_fx's thd plan with each layer's window; one graph serves other packings, each step equal
    to eager's (logits and every gradient)."""
    family, overrides = CASES[case]
    torch.manual_seed(0)
    model = tiny_model(family, **overrides).train()
    torch._dynamo.reset()
    te_fx.reset_compile_report()
    records: list[GraphRecord] = []
    compiled = torch.compile(model, backend=_spy_backend(records), fullgraph=True)
    ids = torch.randint(3, model.config.vocab_size, (BATCH, SEQ))
    for packing in PACKED:
        position_ids = torch.tensor(packing)
        packed = functools.partial(model, position_ids=position_ids, use_cache=False)
        ref_logits, ref_grads = _forward_backward(packed, model, ids, None, ids)
        packed = functools.partial(compiled, position_ids=position_ids, use_cache=False)
        logits, grads = _forward_backward(packed, model, ids, None, ids)
        torch.testing.assert_close(logits, ref_logits, **LOGIT_TOL)
        assert grads.keys() == ref_grads.keys()
        for name, grad in ref_grads.items():
            torch.testing.assert_close(grads[name], grad, **GRAD_TOL, msg=lambda m, n=name: f"grad of {n}: {m}")
    assert len(records) == 1
    windows = [(SLIDING_WINDOW - 1, 0) if sliding else (-1, 0) for sliding in _sliding_layers(model.config)]
    assert [(e["decision"], e["mask_kind"], e["window_size"]) for e in records[0].entries] == [
        ("te", "thd", window) for window in windows
    ]
    with torch.profiler.profile() as prof:
        _forward_backward(packed, model, ids, None, ids)
    calls = collections.Counter(e.name for e in prof.events() if e.name.startswith("te_fx::"))
    layers = model.config.num_hidden_layers  # the documents are read once per step (one host copy), not per layer
    assert calls == {"te_fx::packed_documents": 1, "te_fx::packed_attention_fwd": layers,
                     "te_fx::packed_attention_bwd": layers}, calls  # fmt: skip


def test_positions_read_by_another_rule_stay_on_sdpa():
    """A mask whose documents start only where a position is 0 (not HF's rule: a jump also starts one) is not
    taken for packed documents."""

    def attend(q, k, v, position_ids):
        document = (position_ids == 0).cumsum(-1)
        i = torch.arange(q.shape[2])
        mask = (i[None, :] <= i[:, None])[None] & (document[:, :, None] == document[:, None, :])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 8, 16) for _ in range(3))
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7]])
    torch._dynamo.reset()
    te_fx.reset_compile_report()
    out = torch.compile(attend, backend="te_attn", options=OPTIONS, fullgraph=True)(q, k, v, position_ids)
    torch.testing.assert_close(out, attend(q, k, v, position_ids))
    (entry,) = te_fx.compile_report()
    assert entry["decision"] == "sdpa" and entry["reason"] == "fallback_mask", entry
