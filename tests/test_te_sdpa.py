"""The SDPA replacement (``_make_te_sdpa``) against plain SDPA, the per-thread routing, and injection edge cases.

Every call is made the way HF makes it (``x.view(B, S, H, D).transpose(1, 2)`` views, ``repeat_kv``-ed or
``enable_gqa`` K/V, transformers' own mask builders' conventions, the packed-GQA decode layout) and compared with
the original SDPA in float32 on CPU. The attention module is the reference executor wrapped in a recorder, so the
tests also see exactly which plan (mask type, window, key padding, documents) an executor would receive. Which plan
must run is decided by brute force in ``oracles`` (enumerating windows, keep vectors and document cuts), not by
te_fx's matcher.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import textwrap
import threading
import time
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import event, given, settings
from hypothesis import strategies as st
from oracles import (
    attend_of,
    cache_padding_representable,
    hf_causal,
    plan_pattern,
    representable,
    uniform_patterns,
)
from torch.overrides import _get_current_function_mode_stack
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import repeat_kv

import te_fx
from te_fx import te_attention
from te_fx.core.plan import NO_MASK, AttentionPlan
from te_fx.executors import ExecutorModule
from te_fx.executors.reference import ReferenceDotProductAttention
from te_fx.te_attention import _make_te_sdpa

try:  # the packed-GQA decode layout of transformers >= 5.23
    from transformers.integrations.sdpa_attention import pack_gqa
except ImportError:
    pack_gqa = None
needs_pack_gqa = pytest.mark.skipif(pack_gqa is None, reason="transformers < 5.23 has no packed-GQA decode layout")

ORIGINAL_SDPA = F.scaled_dot_product_attention  # te_fx never replaces it
# the SDPA property tests are cheap (a few ms an example): 4x the profile's examples
MORE_EXAMPLES = settings(max_examples=4 * settings.default.max_examples)
ZERO_STATS = dict.fromkeys(te_fx.get_te_attention_stats(), 0)


@pytest.fixture(autouse=True)
def _sdpa_is_untouched():
    assert F.scaled_dot_product_attention is ORIGINAL_SDPA
    assert not _get_current_function_mode_stack()
    yield
    assert F.scaled_dot_product_attention is ORIGINAL_SDPA
    assert not _get_current_function_mode_stack(), "a routing mode outlived its forward"


def stats_delta(**expected: int) -> dict[str, int]:
    return {**ZERO_STATS, **expected}


class RecordingTE(ReferenceDotProductAttention):
    """The reference executor, recording the plans it runs (a stand-in for te_fx's TE module)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[dict] = []
        self.forward_calls = 0

    def run(self, q, k, v, plan):
        contiguous = all(t.is_contiguous() for t in (q, k, v))
        self.calls.append(dict(q=q, k=k, v=v, plan=plan, contiguous=contiguous))
        return super().run(q, k, v, plan)

    def forward(self, *args, **kwargs):
        self.forward_calls += 1
        return super().forward(*args, **kwargs)


def make_sdpa(heads, kv_heads, head_dim, window_left=-1, softmax_scale=None, dropout=0.0, training=False):
    module = RecordingTE(
        heads, head_dim, kv_heads, attention_dropout=dropout, window_size=(window_left, 0), softmax_scale=softmax_scale
    ).train(training)
    fn = _make_te_sdpa(module, heads, kv_heads, ORIGINAL_SDPA, (window_left, 0), softmax_scale)
    return fn, module


def hf_view(x: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's projection output (B, S, H * D) as the (B, H, S, D) view it hands to SDPA."""
    batch, seq, _ = x.shape
    return x.view(batch, seq, heads, -1).transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------------
# Oracle for "TE must run" (an independent brute-force pattern check)
# ----------------------------------------------------------------------------------------------------------------


def is_canonical(mask: torch.Tensor, q_len: int, kv_len: int) -> bool:
    """One TE mask type (and any window: the mask's, whatever the layer's config says) reproduces the mask."""
    attend = attend_of(mask)
    return any(bool((attend == c).all()) for c in uniform_patterns(q_len, kv_len))


def to_mask(pattern: torch.Tensor, encoding: str) -> torch.Tensor:
    if encoding == "bool":
        return pattern
    fill = torch.finfo(torch.float32).min if encoding == "min" else -float("inf")
    return torch.zeros(pattern.shape).masked_fill(~pattern, fill)


def check_plan_form(plan: AttentionPlan, batch: int, q_len: int, kv_len: int) -> None:
    """A plan's fields are what the executors take."""
    assert plan.mask_type in ("no_mask", "causal", "causal_bottom_right")
    assert plan.key_padding is None or plan.cu_seqlens is None
    if plan.mask_type == "no_mask":
        assert plan.window_size == (-1, -1) and plan.key_padding is None and plan.cu_seqlens is None
    else:
        assert plan.window_size[1] == 0 and plan.window_size[0] >= -1
    if plan.cu_seqlens is not None:
        assert plan.mask_type == "causal" and q_len == kv_len > 1
    if plan.key_padding is not None:  # self-attention, or a KV cache's queries
        assert plan.key_padding.shape == (batch, kv_len) and plan.key_padding.dtype == torch.bool
        square = plan.mask_type == "causal" and q_len == kv_len > 1
        assert square or (plan.mask_type == "causal_bottom_right" and q_len < kv_len)
        assert plan.kind == ("padding_causal" if square else "padding_causal_bottom_right")
    if plan.cu_seqlens is not None:
        bounds = plan.cu_seqlens
        assert bounds.dim() == 1 and bounds.dtype == torch.int32 and plan.kind == "thd"
        assert bounds[0] == 0 and bounds[-1] == batch * q_len and bool((bounds.diff() > 0).all())
        assert set(range(0, batch * q_len + 1, q_len)) <= set(bounds.tolist()), "a document crosses a row"


# ----------------------------------------------------------------------------------------------------------------
# Property test: the replacement equals SDPA, and runs TE exactly when it should
# ----------------------------------------------------------------------------------------------------------------

MASK_KINDS = ("none", "is_causal", "causal", "sliding", "all", "pad_left", "pad_right", "pad_both", "pad_inner",
              "packed", "flip")  # fmt: skip


@st.composite
def sdpa_cases(draw, mask_kind: str):
    batch = draw(st.integers(1, 2))
    kv_heads = draw(st.integers(1, 2))
    n_rep = draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([4, 8]))
    kv_len = draw(st.integers(1, 9))
    q_len = draw(st.one_of(st.just(kv_len), st.just(kv_len), st.just(1), st.integers(1, kv_len), st.integers(1, 9)))
    window_left = draw(st.one_of(st.just(-1), st.integers(0, 6)))
    kv_mode = draw(st.sampled_from(["repeat_kv", "enable_gqa"])) if n_rep > 1 else "plain"
    encoding = draw(st.sampled_from(["bool", "min", "inf"]))
    broadcast = draw(st.sampled_from(["full", "expand", "batch_one"]))
    module_scale = draw(st.sampled_from([None, head_dim**-0.5, 0.3]))
    call_scale = module_scale if module_scale is not None else draw(st.sampled_from([None, head_dim**-0.5]))
    pads = [draw(st.integers(0, kv_len - 1)) for _ in range(batch)]
    pads_right = [draw(st.integers(0, kv_len - 1 - n)) for n in pads]
    sliding_left = window_left if window_left >= 0 and draw(st.booleans()) else draw(st.integers(0, 6))
    # padded and packed masks: full causal, or windowed (the layer's window or another one)
    base_window = draw(st.sampled_from([-1, -1, sliding_left]))
    cuts = [sorted(draw(st.sets(st.integers(1, max(1, kv_len - 1)), max_size=3))) for _ in range(batch)]
    flip = tuple(draw(st.integers(0, n - 1)) for n in (batch, q_len, kv_len))
    flip_base = draw(st.sampled_from(["causal", "pad", "packed"]))
    seed = draw(st.integers(0, 2**16))
    return SimpleNamespace(**{k: v for k, v in locals().items() if k != "draw"})


def build_pattern(case) -> torch.Tensor | None:
    """Bool (B, 1, q_len, kv_len) pattern of the case's mask (None: no mask)."""
    q_len, kv_len = case.q_len, case.kv_len
    kind = case.mask_kind
    if kind in ("none", "is_causal"):
        return None
    if kind == "flip":
        kind = {"causal": "causal", "pad": "pad_left", "packed": "packed"}[case.flip_base]
    if kind == "all":
        base = torch.ones(q_len, kv_len, dtype=torch.bool)
    elif kind == "sliding":
        base = hf_causal(q_len, kv_len, case.sliding_left)
    elif kind == "causal":
        base = hf_causal(q_len, kv_len)
    else:
        base = hf_causal(q_len, kv_len, case.base_window)
    full = base.expand(case.batch, 1, q_len, kv_len).clone()
    for b, (n, m) in enumerate(zip(case.pads, case.pads_right)):
        if kind == "pad_left":
            full[b, :, :, :n] = False
        elif kind == "pad_right":
            full[b, :, :, kv_len - n :] = False
        elif kind == "pad_both":
            full[b, :, :, :n] = False
            full[b, :, :, kv_len - m :] = False
        elif kind == "pad_inner":  # hide n keys in the middle of the row
            middle = (kv_len - n) // 2
            full[b, :, :, middle : middle + n] = False
        elif kind == "packed":  # documents over the keys; queries sit at the last q_len key positions
            doc = torch.zeros(kv_len, dtype=torch.long)
            for cut in case.cuts[b]:
                doc[cut:] += 1
            positions = (torch.arange(q_len) + kv_len - q_len).clamp(min=0)  # rows before key 0 see nothing
            full[b, 0] &= doc[positions, None] == doc[None, :]
    if case.mask_kind == "flip":
        b, i, j = case.flip
        full[b, 0, i, j] = ~full[b, 0, i, j]
    return full


def build_mask(case) -> torch.Tensor | None:
    full = build_pattern(case)
    if full is None:
        return None
    uniform = bool((full == full[:1]).all())
    mask = to_mask(full, case.encoding)
    if uniform and case.broadcast == "expand":
        return mask[:1].expand_as(mask)
    if uniform and case.broadcast == "batch_one":
        return mask[:1].clone()
    return mask


def make_inputs(case, requires_grad=False):
    gen = torch.Generator().manual_seed(case.seed)
    heads = case.kv_heads * case.n_rep
    xq = torch.randn(case.batch, case.q_len, heads * case.head_dim, generator=gen)
    xk = torch.randn(case.batch, case.kv_len, case.kv_heads * case.head_dim, generator=gen)
    xv = torch.randn(case.batch, case.kv_len, case.kv_heads * case.head_dim, generator=gen)
    return tuple(t.requires_grad_(requires_grad) for t in (xq, xk, xv))


def call_args(case, xq, xk, xv):
    """(q, k, v, kwargs) as HF's sdpa_attention_forward passes them."""
    heads = case.kv_heads * case.n_rep
    q, k, v = hf_view(xq, heads), hf_view(xk, case.kv_heads), hf_view(xv, case.kv_heads)
    kwargs = dict(attn_mask=build_mask(case), is_causal=case.mask_kind == "is_causal", scale=case.call_scale)
    if case.kv_mode == "repeat_kv":
        k, v = repeat_kv(k, case.n_rep), repeat_kv(v, case.n_rep)
    elif case.kv_mode == "enable_gqa":
        kwargs["enable_gqa"] = True
    return q, k, v, kwargs


def expected_runs(case) -> set[str]:
    """How TE may run the call, decided by brute force: {"no_mask"} / {"causal"} for the mask-less calls, a subset
    of {"uniform", "padding", "documents"} for a mask (see ``oracles.representable``); empty: it must fall back."""
    q_len, kv_len = case.q_len, case.kv_len
    if case.mask_kind == "none":
        return {"no_mask"}
    if case.mask_kind == "is_causal":
        return {"causal"} if q_len <= kv_len else set()
    pattern = build_pattern(case)
    if case.encoding == "min" and not bool(pattern.any(-1).all()):
        return set()  # a query row of finfo.min penalties only: SDPA averages V there, every plan gives zero
    if q_len == kv_len:
        return representable(pattern[:, 0])
    if is_canonical(pattern, q_len, kv_len):
        return {"uniform"}
    heads_agree = bool((pattern == pattern[:, :1]).all())
    return {"padding"} if q_len < kv_len and heads_agree and cache_padding_representable(pattern[:, 0]) else set()


@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@given(data=st.data())
def test_replacement_equals_sdpa(mask_kind, data):
    case = data.draw(sdpa_cases(mask_kind))
    te_fx.reset_te_attention_stats()  # per example: the autouse fixture resets per test
    heads = case.kv_heads * case.n_rep
    fn, module = make_sdpa(heads, case.kv_heads, case.head_dim, case.window_left, case.module_scale)
    xq, xk, xv = make_inputs(case)
    q, k, v, kwargs = call_args(case, xq, xk, xv)
    out = fn(q, k, v, **kwargs)
    expected = ORIGINAL_SDPA(q, k, v, **kwargs)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, equal_nan=True)

    runs = expected_runs(case)
    event(f"{case.mask_kind}: {'/'.join(sorted(runs)) or 'fallback'}")
    if not runs:
        assert te_fx.get_te_attention_stats() == stats_delta(fallback_mask=1)
        assert module.calls == []
        return
    assert te_fx.get_te_attention_stats() == stats_delta(te_hits=1)
    assert module.forward_calls == 0  # te_fx's own modules run plans, not TE's forward contract
    (call,) = module.calls
    kv_seen = case.q_len if case.mask_kind == "is_causal" and case.q_len < case.kv_len else case.kv_len
    # contiguous BSHD, KV heads deduplicated (TE does GQA itself), values untouched
    assert call["contiguous"]
    assert call["q"].shape == (case.batch, case.q_len, heads, case.head_dim)
    assert call["k"].shape == call["v"].shape == (case.batch, kv_seen, case.kv_heads, case.head_dim)
    assert torch.equal(call["q"], xq.view(case.batch, case.q_len, heads, case.head_dim))
    kv_shape = (case.batch, case.kv_len, case.kv_heads, case.head_dim)
    assert torch.equal(call["k"], xk.view(kv_shape)[:, :kv_seen])
    assert torch.equal(call["v"], xv.view(kv_shape)[:, :kv_seen])
    # the plan it got reproduces the mask exactly
    plan = call["plan"]
    check_plan_form(plan, case.batch, case.q_len, kv_seen)
    if case.mask_kind == "none":
        assert plan == NO_MASK
        return
    if case.mask_kind == "is_causal":
        assert plan == AttentionPlan("causal", (-1, 0))
        return
    pattern = build_pattern(case)[:, 0]
    assert torch.equal(plan_pattern(plan, case.batch, case.q_len, case.kv_len), pattern)
    if plan.key_padding is None and plan.cu_seqlens is None:
        assert "uniform" in runs
        assert plan.mask_type == "no_mask" or (plan.mask_type == "causal") == (case.q_len == case.kv_len)
    else:
        assert "uniform" not in runs, f"{plan.kind} for a pattern one mask type reproduces"
        assert ("padding" if plan.key_padding is not None else "documents") in runs


@pytest.mark.parametrize("window", [-1, 2])
def test_fully_masked_query_rows_of_a_finfo_min_mask(window):
    """An additive mask that blocks a whole query row with finfo.min (as HF's eager masks and many user masks do)
    leaves SDPA a softmax over equal penalties: the row's output is the mean of V, which no plan reproduces (TE and
    the reference executor give zero for a row that sees no key), so the call falls back. Bool and -inf masks agree
    (SDPA gives zero there too) and run TE."""
    q, k, v = _simple_inputs(batch=2, seq=5)
    pattern = hf_causal(5, 5, window).expand(2, 1, 5, 5).clone()
    pattern[1, ..., :2] = False  # left padding: row 1's queries 0 and 1 see no key
    finfo_min = torch.zeros(pattern.shape).masked_fill(~pattern, torch.finfo(torch.float32).min)
    mixed = finfo_min.clone()
    mixed[1, 0, 0, 1:] = -float("inf")  # one finfo.min penalty left in a row of -inf: SDPA gives that key's value
    fn, module = make_sdpa(4, 2, 8)
    for mask in (finfo_min, mixed):
        te_fx.reset_te_attention_stats()
        torch.testing.assert_close(fn(q, k, v, attn_mask=mask), ORIGINAL_SDPA(q, k, v, attn_mask=mask))
        assert te_fx.get_te_attention_stats() == stats_delta(fallback_mask=1)
    assert module.calls == []
    for mask in (pattern, torch.zeros(pattern.shape).masked_fill(~pattern, -float("inf"))):  # these agree: TE runs
        te_fx.reset_te_attention_stats()
        expected = ORIGINAL_SDPA(q, k, v, attn_mask=mask)
        assert bool((expected[1, :, :2] == 0).all())
        torch.testing.assert_close(fn(q, k, v, attn_mask=mask), expected)
        assert te_fx.get_te_attention_stats() == stats_delta(te_hits=1)
        assert module.calls[-1]["plan"].kind == "padding_causal"


GRAD_CASES = {
    "is_causal_repeat_kv": dict(mask_kind="is_causal", kv_mode="repeat_kv", n_rep=2, q_len=6, kv_len=6),
    "is_causal_short_query": dict(mask_kind="is_causal", kv_mode="enable_gqa", n_rep=2, q_len=3, kv_len=6),
    "causal_bool_gqa": dict(mask_kind="causal", kv_mode="enable_gqa", n_rep=3, q_len=5, kv_len=5),
    "bottom_right_float": dict(mask_kind="causal", kv_mode="repeat_kv", n_rep=2, q_len=3, kv_len=7, encoding="min"),
    "sliding_float_inf": dict(mask_kind="sliding", kv_mode="repeat_kv", n_rep=2, q_len=7, kv_len=7, encoding="inf"),
    "decode_all_visible": dict(mask_kind="all", kv_mode="repeat_kv", n_rep=2, q_len=1, kv_len=7),
    "no_mask_mha": dict(mask_kind="none", kv_mode="plain", n_rep=1, q_len=4, kv_len=4),
    # per-row plans: key padding (full causal and the layer's window) and packed documents
    "pad_left_gqa": dict(mask_kind="pad_left", kv_mode="repeat_kv", n_rep=2, q_len=7, kv_len=7, pads=[0, 3]),
    "pad_right_inf": dict(
        mask_kind="pad_right", kv_mode="enable_gqa", n_rep=2, q_len=7, kv_len=7, pads=[2, 0], encoding="inf"
    ),
    "pad_both_windowed": dict(
        mask_kind="pad_both",
        kv_mode="repeat_kv",
        n_rep=2,
        q_len=8,
        kv_len=8,
        pads=[1, 2],
        pads_right=[2, 0],
        base_window=2,
    ),
    "packed_documents": dict(mask_kind="packed", kv_mode="enable_gqa", n_rep=2, q_len=8, kv_len=8, cuts=[[3, 5], [4]]),
    "packed_windowed": dict(
        mask_kind="packed", kv_mode="plain", n_rep=1, q_len=8, kv_len=8, cuts=[[5], [1, 2]], base_window=2
    ),
}


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_replacement_gradients_equal_sdpa(name):
    case = SimpleNamespace(
        batch=2, kv_heads=2, head_dim=8, window_left=2, encoding="bool", broadcast="expand", module_scale=None,
        call_scale=None, sliding_left=2, pads=[0, 0], pads_right=[0, 0], base_window=-1, cuts=[[], []],
        flip=(0, 0, 0), seed=11,
    )  # fmt: skip
    vars(case).update(GRAD_CASES[name])
    fn, module = make_sdpa(case.kv_heads * case.n_rep, case.kv_heads, case.head_dim, case.window_left)
    grad_out = None
    grads = []
    for sdpa in (fn, ORIGINAL_SDPA):
        inputs = make_inputs(case, requires_grad=True)
        q, k, v, kwargs = call_args(case, *inputs)
        out = sdpa(q, k, v, **kwargs)
        grad_out = torch.randn_like(out) if grad_out is None else grad_out
        out.backward(grad_out)
        grads.append([t.grad for t in inputs])
    assert te_fx.get_te_attention_stats() == stats_delta(te_hits=1)
    (call,) = module.calls
    kind = case.mask_kind
    expected_kind = {"pad_left": "padding_causal", "pad_right": "padding_causal", "pad_both": "padding_causal",
                     "packed": "thd"}.get(kind)  # fmt: skip
    if expected_kind:
        assert call["plan"].kind == expected_kind
        assert call["plan"].window_size == (case.base_window, 0)
    for got, want, which in zip(*grads, "qkv"):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"d{which}")


# ----------------------------------------------------------------------------------------------------------------
# Packed-GQA decode (transformers >= 5.23: query (B, Hkv, n_rep, D), mask (B, 1, 1, KV))
# ----------------------------------------------------------------------------------------------------------------


@st.composite
def packed_cases(draw):
    return SimpleNamespace(
        batch=draw(st.integers(1, 2)), kv_heads=draw(st.integers(1, 3)), n_rep=draw(st.integers(2, 4)),
        head_dim=draw(st.sampled_from([4, 8])), kv_len=draw(st.integers(1, 9)),
        window_left=draw(st.one_of(st.just(-1), st.integers(0, 6))),
        mask=draw(st.sampled_from(["all", "sliding", "pad"])), encoding=draw(st.sampled_from(["bool", "min", "inf"])),
        pad=draw(st.integers(1, 8)), seed=draw(st.integers(0, 99)),
    )  # fmt: skip


def packed_call(case):
    gen = torch.Generator().manual_seed(case.seed)
    heads = case.kv_heads * case.n_rep
    xq = torch.randn(case.batch, 1, heads * case.head_dim, generator=gen)
    xk = torch.randn(case.batch, case.kv_len, case.kv_heads * case.head_dim, generator=gen)
    xv = torch.randn(case.batch, case.kv_len, case.kv_heads * case.head_dim, generator=gen)
    if case.mask == "sliding":
        pattern = hf_causal(1, case.kv_len, max(case.window_left, 0)).expand(case.batch, 1, 1, case.kv_len)
    else:
        pattern = torch.ones(case.batch, 1, 1, case.kv_len, dtype=torch.bool)
        if case.mask == "pad":
            pattern = pattern.clone()
            pattern[-1, ..., : min(case.pad, case.kv_len - 1) or 0] = False
    mask = pack_gqa(to_mask(pattern, case.encoding), case.n_rep)
    query = pack_gqa(hf_view(xq, heads), case.n_rep)
    assert query.shape == (case.batch, case.kv_heads, case.n_rep, case.head_dim)
    return xq, xk, xv, query, hf_view(xk, case.kv_heads), hf_view(xv, case.kv_heads), mask


@needs_pack_gqa
@given(packed_cases())
@MORE_EXAMPLES
def test_packed_gqa_decode_equals_sdpa(case):
    te_fx.reset_te_attention_stats()
    fn, module = make_sdpa(case.kv_heads * case.n_rep, case.kv_heads, case.head_dim, case.window_left)
    xq, xk, xv, query, key, value, mask = packed_call(case)
    out = fn(query, key, value, attn_mask=mask)
    torch.testing.assert_close(out, ORIGINAL_SDPA(query, key, value, attn_mask=mask), rtol=1e-5, atol=1e-5)
    pattern = attend_of(mask).expand(case.batch, 1, 1, case.kv_len)
    runs = is_canonical(pattern, 1, case.kv_len) or cache_padding_representable(pattern[:, 0])
    event(f"packed {case.mask}: {'te' if runs else 'fallback'}")
    if not runs:
        assert te_fx.get_te_attention_stats() == stats_delta(fallback_mask=1)
        return
    assert te_fx.get_te_attention_stats() == stats_delta(te_hits=1)
    (call,) = module.calls
    heads = case.kv_heads * case.n_rep
    assert call["contiguous"]
    assert torch.equal(call["q"], xq.view(case.batch, 1, heads, case.head_dim))
    assert torch.equal(call["k"], xk.view(case.batch, case.kv_len, case.kv_heads, case.head_dim))
    assert torch.equal(call["v"], xv.view(case.batch, case.kv_len, case.kv_heads, case.head_dim))
    plan = call["plan"]
    check_plan_form(plan, case.batch, 1, case.kv_len)
    assert torch.equal(plan_pattern(plan, case.batch, 1, case.kv_len), pattern[:, 0])


@needs_pack_gqa
@pytest.mark.parametrize("mask", ["all", "sliding", "pad"])
def test_packed_gqa_decode_runs_te(mask):
    """K/V keep Hkv heads and HF passes no enable_gqa: te_fx must not fall back with fallback_layout (a padded
    cache's decode runs with its key padding)."""
    case = SimpleNamespace(
        batch=2, kv_heads=2, n_rep=2, head_dim=8, kv_len=6, window_left=2, mask=mask, encoding="bool", pad=2, seed=0
    )
    fn, module = make_sdpa(4, 2, 8, case.window_left)
    xq, xk, xv, query, key, value, attn_mask = packed_call(case)
    out = fn(query, key, value, attn_mask=attn_mask)
    assert out.shape == query.shape
    torch.testing.assert_close(out, ORIGINAL_SDPA(query, key, value, attn_mask=attn_mask), rtol=1e-5, atol=1e-5)
    assert te_fx.get_te_attention_stats() == stats_delta(te_hits=1)
    (call,) = module.calls
    assert call["contiguous"]
    assert torch.equal(call["q"], xq.view(2, 1, 4, 8))
    assert torch.equal(call["k"], xk.view(2, 6, 2, 8))
    plan = call["plan"]
    assert torch.equal(plan_pattern(plan, 2, 1, 6), attend_of(attn_mask).expand(2, 1, 1, 6)[:, 0])


def test_packed_layout_with_per_head_mask_or_is_causal_falls_back():
    fn, module = make_sdpa(4, 2, 8)
    query, key, value = torch.randn(2, 2, 2, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    per_query_mask = torch.ones(2, 2, 2, 6, dtype=torch.bool)  # pack_gqa of a per-head mask
    per_query_mask[:, :, 1, 0] = False
    expected = ORIGINAL_SDPA(query, key, value, attn_mask=per_query_mask)
    torch.testing.assert_close(fn(query, key, value, attn_mask=per_query_mask), expected)
    expected = ORIGINAL_SDPA(query, key, value, is_causal=True)
    torch.testing.assert_close(fn(query, key, value, is_causal=True), expected)
    assert te_fx.get_te_attention_stats() == stats_delta(fallback_layout=2)
    assert module.calls == []


# ----------------------------------------------------------------------------------------------------------------
# Scale, dropout, layout fallbacks
# ----------------------------------------------------------------------------------------------------------------


def _simple_inputs(batch=2, heads=4, kv_heads=2, seq=5, head_dim=8):
    gen = torch.Generator().manual_seed(1)
    q = hf_view(torch.randn(batch, seq, heads * head_dim, generator=gen), heads)
    k = repeat_kv(hf_view(torch.randn(batch, seq, kv_heads * head_dim, generator=gen), kv_heads), heads // kv_heads)
    v = repeat_kv(hf_view(torch.randn(batch, seq, kv_heads * head_dim, generator=gen), kv_heads), heads // kv_heads)
    return q, k, v


def test_te_fx_modules_run_each_call_with_its_own_scale(caplog):
    """te_fx's own modules take the call's scale (explicit, or SDPA's default for scale=None) whatever theirs is: the
    plan carries it where it differs, as OPT needs (it scales q itself and calls with scale=1)."""
    q, k, v = _simple_inputs()
    fn, module = make_sdpa(4, 2, 8, softmax_scale=0.25)
    with caplog.at_level(logging.WARNING, logger="te_fx"):
        for scale in (0.3, None, 1.0, 0.25):
            out = fn(q, k, v, is_causal=True, scale=scale)
            torch.testing.assert_close(out, ORIGINAL_SDPA(q, k, v, is_causal=True, scale=scale), rtol=1e-6, atol=1e-6)
    assert te_fx.get_te_attention_stats() == stats_delta(te_hits=4)
    assert [call["plan"].softmax_scale for call in module.calls] == [0.3, 8**-0.5, 1.0, None]
    assert not [r for r in caplog.records if "scale" in r.getMessage()]


def test_a_stand_in_gets_no_call_with_another_scale_and_warns_once_per_module(caplog):
    """A stand-in runs with its own scale, which te_fx does not read: calls with another one run SDPA, counted, and
    each module warns once."""
    q, k, v = _simple_inputs()
    (spy, inner), (other_spy, other_inner) = stand_in_for(4, 2, 8, softmax_scale=0.25), stand_in_for(4, 2, 8)
    fn = _make_te_sdpa(spy, 4, 2, ORIGINAL_SDPA, (-1, 0), 0.25)
    other_fn = _make_te_sdpa(other_spy, 4, 2, ORIGINAL_SDPA, (-1, 0), 0.5)
    with caplog.at_level(logging.WARNING, logger="te_fx"):
        for sdpa, scale in ((fn, 0.3), (fn, None), (other_fn, 0.3), (fn, 0.3)):
            out = sdpa(q, k, v, is_causal=True, scale=scale)
            torch.testing.assert_close(out, ORIGINAL_SDPA(q, k, v, is_causal=True, scale=scale), rtol=0, atol=0)
    assert te_fx.get_te_attention_stats() == stats_delta(fallback_scale_mismatch=4)
    assert inner.mock_calls == [] and other_inner.mock_calls == []
    warnings = [r for r in caplog.records if "scale" in r.getMessage()]
    assert len(warnings) == 2 and all(r.levelno == logging.WARNING for r in warnings)  # fn once, other_fn once
    assert "0.25" in warnings[0].getMessage() and "0.5" in warnings[1].getMessage()
    # the agreeing scale runs the stand-in, explicit or implied
    te_fx.reset_te_attention_stats()
    for scale in (0.25, 0.25 * (1 + 1e-12)):
        expected = ORIGINAL_SDPA(q, k, v, is_causal=True, scale=scale)
        torch.testing.assert_close(fn(q, k, v, is_causal=True, scale=scale), expected)
    default_spy, _ = stand_in_for(4, 2, 8)
    default_fn = _make_te_sdpa(default_spy, 4, 2, ORIGINAL_SDPA, (-1, 0))
    expected = ORIGINAL_SDPA(q, k, v, is_causal=True)
    torch.testing.assert_close(default_fn(q, k, v, is_causal=True, scale=8**-0.5), expected)
    torch.testing.assert_close(default_fn(q, k, v, is_causal=True), ORIGINAL_SDPA(q, k, v, is_causal=True))
    assert te_fx.get_te_attention_stats() == stats_delta(te_hits=4)


def test_a_mask_that_needs_its_gradient_falls_back():
    """A learned additive bias that is exactly 0 / -inf (zero-initialised) looks causal, but as a mask type it would
    get no gradient; without grad mode it is an ordinary mask."""
    q, k, v = _simple_inputs()
    fn, module = make_sdpa(4, 2, 8)
    bias = torch.zeros(1, 4, 5, 5, requires_grad=True)
    plain_bias = torch.zeros(1, 4, 5, 5, requires_grad=True)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    out = fn(q, k, v, attn_mask=bias.masked_fill(~causal, float("-inf")))
    expected = ORIGINAL_SDPA(q, k, v, attn_mask=plain_bias.masked_fill(~causal, float("-inf")))
    torch.testing.assert_close(out, expected)
    out.square().sum().backward()
    expected.square().sum().backward()
    assert bias.grad is not None and bias.grad.abs().max() > 0
    torch.testing.assert_close(bias.grad, plain_bias.grad)
    assert te_fx.get_te_attention_stats() == stats_delta(fallback_mask=1)
    with torch.no_grad():
        fn(q, k, v, attn_mask=bias.masked_fill(~causal, float("-inf")))
    assert te_fx.get_te_attention_stats() == stats_delta(te_hits=1, fallback_mask=1)
    assert len(module.calls) == 1


def test_calls_sdpa_rejects_or_answers_with_an_empty_tensor_go_to_sdpa():
    """Where SDPA raises (a float mask of another dtype, mixed q/k/v dtypes) the caller gets SDPA's own error; where
    it returns an empty tensor (no queries, no keys, no batch), the same empty tensor."""
    q, k, v = _simple_inputs()
    fn, module = make_sdpa(4, 2, 8)
    causal = torch.zeros(5, 5).masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
    for call in (lambda f: f(q, k, v, attn_mask=causal.double()), lambda f: f(q, k.double(), v.double())):
        with pytest.raises(RuntimeError) as expected:
            call(ORIGINAL_SDPA)
        with pytest.raises(RuntimeError) as got:
            call(fn)
        assert str(got.value) == str(expected.value)
    assert te_fx.get_te_attention_stats() == stats_delta(fallback_mask=1, fallback_dtype=1)
    for empty in (q[:, :, :0], q[:0]):
        keys = (k, v) if empty.shape[0] else (k[:0], v[:0])
        assert fn(empty, *keys).shape == ORIGINAL_SDPA(empty, *keys).shape == empty.shape
    assert fn(q, k[:, :, :0], v[:, :, :0]).shape == ORIGINAL_SDPA(q, k[:, :, :0], v[:, :, :0]).shape
    assert module.calls == []


def test_dropout_in_eval_falls_back():
    q, k, v = _simple_inputs()
    fn, module = make_sdpa(4, 2, 8, dropout=0.1, training=False)
    torch.manual_seed(5)
    out = fn(q, k, v, is_causal=True, dropout_p=0.3)
    torch.manual_seed(5)
    expected = ORIGINAL_SDPA(q, k, v, is_causal=True, dropout_p=0.3)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert not torch.allclose(out, ORIGINAL_SDPA(q, k, v, is_causal=True))  # dropout really happened
    assert te_fx.get_te_attention_stats() == stats_delta(fallback_dropout=1)
    assert module.calls == []


def test_dropout_matching_the_training_module_runs_te():
    q, k, v = _simple_inputs()
    fn, module = make_sdpa(4, 2, 8, dropout=0.3, training=True)
    fn(q, k, v, is_causal=True, dropout_p=0.3)
    assert te_fx.get_te_attention_stats() == stats_delta(te_hits=1)
    fn(q, k, v, is_causal=True, dropout_p=0.1)  # a different rate: SDPA's
    assert te_fx.get_te_attention_stats() == stats_delta(te_hits=1, fallback_dropout=1)
    assert len(module.calls) == 1


def test_layout_fallbacks_and_errors_pass_through():
    fn, module = make_sdpa(4, 2, 8)
    q, k, v = _simple_inputs()
    q3, k3, v3 = (t[0] for t in (q, k, v))  # 3D: SDPA accepts it, the patch does not convert it
    torch.testing.assert_close(fn(q3, k3, v3, is_causal=True), ORIGINAL_SDPA(q3, k3, v3, is_causal=True))
    assert te_fx.get_te_attention_stats() == stats_delta(fallback_layout=1)
    # K/V with the KV head count but no enable_gqa: SDPA's own error, unchanged
    with pytest.raises(RuntimeError) as expected:
        ORIGINAL_SDPA(q, k[:, ::2], v[:, ::2])
    with pytest.raises(RuntimeError) as got:
        fn(q, k[:, ::2], v[:, ::2])
    assert str(got.value) == str(expected.value)
    # a mask together with is_causal is SDPA's business, whatever it does with it
    te_fx.reset_te_attention_stats()
    mask = hf_causal(5, 5, 1)
    expected = ORIGINAL_SDPA(q, k, v, attn_mask=mask, is_causal=True)
    torch.testing.assert_close(fn(q, k, v, attn_mask=mask, is_causal=True), expected)
    assert te_fx.get_te_attention_stats() == stats_delta(fallback_mask=1)
    assert module.calls == []


class AttributeSpy:
    """A foreign attention module (not te_fx's): calls go to ``inner`` (a MagicMock), every attribute read of the
    spy itself is recorded. te_fx must call it through TE's contract and read nothing of it."""

    def __init__(self, inner) -> None:
        object.__setattr__(self, "_spy_inner", inner)
        object.__setattr__(self, "_spy_reads", [])

    def __getattribute__(self, name):
        if name in ("_spy_inner", "_spy_reads", "__class__", "__dict__"):
            return object.__getattribute__(self, name)
        object.__getattribute__(self, "_spy_reads").append(name)
        return getattr(object.__getattribute__(self, "_spy_inner"), name)

    def __setattr__(self, name, value) -> None:
        object.__getattribute__(self, "_spy_reads").append(f"set {name}")

    def __call__(self, *args, **kwargs):
        return object.__getattribute__(self, "_spy_inner")(*args, **kwargs)


def stand_in_for(heads, kv_heads, head_dim, window_left=-1, softmax_scale=None):
    """(spy, mock): a MagicMock computing TE's forward contract with the reference module, behind an AttributeSpy."""
    reference = ReferenceDotProductAttention(heads, head_dim, kv_heads, window_size=(window_left, 0),
                                             softmax_scale=softmax_scale)  # fmt: skip
    inner = mock.MagicMock(side_effect=reference)
    return AttributeSpy(inner), inner


def assert_called_through_te_contract(inner, plans):
    """The mock saw exactly these calls, each ``(q, k, v, attn_mask_type=..., window_size=...)``, and nothing else
    (no attribute of it was read or called)."""
    assert [name for name, _, _ in inner.mock_calls] == [""] * len(plans)
    for (_, args, kwargs), (mask_type, window) in zip(inner.mock_calls, plans):
        assert len(args) == 3 and all(t.is_contiguous() and t.dim() == 4 for t in args)
        assert kwargs == {"attn_mask_type": mask_type, "window_size": window}


def test_executor_modules_run_plans_and_foreign_modules_get_te_call_contract():
    """te_fx's own modules (``ExecutorModule``) get ``run(q, k, v, plan)``; any other module is called as TE's
    DotProductAttention, ``module(q, k, v, attn_mask_type=..., window_size=...)``, with no attribute read; the
    per-row plans are not part of that contract, so those calls stay on SDPA."""
    assert issubclass(RecordingTE, ExecutorModule)
    q, k, v = _simple_inputs(seq=6)
    sliding = hf_causal(6, 6, 2)
    padded = sliding.expand(2, 1, 6, 6).clone()
    padded[1, ..., :2] = False  # left padding of row 1
    calls = [dict(attn_mask=sliding), dict(is_causal=True), dict(), dict(attn_mask=padded)]
    expected = [ORIGINAL_SDPA(q, k, v, **kwargs) for kwargs in calls]

    fn, module = make_sdpa(4, 2, 8, window_left=2)
    for kwargs, want in zip(calls, expected):
        torch.testing.assert_close(fn(q, k, v, **kwargs), want, rtol=1e-5, atol=1e-5)
    assert [call["plan"].kind for call in module.calls] == ["causal", "causal", "no_mask", "padding_causal"]
    assert module.calls[0]["plan"] == AttentionPlan("causal", (2, 0))
    assert torch.equal(module.calls[3]["plan"].key_padding, torch.tensor([[True] * 6, [False] * 2 + [True] * 4]))
    assert module.forward_calls == 0
    assert te_fx.get_te_attention_stats() == stats_delta(te_hits=4)

    te_fx.reset_te_attention_stats()
    spy, inner = stand_in_for(4, 2, 8, window_left=2)
    fn = _make_te_sdpa(spy, 4, 2, ORIGINAL_SDPA, (2, 0))
    for kwargs, want in zip(calls, expected):
        torch.testing.assert_close(fn(q, k, v, **kwargs), want, rtol=1e-5, atol=1e-5)
    assert te_fx.get_te_attention_stats() == stats_delta(te_hits=3, fallback_mask=1)
    assert_called_through_te_contract(inner, [("causal", (2, 0)), ("causal", (-1, 0)), ("no_mask", (-1, -1))])
    assert object.__getattribute__(spy, "_spy_reads") == []


def test_a_foreign_stand_in_in_training_mode_is_taken_to_apply_no_dropout():
    """te_fx reads nothing of a stand-in, so a call with dropout cannot match it: SDPA runs the dropout."""
    spy, inner = stand_in_for(4, 2, 8)
    fn = _make_te_sdpa(spy, 4, 2, ORIGINAL_SDPA, (-1, 0))
    q, k, v = _simple_inputs()
    torch.manual_seed(3)
    out = fn(q, k, v, is_causal=True, dropout_p=0.2)
    torch.manual_seed(3)
    torch.testing.assert_close(out, ORIGINAL_SDPA(q, k, v, is_causal=True, dropout_p=0.2), rtol=0, atol=0)
    assert te_fx.get_te_attention_stats() == stats_delta(fallback_dropout=1)
    assert inner.mock_calls == [] and object.__getattribute__(spy, "_spy_reads") == []


# ----------------------------------------------------------------------------------------------------------------
# Injected models: thread safety and exception safety of the SDPA swap
# ----------------------------------------------------------------------------------------------------------------


def tiny_llama(seed: int, heads: int = 4, kv_heads: int = 2, layers: int = 2) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=32, intermediate_size=48, num_attention_heads=heads, num_key_value_heads=kv_heads,
        num_hidden_layers=layers, vocab_size=64, max_position_embeddings=64, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def attention_modules(model):
    return [m for name, m in model.named_modules() if name.endswith("self_attn")]


def test_concurrent_forwards_each_get_their_own_attention():
    """Three threads: two injected models and a plain one. Each injected model's calls reach its own attention
    module in its own thread only; the plain model's thread never sees a routing mode; SDPA's attribute is never
    touched; a forward that raises midway leaves nothing behind."""
    model_a, model_b, plain = tiny_llama(1), tiny_llama(2, heads=4, kv_heads=1), tiny_llama(3)
    ids_a = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    ids_b = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(2))
    ids_c = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = {"a": model_a(ids_a).logits, "b": model_b(ids_b).logits}
    te_fx.inject_te_attention(model_a, executor="reference")
    te_fx.inject_te_attention(model_b, executor="reference")

    calls: list[tuple[str, int]] = []
    meet = threading.Barrier(2, timeout=60)  # the injected models' first threaded forwards meet inside attention
    met: set[str] = set()
    seen: list[str] = []  # anything wrong observed inside a forward

    def observe(tag, attn):
        run = attn.attn_module.run

        def recorded(*args, **kwargs):
            calls.append((tag, threading.get_ident()))
            time.sleep(0.0005)  # hand the GIL over while this thread's route is active
            return run(*args, **kwargs)

        attn.attn_module.run = recorded  # the plan runner te_fx calls (the module is an ExecutorModule)

    for tag, model in (("a", model_a), ("b", model_b)):
        for attn in attention_modules(model):
            observe(tag, attn)

    def enter(tag):
        def hook(*_):
            if F.scaled_dot_product_attention is not ORIGINAL_SDPA:
                seen.append(f"{tag}: F.scaled_dot_product_attention replaced")
            routed = bool(_get_current_function_mode_stack())
            if routed != (tag != "c"):
                seen.append(f"{tag}: routing mode {'active' if routed else 'missing'} in this thread")
            if threading.current_thread() is not threading.main_thread() and tag != "c" and tag not in met:
                met.add(tag)
                meet.wait()  # both routes active at once, whatever the scheduler does
            time.sleep(0.0005)

        return hook

    for tag, model in (("a", model_a), ("b", model_b), ("c", plain)):  # sleep inside every attention forward
        for attn in attention_modules(model):
            attn.q_proj.register_forward_pre_hook(enter(tag))
            attn.o_proj.register_forward_pre_hook(lambda *_: time.sleep(0.0002))

    boom = {"armed": False}

    def maybe_raise(*_):
        if boom["armed"]:
            raise RuntimeError("boom")

    attention_modules(model_a)[1].o_proj.register_forward_pre_hook(maybe_raise)  # inside layer 1's routed forward

    with torch.no_grad():
        single = {"a": model_a(ids_a).logits, "b": model_b(ids_b).logits, "c": plain(ids_c).logits}
    torch.testing.assert_close(single["a"], before["a"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(single["b"], before["b"], rtol=1e-5, atol=1e-5)
    assert {tag for tag, _ in calls} == {"a", "b"}
    calls.clear()

    threads_of: dict[str, int] = {}
    failures: list[str] = []
    raised = []
    barrier = threading.Barrier(3)

    def run(tag, model, ids):
        threads_of[tag] = threading.get_ident()
        barrier.wait()
        for step in range(25):
            if tag == "a":
                boom["armed"] = step % 4 == 3
            try:
                with torch.no_grad():
                    out = model(ids).logits
            except Exception as error:  # noqa: BLE001 - anything but the planted error is a failure
                if tag == "a" and str(error) == "boom":
                    raised.append(step)
                    if _get_current_function_mode_stack():
                        failures.append(f"a step {step}: the routing mode outlived the exception")
                else:
                    failures.append(f"{tag} step {step}: {error!r}")
                continue
            finally:
                if tag == "a":
                    boom["armed"] = False
            if not torch.allclose(out, single[tag], rtol=1e-5, atol=1e-5):
                failures.append(f"{tag} step {step}: max diff {(out - single[tag]).abs().max():.3g}")

    threads = [
        threading.Thread(target=run, args=args)
        for args in (("a", model_a, ids_a), ("b", model_b, ids_b), ("c", plain, ids_c))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert not failures, failures
    assert not seen, seen[:5]
    assert len(raised) == 6
    # every attention call of the injected models ran their TE module (the failing step fails after both layers)
    assert sum(tag == "a" for tag, _ in calls) == 25 * 2
    assert sum(tag == "b" for tag, _ in calls) == 25 * 2
    # each TE module ran only in its own model's thread; the plain model's thread never reached one
    assert {(tag, ident == threads_of[tag]) for tag, ident in calls} == {("a", True), ("b", True)}
    assert all(ident != threads_of["c"] for _, ident in calls)
    assert F.scaled_dot_product_attention is ORIGINAL_SDPA
    # and the models still work single-threaded
    with torch.no_grad():
        torch.testing.assert_close(model_a(ids_a).logits, single["a"], rtol=1e-5, atol=1e-5)


def test_routing_ends_with_a_forward_that_raises():
    """Inside an injected forward this thread's SDPA calls are routed by a mode (SDPA's attribute untouched); after
    an exception midway no mode is left and plain SDPA calls are not routed."""
    model = tiny_llama(4)
    te_fx.inject_te_attention(model, executor="reference")
    observed = []

    def fail(*_):
        observed.append((F.scaled_dot_product_attention is ORIGINAL_SDPA, len(_get_current_function_mode_stack())))
        raise ValueError("midway")

    attention_modules(model)[0].o_proj.register_forward_pre_hook(fail)
    with pytest.raises(ValueError, match="midway"):
        model(torch.zeros(1, 4, dtype=torch.long))
    assert observed == [(True, 1)]
    assert te_fx.get_te_attention_stats() == stats_delta(te_hits=1)  # layer 0's SDPA call, before the hook
    assert F.scaled_dot_product_attention is ORIGINAL_SDPA
    assert not _get_current_function_mode_stack()
    q, k, v = _simple_inputs(heads=2, kv_heads=2)
    F.scaled_dot_product_attention(q, k, v, is_causal=True)  # outside any injected forward: plain SDPA
    assert te_fx.get_te_attention_stats() == stats_delta(te_hits=1)


def test_routing_stacks_on_another_torch_function_mode():
    """A user's torch function mode around an injected forward: te_fx's routing stacks on it (the output and the
    counters are as without it) and leaves only the user's mode behind; the user's mode still sees the forward's
    other torch calls."""
    from torch.overrides import TorchFunctionMode

    seen = set()

    class Recorder(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.add(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    model, plain = tiny_llama(7, layers=1), tiny_llama(7, layers=1)
    te_fx.inject_te_attention(model, executor="reference")
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(7))
    with torch.no_grad(), Recorder() as recorder:
        out = model(ids).logits
        assert _get_current_function_mode_stack() == [recorder]
    with torch.no_grad():
        torch.testing.assert_close(out, plain(ids).logits, rtol=1e-5, atol=1e-5)
    assert te_fx.get_te_attention_stats() == stats_delta(te_hits=1)
    assert "linear" in seen
    assert not _get_current_function_mode_stack()


# ----------------------------------------------------------------------------------------------------------------
# Injection edge cases
# ----------------------------------------------------------------------------------------------------------------

ATTENTION_SOURCE = """
import torch
from torch import nn
{import_line}


class {name}(nn.Module):
    def __init__(self):
        super().__init__()
        self.num_heads, self.head_dim = 2, 4
        self.q_proj = nn.Linear(8, 8)
        self.k_proj = nn.Linear(8, 8)
        self.v_proj = nn.Linear(8, 8)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, 2, 4).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        return {call}(q, k, v, is_causal=True)
"""


@pytest.fixture
def attention_module_file(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    created = []

    def load(module_name, class_name, import_line, call):
        source = ATTENTION_SOURCE.format(name=class_name, import_line=import_line, call=call)
        (tmp_path / f"{module_name}.py").write_text(textwrap.dedent(source))
        importlib.invalidate_caches()
        created.append(module_name)
        return getattr(importlib.import_module(module_name), class_name)()

    yield load
    for name in created:
        sys.modules.pop(name, None)


def test_local_sdpa_import_is_injected_and_reaches_te(attention_module_file, caplog):
    """The routing sees the SDPA builtin however it is reached: a module that imported it locally (``from
    torch.nn.functional import scaled_dot_product_attention``) is injected like one calling ``F.``'s attribute."""
    local = attention_module_file(
        "te_fx_test_local_sdpa", "LocalSdpaAttention", "from torch.nn.functional import scaled_dot_product_attention",
        "scaled_dot_product_attention",
    )  # fmt: skip
    attribute = attention_module_file(
        "te_fx_test_attr_sdpa", "AttrSdpaAttention", "import torch.nn.functional as F", "F.scaled_dot_product_attention"
    )
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        expected = {"local": local(x), "attribute": attribute(x)}
    with caplog.at_level(logging.WARNING, logger="te_fx"):
        assert te_fx.inject_te_attention_into_module(local, executor="reference") is True
        assert te_fx.inject_te_attention_into_module(attribute, executor="reference") is True
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert hasattr(local, "attn_module") and "forward" in vars(local)
    calls = []
    for module in (local, attribute):
        run, name = module.attn_module.run, type(module).__name__
        module.attn_module.run = lambda *args, run=run, name=name: calls.append(name) or run(*args)
    with torch.no_grad():
        torch.testing.assert_close(local(x), expected["local"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(attribute(x), expected["attribute"], rtol=1e-5, atol=1e-5)
    assert calls == ["LocalSdpaAttention", "AttrSdpaAttention"]
    assert te_fx.get_te_attention_stats() == stats_delta(te_hits=2)


def test_patched_factory_is_used_by_te_executor(monkeypatch):
    made = []

    def factory(num_heads, num_kv_heads, head_dim, window_size=(-1, 0), softmax_scale=None, **kwargs):
        module = RecordingTE(
            num_heads, head_dim, num_kv_heads, window_size=window_size, softmax_scale=softmax_scale, **kwargs
        )
        made.append(((num_heads, num_kv_heads, head_dim, window_size, softmax_scale, kwargs), module))
        return module

    monkeypatch.setattr(te_attention, "_create_te_dot_product_attention", factory)
    monkeypatch.delenv("TE_FX_EXECUTOR", raising=False)
    model = tiny_llama(5)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(ids).logits
    te_fx.inject_te_attention(model, executor="te")
    assert [args for args, _ in made] == [(4, 2, 8, (-1, 0), 8**-0.5, {})] * 2
    assert [attn.attn_module for attn in attention_modules(model)] == [module for _, module in made]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert all(len(module.calls) == 1 and module.forward_calls == 0 for _, module in made)  # run(), the plan API
    assert te_fx.get_te_attention_stats() == stats_delta(te_hits=2)


def test_patched_factory_with_a_foreign_stand_in(monkeypatch):
    """A stand-in that is not te_fx's (a MagicMock, as NeMo's tests patch the factory with): injected without TE,
    called through TE's forward contract, never read; padded batches (per-row plans) stay on SDPA."""
    made = []

    def factory(num_heads, num_kv_heads, head_dim, window_size=(-1, 0), softmax_scale=None, **kwargs):
        spy, inner = stand_in_for(num_heads, num_kv_heads, head_dim, window_size[0], softmax_scale)
        made.append((spy, inner))
        return spy

    monkeypatch.setattr(te_attention, "_create_te_dot_product_attention", factory)
    model, plain = tiny_llama(5), tiny_llama(5)
    te_fx.inject_te_attention(model, executor="te")
    assert [attn.attn_module for attn in attention_modules(model)] == [spy for spy, _ in made]
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(5))
    padding = torch.ones_like(ids)
    padding[1, :2] = 0
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
        out = model(ids, attention_mask=padding).logits
        torch.testing.assert_close(out, plain(ids, attention_mask=padding).logits, rtol=1e-5, atol=1e-5)
    assert te_fx.get_te_attention_stats() == stats_delta(te_hits=2, fallback_mask=2)
    for spy, inner in made:
        assert_called_through_te_contract(inner, [("causal", (-1, 0))])
        assert object.__getattribute__(spy, "_spy_reads") == []
    te_fx.remove_te_attention(model)
    assert all(object.__getattribute__(spy, "_spy_reads") == [] for spy, _ in made)


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is not None, reason="TransformerEngine is installed")
@pytest.mark.parametrize("executor", ["te", None])
def test_te_executor_without_transformer_engine(monkeypatch, executor):
    monkeypatch.delenv("TE_FX_EXECUTOR", raising=False)
    model = tiny_llama(6, layers=1)
    with pytest.raises(te_fx.TEUnavailableError) as info:
        te_fx.inject_te_attention(model, executor=executor)
    assert isinstance(info.value, ImportError)
    message = str(info.value)
    assert "pip install --no-build-isolation 'transformer_engine[pytorch]'" in message
    assert "executor='reference'" in message and "TE_FX_EXECUTOR" in message
    assert not any(hasattr(attn, "attn_module") for attn in attention_modules(model))
    assert not getattr(model, "_te_attention_injected", False)
    # TE is imported only when the real factory runs: a model without attention modules needs none
    te_fx.inject_te_attention(torch.nn.Sequential(torch.nn.Linear(2, 2)), executor=executor)
