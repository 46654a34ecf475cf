"""classify_mask / _detect_causal_mask against brute-force oracles, and the per-mask decision cache.

The oracle decodes the mask itself (bool: True = attend; float: 0 attends, -inf or exactly finfo(dtype).min is
masked, anything else makes the mask malformed, and so does a query row with no key seen and a finfo.min in it:
SDPA's softmax over its penalties is not the zero every plan gives) and builds the pattern of a plan by explicit loops
(``oracles.plan_pattern``: TE's per-query key ranges, ANDed with the plan's keep vector or cut into its documents).
A plan must be *sound* (the mask's attend pattern equals the plan's at every batch item, head, query and key) and
*complete*: a well-formed mask that one TE mask type reproduces (all-visible, or bottom-right causal with any
window: the window is read off the mask), or, when square, that key padding outside one run of kept tokens or
packed causal documents reproduce (heads agreeing, one window for the batch), gets a plan. Completeness is known
by construction for generated masks, and by enumeration (``oracles.representable``) for small square ones.
"""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from oracles import hf_causal, plan_pattern, representable, te_pattern, uniform_patterns
from transformers import masking_utils

from te_fx.core import masks
from te_fx.core.masks import classify_mask
from te_fx.core.plan import CAUSAL, NO_MASK, AttentionPlan
from te_fx.te_attention import _detect_causal_mask

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# the classification tests are cheap: run them with 4x the profile's examples
MORE_EXAMPLES = settings(max_examples=4 * settings.default.max_examples)
ENUMERATE_UP_TO = 6  # square masks up to this size are also checked against the enumerating oracle


def causal(window_left: int = -1, mask_type: str = "causal") -> AttentionPlan:
    return AttentionPlan(mask_type, (window_left, 0))


# ----------------------------------------------------------------------------------------------------------------
# The oracle
# ----------------------------------------------------------------------------------------------------------------


def decode(mask: torch.Tensor, shape: tuple[int, int, int, int]) -> tuple[torch.Tensor, bool]:
    """(attend broadcast to ``shape``, malformed) straight from the mask's values."""
    if mask.dtype == torch.bool:  # SDPA attends wherever the byte is nonzero
        return (mask.view(torch.uint8) != 0).expand(shape), False
    values = mask.to(torch.float64)
    attend = values == 0
    penalty = values == torch.finfo(mask.dtype).min
    blocked = torch.isneginf(values) | penalty
    # a row with no key seen is zero in SDPA only if all of it is -inf: finite penalties share a softmax
    penalized_row = ~attend.any(-1) & penalty.any(-1)
    return attend.expand(shape), not bool((attend | blocked).all()) or bool(penalized_row.any())


def uniform_match(attend: torch.Tensor) -> bool:
    """Some single TE mask type and window reproduces every batch item and head of ``attend`` (B, H, q, kv)."""
    q_len, kv_len = attend.shape[-2:]
    return any(bool((attend == pattern).all()) for pattern in uniform_patterns(q_len, kv_len))


def label(text: str) -> None:
    """A Hypothesis event (for --hypothesis-show-statistics) when called from a property test."""
    if currently_in_test_context():
        event(text)


def check_plan_form(plan: AttentionPlan, batch: int, q_len: int, kv_len: int) -> None:
    assert plan.mask_type in ("no_mask", "causal", "causal_bottom_right")
    if plan.mask_type == "no_mask":
        assert plan == NO_MASK
        return
    assert plan.window_size[1] == 0 and plan.window_size[0] >= -1
    assert plan.window_size[0] < kv_len - 1, f"{plan.window_size}: a window that reaches every key is full causal"
    assert (plan.mask_type == "causal") == (q_len == kv_len), "HF's causal masks are aligned bottom-right"
    assert plan.key_padding is None or plan.cu_seqlens is None
    assert plan.key_layout is None or plan.key_padding is not None
    if plan.key_padding is not None and q_len < kv_len:  # a KV cache's queries: run in inference, layout unread
        assert plan.key_padding.shape == (batch, kv_len) and plan.key_padding.dtype == torch.bool
        assert plan.kind == "padding_causal_bottom_right" and plan.key_layout is None
    elif plan.key_padding is not None:
        assert plan.key_padding.shape == (batch, kv_len) and plan.key_padding.dtype == torch.bool
        assert q_len == kv_len > 1 and plan.kind == "padding_causal"
        # checked: padding at the ends only, kept first exactly when every row keeps its first keys and at least one
        kept = plan.key_padding.sum(-1)
        right_padded = all(row[:n].all() and not row[n:].any() for row, n in zip(plan.key_padding, kept.tolist()))
        assert plan.key_layout == (False, True, right_padded and bool((kept > 0).all()))
    if plan.cu_seqlens is not None:
        bounds = plan.cu_seqlens
        assert q_len == kv_len > 1 and plan.kind == "thd"
        assert bounds.dim() == 1 and bounds.dtype == torch.int32
        assert bounds[0] == 0 and bounds[-1] == batch * q_len and bool((bounds.diff() > 0).all())
        assert set(range(0, batch * q_len + 1, q_len)) <= set(bounds.tolist()), "a document crosses a row"
        assert plan.window_size[0] != 0


def check_classify(mask, batch, heads, q_len, kv_len, supported: bool | None = None):
    """classify_mask's answer, asserted sound, and complete where the mask is known to be ``supported`` (True: it
    must get a plan), a uniform pattern, or small and square enough to enumerate."""
    decision = classify_mask(mask, batch, heads, q_len, kv_len)
    attend, malformed = decode(mask, (batch, heads, q_len, kv_len))
    label(f"classify: {'malformed' if malformed else 'well-formed'} -> {decision and decision.kind}")
    if malformed:
        assert decision is None, "a mask with values other than 0 / -inf / finfo.min was converted"
        return decision
    uniform = uniform_match(attend)
    enumerable = q_len == kv_len <= ENUMERATE_UP_TO and bool((attend == attend[:, :1]).all())
    runs = representable(attend[:, 0]) if enumerable else set()
    if decision is None:
        assert not uniform, f"missed a uniform pattern:\n{attend[0, 0].int()}"
        assert not runs, f"missed a {runs} pattern:\n{attend[:, 0].int()}"
        assert not supported, f"missed a supported pattern:\n{attend[:, 0].int()}"
        return decision
    check_plan_form(decision, batch, q_len, kv_len)
    expected = plan_pattern(decision, batch, q_len, kv_len)[:, None]
    assert bool((attend == expected).all()), f"unsound plan {decision} for\n{attend.int()}"
    if decision.key_padding is None and decision.cu_seqlens is None:
        assert uniform
        assert decision == NO_MASK or bool(expected.any(-1).all()), "a uniform plan with queries that see nothing"
    else:
        assert not uniform, f"{decision.kind} for a pattern one mask type reproduces"
        assert not enumerable or ("padding" if decision.key_padding is not None else "documents") in runs
    return decision


def check_detect(mask: torch.Tensor, window_size: tuple[int, int]):
    """_detect_causal_mask's answer: ("causal", window_size) exactly when the 4D square mask is well formed and
    equals TE's causal pattern of that window (a window reaching every key is full causal) everywhere."""
    result = _detect_causal_mask(mask, window_size)
    batch, heads, q_len, kv_len = mask.shape
    attend, malformed = decode(mask, tuple(mask.shape))
    matches = (
        not malformed and q_len == kv_len
        and bool((attend == te_pattern("causal", (window_size[0], 0), q_len, kv_len)).all())
    )  # fmt: skip
    label(f"detect: {'malformed' if malformed else 'well-formed'} -> {result[1] if result else None}")
    assert result == (("causal", window_size) if matches else None), f"{result} for\n{attend[0, 0].int()}"
    return result


def test_oracle_patterns_by_hand():
    assert hf_causal(2, 4).int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert hf_causal(3, 3, 1).int().tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    assert te_pattern("causal", (-1, 0), 2, 3).int().tolist() == [[1, 0, 0], [1, 1, 0]]
    assert te_pattern("no_mask", (-1, -1), 2, 2).all()
    attend, malformed = decode(torch.tensor([[0.0, torch.finfo(torch.float32).min, -float("inf")]]), (1, 1, 1, 3))
    assert attend.flatten().tolist() == [True, False, False] and not malformed
    assert decode(torch.tensor([0.0, -1e4]), (1, 1, 1, 2))[1]
    assert decode(torch.tensor([0.5, -float("inf")]), (1, 1, 1, 2))[1]
    keep = torch.tensor([[False, True, True], [True, True, False]])
    padded = AttentionPlan("causal", (-1, 0), key_padding=keep)
    assert plan_pattern(padded, 2, 3, 3).int().tolist() == [
        [[0, 0, 0], [0, 1, 0], [0, 1, 1]],
        [[1, 0, 0], [1, 1, 0], [1, 1, 0]],
    ]
    documents = AttentionPlan("causal", (0, 0), cu_seqlens=torch.tensor([0, 2, 3, 6], dtype=torch.int32))
    assert plan_pattern(documents, 2, 3, 3).int().tolist() == [
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
    ]
    documents = AttentionPlan("causal", (-1, 0), cu_seqlens=torch.tensor([0, 2, 3, 6], dtype=torch.int32))
    assert plan_pattern(documents, 2, 3, 3).int().tolist() == [
        [[1, 0, 0], [1, 1, 0], [0, 0, 1]],
        [[1, 0, 0], [1, 1, 0], [1, 1, 1]],
    ]
    windowed = AttentionPlan("causal", (1, 0), cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))
    assert plan_pattern(windowed, 1, 4, 4)[0].equal(hf_causal(4, 4, 1))
    two_rows = hf_causal(3, 3).expand(2, 3, 3).clone()
    two_rows[1, :, 0] = False
    assert representable(two_rows) == {"padding"}
    assert representable(hf_causal(3, 3, 0)[None]) == {"uniform", "padding", "documents"}  # one-token documents
    assert representable(documents_pattern := plan_pattern(documents, 2, 3, 3)) == {"documents"}
    inner = hf_causal(4, 4)[None].clone()
    inner[0, :, 1] = False
    assert representable(inner) == set() and documents_pattern.shape == (2, 3, 3)


# ----------------------------------------------------------------------------------------------------------------
# Mask strategies
# ----------------------------------------------------------------------------------------------------------------

KINDS = ("all", "causal", "sliding", "top_left", "padding", "padding", "padding", "packed", "packed", "random")


@st.composite
def keep_vector(draw, kv_len: int) -> tuple[torch.Tensor, bool]:
    """(keep (kv_len,), outer): padding on the left, the right, both, inside the row, or none."""
    side = draw(st.sampled_from(["none", "left", "right", "both", "inner", "empty"]))
    keep = torch.ones(kv_len, dtype=torch.bool)
    left, right = draw(st.integers(0, kv_len)), draw(st.integers(0, kv_len))
    if side == "left":
        keep[:left] = False
    elif side == "right":
        keep[kv_len - right :] = False
    elif side == "both":
        keep[:left] = False
        keep[max(left, kv_len - right) :] = False
    elif side == "inner" and kv_len >= 3:
        start = draw(st.integers(1, kv_len - 2))
        keep[start : draw(st.integers(start + 1, kv_len - 1))] = False
    elif side == "empty":
        keep[:] = False
    kept = keep.nonzero().flatten()
    outer = kept.numel() == 0 or int(kept[-1] - kept[0]) + 1 == kept.numel()
    return keep, outer


@st.composite
def patterns(draw, batch: int, mask_heads: int, q_len: int, kv_len: int, kinds=KINDS) -> tuple[torch.Tensor, bool]:
    """(a bool (batch, mask_heads, q_len, kv_len) attend pattern, supported by construction). Per-row kinds draw
    each batch row on its own; flips and head differences may break the pattern (then: not known supported)."""
    kind = draw(st.sampled_from(kinds))
    window = draw(st.one_of(st.just(-1), st.integers(0, kv_len)))
    event(f"kind={kind}")
    square = q_len == kv_len > 1
    supported = kind == "all" or (kind in ("causal", "sliding") and q_len <= kv_len)
    full = torch.empty(batch, mask_heads, q_len, kv_len, dtype=torch.bool)
    positions = (torch.arange(q_len) + kv_len - q_len).clamp(min=0)  # bottom-right: rows before key 0 see nothing
    if kind == "padding":
        supported = square or q_len < kv_len  # a KV cache's queries: padding anywhere
    elif kind == "packed":
        supported = square
    for b in range(batch):
        if kind == "all":
            row = torch.ones(q_len, kv_len, dtype=torch.bool)
        elif kind == "causal":
            row = hf_causal(q_len, kv_len)
        elif kind == "sliding":
            row = hf_causal(q_len, kv_len, window)
        elif kind == "top_left":
            row = te_pattern("causal", (-1, 0), q_len, kv_len)
        elif kind == "padding":
            keep, outer = draw(keep_vector(kv_len))
            supported &= outer or not square
            row = hf_causal(q_len, kv_len, window) & keep[None, :]
        elif kind == "packed":
            cuts = draw(st.sets(st.integers(1, max(1, kv_len - 1)), max_size=4))
            doc = torch.zeros(kv_len, dtype=torch.long)
            for cut in cuts:
                doc[cut:] += 1
            row = hf_causal(q_len, kv_len, window) & (doc[positions, None] == doc[None, :])
        else:
            seed = draw(st.integers(0, 2**16))
            row = torch.rand(q_len, kv_len, generator=torch.Generator().manual_seed(seed)) < 0.7
            supported = False
        full[b] = row
    if mask_heads > 1 and draw(st.integers(0, 3)) == 0:  # one head differs in one element
        b, i, j = (draw(st.integers(0, n - 1)) for n in (batch, q_len, kv_len))
        full[b, -1, i, j] = ~full[b, -1, i, j]
        supported = False
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):  # flipped elements anywhere
        b, h = draw(st.integers(0, batch - 1)), draw(st.integers(0, mask_heads - 1))
        i, j = draw(st.integers(0, q_len - 1)), draw(st.integers(0, kv_len - 1))
        full[b, :, i, j] = ~full[b, :, i, j] if draw(st.booleans()) else full[b, :, i, j]
        full[b, h, i, j] = ~full[b, h, i, j]
        supported = False
    return full, supported


@st.composite
def encodings(draw, full: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(the pattern as a bool or additive float mask (-inf / finfo.min), malformed on purpose)."""
    dtype = draw(st.sampled_from((torch.bool,) + FLOAT_DTYPES))
    if dtype == torch.bool:
        if draw(st.booleans()):  # True stored as any nonzero byte, as a bool view of numpy or raw bytes holds it
            seed = draw(st.integers(0, 2**16))
            nonzero = torch.randint(1, 256, full.shape, generator=torch.Generator().manual_seed(seed))
            return (nonzero * full).to(torch.uint8).view(torch.bool), False
        return full.clone(), False
    masked = draw(st.sampled_from(["min", "inf", "mixed"]))
    lowest = torch.finfo(dtype).min
    mask = torch.zeros(full.shape, dtype=dtype)
    if masked == "min":
        mask.masked_fill_(~full, lowest)
    elif masked == "inf":
        mask.masked_fill_(~full, -float("inf"))
    else:
        seed = draw(st.integers(0, 2**16))
        use_inf = torch.rand(full.shape, generator=torch.Generator().manual_seed(seed)) < 0.5
        mask.masked_fill_(~full & use_inf, -float("inf")).masked_fill_(~full & ~use_inf, lowest)
    if draw(st.integers(0, 4)) == 0:  # a malformed entry: a finite penalty or a non-zero "attend" value
        index = tuple(draw(st.integers(0, n - 1)) for n in full.shape)
        mask[index] = draw(st.sampled_from([-1e4, -1.0, -100.0, 1e-3, 0.5, -1e-3, float("nan"), float("inf")]))
        return mask, True
    return mask, False


@st.composite
def layouts(draw, mask: torch.Tensor) -> torch.Tensor:
    """The same values as an expanded (stride-0) view, a broadcastable smaller mask or a non-contiguous view."""
    options = ["as_is", "non_contiguous"]
    if torch.equal(mask, mask[:1].expand_as(mask)):
        options += ["expand_batch", "batch_one"]
        if mask.shape[1] == 1:
            options.append("two_dim")
    if torch.equal(mask, mask[:, :1].expand_as(mask)):
        options.append("head_one")
    choice = draw(st.sampled_from(options))
    if choice == "non_contiguous":
        return mask.transpose(-1, -2).contiguous().transpose(-1, -2)
    if choice == "expand_batch":
        return mask[:1].expand_as(mask)
    if choice == "batch_one":
        return mask[:1].clone()
    if choice == "two_dim":
        return mask[0, 0].clone()
    if choice == "head_one":
        return mask[:, :1].clone()
    return mask


@st.composite
def mask_cases(draw, max_len: int = 16, kinds=KINDS, square: bool = False, cache: bool = False):
    """``square``: q_len == kv_len; ``cache``: q_len < kv_len (a KV cache's queries)."""
    batch = draw(st.integers(1, 3))
    heads = draw(st.integers(1, 3))
    mask_heads = draw(st.sampled_from([1, heads]))
    kv_len = draw(st.integers(2 if cache else 1, max_len))
    q_len = draw(st.one_of(st.just(kv_len), st.just(kv_len), st.integers(1, kv_len), st.integers(1, max_len)))
    if square:
        q_len = kv_len
    if cache:
        q_len = draw(st.integers(1, kv_len - 1))
    full, supported = draw(patterns(batch, mask_heads, q_len, kv_len, kinds))
    mask, malformed = draw(encodings(full))
    return draw(layouts(mask)), batch, heads, q_len, kv_len, supported and not malformed


# ----------------------------------------------------------------------------------------------------------------
# Property tests
# ----------------------------------------------------------------------------------------------------------------


@given(mask_cases())
@MORE_EXAMPLES
def test_classify_mask_is_exact(case):
    check_classify(*case)


@given(mask_cases(max_len=ENUMERATE_UP_TO))
@MORE_EXAMPLES
def test_classify_small_masks_against_enumeration(case):
    """Small masks: every square one is also checked against the enumerating oracle (sound and complete)."""
    check_classify(*case)


@given(mask_cases(kinds=("padding", "packed"), square=True))
@MORE_EXAMPLES
def test_classify_padded_and_packed_square_masks(case):
    check_classify(*case)


@given(mask_cases(kinds=("padding",), cache=True))
@MORE_EXAMPLES
def test_classify_key_padding_anywhere_under_a_kv_cache(case):
    """Decode and chunked prefill: a KV cache's keys padded anywhere (left, right, inside, every key) under
    bottom-right causal, with or without a window, get a plan that reproduces the mask."""
    check_classify(*case)


@given(mask_cases(), st.integers(-1, 17))
@MORE_EXAMPLES
def test_detect_causal_mask_is_exact(case, window_left):
    mask = case[0]
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    check_detect(mask, (window_left, 0))


@st.composite
def hf_mask_cases(draw):
    batch = draw(st.integers(1, 3))
    q_len = draw(st.integers(1, 12))
    kv_len = q_len + draw(st.integers(0, 6))
    sliding = draw(st.one_of(st.none(), st.integers(1, kv_len + 1)))
    padding = draw(st.sampled_from(["none", "left", "right", "inner"]))
    dtype = draw(st.sampled_from((torch.bool,) + FLOAT_DTYPES[:3]))
    pads = [draw(st.integers(0, kv_len - 1)) for _ in range(batch)] if padding != "none" else [0] * batch
    return batch, q_len, kv_len, sliding, padding, pads, dtype


@given(hf_mask_cases())
@MORE_EXAMPLES
def test_classify_hf_masking_utils_masks(case):
    """Masks from transformers.masking_utils (sdpa_mask for bool, eager_mask for additive float masks): padded
    and packed batches included; left / right padding of a square mask always gets a plan (key padding), except
    an additive mask with padding queries that see no key (left padding; right padding past a window): SDPA's
    softmax over finfo.min there is the mean of V, not the zero of every plan, so it falls back."""
    batch, q_len, kv_len, sliding, padding, pads, dtype = case
    attention_mask = None
    if padding != "none":
        attention_mask = torch.ones(batch, kv_len, dtype=torch.bool)
        for b, n in enumerate(pads):
            if n and padding == "left":
                attention_mask[b, :n] = False
            elif n and padding == "right":
                attention_mask[b, kv_len - n :] = False
            elif n and kv_len >= 3:
                attention_mask[b, 1 : min(1 + n, kv_len - 1)] = False
    mask_function = masking_utils.causal_mask_function
    if sliding:
        mask_function = masking_utils.sliding_window_causal_mask_function(sliding)
    kwargs = dict(q_offset=kv_len - q_len, mask_function=mask_function, attention_mask=attention_mask)
    if dtype == torch.bool:
        mask = masking_utils.sdpa_mask(batch, q_len, kv_len, allow_is_causal_skip=False, **kwargs)
    else:
        mask = masking_utils.eager_mask(batch, q_len, kv_len, dtype=dtype, **kwargs)
    assert mask is not None
    blind_rows = not bool((mask == 0).any(-1).all()) if dtype != torch.bool else False
    supported = padding == "none" or (padding in ("left", "right") and q_len == kv_len > 1 and not blind_rows)
    decision = check_classify(mask, batch, 2, q_len, kv_len, supported=supported)
    if blind_rows:
        assert decision is None
    if padding == "none" and q_len > 1:
        window = sliding - 1 if sliding and sliding - 1 < kv_len - 1 else -1
        assert decision == causal(window, "causal" if q_len == kv_len else "causal_bottom_right")


def test_classify_masks_from_create_causal_mask():
    """The real entry points, with a config: full attention and a sliding-window (Mistral-style) layer; the window
    is the mask's, whichever layer passes it."""
    from transformers import MistralConfig

    config = MistralConfig(
        hidden_size=16, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1, vocab_size=8,
        sliding_window=3, attn_implementation="sdpa",
    )  # fmt: skip
    embeds = torch.zeros(2, 6, 16)
    positions = torch.arange(6).expand(2, 6)
    full = masking_utils.create_causal_mask(config, embeds, None, None, positions, allow_is_causal_skip=False)
    sliding = masking_utils.create_sliding_window_causal_mask(
        config, embeds, None, None, positions, allow_is_causal_skip=False
    )
    assert check_classify(full, 2, 2, 6, 6) == CAUSAL
    assert check_classify(sliding, 2, 2, 6, 6) == causal(2)
    padded = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    for make, window in ((masking_utils.create_causal_mask, -1), (masking_utils.create_sliding_window_causal_mask, 2)):
        mask = make(config, embeds, padded, None, positions, allow_is_causal_skip=False)
        plan = check_classify(mask, 2, 2, 6, 6, supported=True)
        assert plan.kind == "padding_causal" and plan.window_size == (window, 0)
        assert torch.equal(plan.key_padding, padded.bool())
    inner = torch.tensor([[1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    mask = masking_utils.create_causal_mask(config, embeds, inner, None, positions, allow_is_causal_skip=False)
    assert check_classify(mask, 2, 2, 6, 6) is None  # padding inside a row
    packed = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 0, 1]])  # position_ids restarting: two documents each
    mask = masking_utils.create_causal_mask(config, embeds, None, None, packed, allow_is_causal_skip=False)
    plan = check_classify(mask, 2, 2, 6, 6, supported=True)
    assert plan.kind == "thd" and plan.window_size == (-1, 0)
    assert plan.cu_seqlens.tolist() == [0, 3, 6, 10, 12]


# ----------------------------------------------------------------------------------------------------------------
# Unit tests
# ----------------------------------------------------------------------------------------------------------------


def encode(pattern: torch.Tensor, dtype: torch.dtype, masked: str = "min") -> torch.Tensor:
    if dtype == torch.bool:
        return pattern.clone()
    fill = torch.finfo(dtype).min if masked == "min" else -float("inf")
    return torch.zeros(pattern.shape, dtype=dtype).masked_fill_(~pattern, fill)


ENCODINGS = [(torch.bool, "")] + [(d, m) for d in FLOAT_DTYPES for m in ("min", "inf")]


@pytest.mark.parametrize(("dtype", "masked"), ENCODINGS)
def test_canonical_masks_exact_decisions(dtype, masked):
    def decide(pattern, q_len, kv_len, batch=2, heads=3):
        mask = encode(pattern, dtype, masked).view(1, 1, q_len, kv_len)
        return check_classify(mask, batch, heads, q_len, kv_len, supported=True)

    assert decide(hf_causal(5, 5), 5, 5) == CAUSAL
    assert decide(hf_causal(3, 7), 3, 7) == causal(-1, "causal_bottom_right")
    assert decide(hf_causal(6, 6, 2), 6, 6) == causal(2)  # the mask's window, whatever a layer's config says
    assert decide(hf_causal(6, 6, 0), 6, 6) == causal(0)
    assert decide(hf_causal(3, 8, 2), 3, 8) == causal(2, "causal_bottom_right")
    assert decide(hf_causal(6, 6, 4), 6, 6) == causal(4)
    assert decide(hf_causal(6, 6, 5), 6, 6) == CAUSAL  # the window covers everything
    assert decide(hf_causal(6, 6, 9), 6, 6) == CAUSAL
    assert decide(torch.ones(4, 6, dtype=torch.bool), 4, 6) == NO_MASK
    assert decide(torch.ones(1, 6, dtype=torch.bool), 1, 6) == NO_MASK  # decode
    assert decide(hf_causal(1, 6, 2), 1, 6) == causal(2, "causal_bottom_right")  # sliding decode
    assert decide(torch.ones(6, 4, dtype=torch.bool), 6, 4) == NO_MASK
    mask = encode(hf_causal(6, 4), dtype, masked).view(1, 1, 6, 4)
    assert check_classify(mask, 2, 3, 6, 4) is None  # more queries than keys: empty rows
    mask = encode(te_pattern("causal", (-1, 0), 3, 6), dtype, masked).view(1, 1, 3, 6)
    assert check_classify(mask, 2, 3, 3, 6) is None  # top-left is not what HF builds


def test_bool_masks_read_every_nonzero_byte_as_attend():
    """A bool mask viewed from raw bytes holds other nonzero values than 1: SDPA attends there, and so does every
    plan te_fx makes of it (the first key a query sees is not the largest byte)."""
    raw = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 2, 0]], dtype=torch.uint8)
    assert check_classify(raw.view(torch.bool), 1, 1, 4, 4) is None  # row 3 sees keys 0 and 2
    causal = (hf_causal(4, 4).to(torch.uint8) * torch.tensor([1, 7, 255, 2], dtype=torch.uint8)).view(torch.bool)
    assert check_classify(causal, 1, 1, 4, 4) == CAUSAL


@pytest.mark.parametrize(("dtype", "masked"), ENCODINGS)
@pytest.mark.parametrize(("q_len", "kv_len", "window_left"), [(5, 5, -1), (3, 6, -1), (6, 6, 2), (2, 6, 1)])
def test_every_single_flip(dtype, masked, q_len, kv_len, window_left):
    """Flip each element of a causal mask, in one batch item and head of a (2, 2, ...) mask: a per-head
    difference is never converted; in every head of one batch item, only what the oracle allows (a flipped
    element can make key padding or documents)."""
    base = encode(hf_causal(q_len, kv_len, window_left), dtype, masked).expand(2, 2, q_len, kv_len).contiguous()
    assert check_classify(base, 2, 2, q_len, kv_len, supported=True) is not None
    for b, heads in ((0, [0]), (1, [1]), (1, [0, 1])):
        for i in range(q_len):
            for j in range(kv_len):
                mask = base.clone()
                for h in heads:
                    if dtype == torch.bool:
                        mask[b, h, i, j] = ~mask[b, h, i, j]
                    else:
                        mask[b, h, i, j] = 0 if mask[b, h, i, j] != 0 else torch.finfo(dtype).min
                decision = check_classify(mask, 2, 2, q_len, kv_len)
                if len(heads) == 1:
                    assert decision is None


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("value", [-1e4, -1.0, -30000.0, 1e-3, -1e-3, 0.5, float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["masked", "attended"])
@pytest.mark.parametrize("kind", ["causal", "padding", "documents"])
def test_malformed_float_values_are_rejected(dtype, value, where, kind):
    pattern = hf_causal(4, 4).expand(2, 1, 4, 4).clone()
    if kind == "padding":
        pattern[1, ..., 3:] = False  # right padding: every query row sees a key (finfo.min below)
    elif kind == "documents":
        pattern[1, ..., 2:, :2] = False
    mask = encode(pattern, dtype)
    assert classify_mask(mask, 2, 1, 4, 4) is not None
    i, j = (0, 3) if where == "masked" else (3, 0 if kind == "padding" else 3)
    mask[1, 0, i, j] = value
    assert classify_mask(mask, 2, 1, 4, 4) is None
    assert _detect_causal_mask(mask, (-1, 0)) is None


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("padding", "window"), [("left", -1), ("left", 1), ("right", 1)])
def test_query_rows_that_see_no_key(dtype, padding, window):
    """Padding queries that see no key (left padding; right padding past a window) are zero in every plan. A bool
    or all -inf row is zero in SDPA too: the mask gets its plan. A row with a finfo.min penalty in it (HF's
    eager_mask) is a softmax over the penalties in SDPA (the mean of V for equal ones): no plan."""
    pattern = hf_causal(6, 6, window).expand(2, 1, 6, 6).clone()
    if padding == "left":
        pattern[1, ..., :3] = False
    else:
        pattern[1, ..., 3:] = False  # queries 5 (and with window 1 only them) see keys 4 and 5 only
    assert not bool(pattern.any(-1).all())
    for mask in (pattern, encode(pattern, dtype, "inf")):
        assert check_classify(mask, 2, 2, 6, 6, supported=True).kind == "padding_causal"
    mixed = encode(pattern, dtype, "inf")
    blind = (~pattern.any(-1)).nonzero()[0].tolist()
    mixed[blind[0], blind[1], blind[2], -1] = torch.finfo(dtype).min
    for mask in (encode(pattern, dtype, "min"), mixed):
        assert check_classify(mask, 2, 2, 6, 6) is None
        assert classify_mask(mask[:1].expand(2, 1, 6, 6), 2, 2, 6, 6) is not None  # the rows that see a key
    if dtype in (torch.float32, torch.float64):  # what SDPA does with such rows (CPU)
        q, k, v = torch.randn(3, 2, 2, 6, 4, dtype=dtype).unbind(0)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        inf_out = sdpa(q, k, v, attn_mask=encode(pattern, dtype, "inf"))
        min_out = sdpa(q, k, v, attn_mask=encode(pattern, dtype, "min"))
        for b, _, i in (~pattern.any(-1)).nonzero().tolist():
            assert bool((inf_out[b, :, i] == 0).all())
            torch.testing.assert_close(min_out[b, :, i], v[b].mean(-2))


def test_all_masked_penalty_mask_is_rejected_even_with_identical_penalties():
    """A constant -1e4 everywhere is harmless in SDPA but not 'attend': never silently taken as a pattern."""
    mask = torch.full((1, 1, 3, 3), -1e4)
    assert classify_mask(mask, 1, 1, 3, 3) is None


def test_unsupported_shapes_and_dtypes():
    causal_mask = hf_causal(4, 4).view(1, 1, 4, 4)
    assert classify_mask(causal_mask.int(), 1, 1, 4, 4) is None
    assert classify_mask(causal_mask.view(1, 1, 1, 4, 4), 1, 1, 4, 4) is None
    assert classify_mask(causal_mask, 1, 1, 4, 5) is None  # not broadcastable
    assert classify_mask(causal_mask.expand(2, 1, 4, 4), 1, 1, 4, 4) is None  # larger than the call's batch
    assert classify_mask(causal_mask.expand(2, 3, 4, 4), 2, 2, 4, 4) is None
    assert check_classify(causal_mask[0, 0], 2, 2, 4, 4) == CAUSAL  # 2D broadcasts
    assert check_classify(causal_mask[0], 2, 2, 4, 4) == CAUSAL
    assert check_classify(torch.tensor(True), 2, 2, 4, 4) == NO_MASK
    assert _detect_causal_mask(causal_mask[0], (-1, 0)) is None  # 3D
    assert _detect_causal_mask(hf_causal(3, 5).view(1, 1, 3, 5), (-1, 0)) is None  # q_len != kv_len


def test_expanded_views():
    pattern = hf_causal(5, 5)
    for view in (
        pattern.view(1, 1, 5, 5).expand(3, 1, 5, 5),
        pattern.view(1, 1, 5, 5).expand(3, 4, 5, 5),
        pattern.view(1, 1, 1, 5, 5).expand(1, 3, 1, 5, 5)[0],
        encode(pattern, torch.bfloat16).view(1, 1, 5, 5).expand(2, 4, 5, 5),
    ):
        assert view.stride()[0] == 0 or view.stride()[1] == 0
        assert check_classify(view, view.shape[0], view.shape[1], 5, 5) == CAUSAL
        assert check_detect(view, (-1, 0)) == ("causal", (-1, 0))
    # a batch-expanded view of a mask whose heads differ: the per-head difference must still be seen
    per_head = torch.stack([pattern, hf_causal(5, 5, 1)]).view(1, 2, 5, 5).expand(3, 2, 5, 5)
    assert check_classify(per_head, 3, 2, 5, 5) is None
    padded = pattern.clone()
    padded[:, :2] = False
    per_head = torch.stack([pattern, padded]).view(1, 2, 5, 5).expand(3, 2, 5, 5)
    assert check_classify(per_head, 3, 2, 5, 5) is None


def test_a_padding_mask_broadcast_over_the_batch_gets_one_keep_row_per_batch_item():
    """Masks broadcast over the batch (stride 0, or a batch of one): the plan's keep vectors and document
    boundaries cover the call's batch (the cache key holds the batch)."""
    padded = hf_causal(5, 5, 1).clone()
    padded[:, :2] = False
    with masks.cached_decisions():
        for mask in (padded.view(1, 1, 5, 5), padded.view(1, 1, 5, 5).expand(3, 2, 5, 5)):
            plan = check_classify(mask, 3, 2, 5, 5, supported=True)
            assert plan.window_size == (1, 0)
            assert plan.key_padding.tolist() == [[False, False, True, True, True]] * 3
        documents = hf_causal(5, 5).clone()
        documents[3:, :3] = False
        mask = documents.view(1, 1, 5, 5)
        assert check_classify(mask, 1, 2, 5, 5, supported=True).cu_seqlens.tolist() == [0, 3, 5]
        assert check_classify(mask, 3, 2, 5, 5, supported=True).cu_seqlens.tolist() == [0, 3, 5, 8, 10, 13, 15]


def test_per_row_plan_boundaries():
    """Padding outside one run of kept tokens, with or without a window, rows that keep nothing, documents of one
    token, a window of 0 (the diagonal: one mask type), padding inside a row (no plan)."""

    def plan_of(pattern, supported=None):
        batch, seq = pattern.shape[0], pattern.shape[-1]
        return check_classify(pattern.view(batch, 1, seq, seq), batch, 2, seq, seq, supported=supported)

    rows = hf_causal(6, 6, 2).expand(3, 6, 6).clone()
    rows[0, :, :2] = False
    rows[1, :, 4:] = False
    rows[2] = False  # a row that keeps nothing
    plan = plan_of(rows, supported=True)
    assert plan.kind == "padding_causal" and plan.window_size == (2, 0)
    assert plan.key_padding.int().tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [0] * 6]
    inner = hf_causal(6, 6).expand(1, 6, 6).clone()
    inner[0, :, 2] = False
    assert plan_of(inner, supported=False) is None
    inner_windowed = hf_causal(6, 6, 2).expand(1, 6, 6).clone()
    inner_windowed[0, :, 2] = False
    assert plan_of(inner_windowed, supported=False) is None
    singles = torch.eye(6, dtype=torch.bool).expand(2, 6, 6)
    assert plan_of(singles) == causal(0)
    documents = hf_causal(6, 6, 1).expand(2, 6, 6).clone()
    documents[0, 1:, :1] = False  # a document of one token, then one of five
    documents[1, 5:, :5] = False
    plan = plan_of(documents, supported=True)
    assert plan.kind == "thd" and plan.window_size == (1, 0)
    assert plan.cu_seqlens.tolist() == [0, 1, 6, 11, 12]


@pytest.mark.parametrize("window_left", [-1, 0, 2, 4, 9])
def test_detect_causal_mask_decisions(window_left):
    full = hf_causal(5, 5).view(1, 1, 5, 5)
    full_given = ("causal", (window_left, 0)) if window_left < 0 or window_left >= 4 else None
    assert check_detect(full.expand(2, 3, 5, 5), (window_left, 0)) == full_given
    assert check_detect(encode(hf_causal(5, 5), torch.float16).view(1, 1, 5, 5), (window_left, 0)) == full_given
    sliding = hf_causal(5, 5, window_left).view(1, 1, 5, 5)
    assert check_detect(sliding, (window_left, 0)) == ("causal", (window_left, 0))
    assert check_detect(torch.ones(1, 1, 5, 5, dtype=torch.bool), (window_left, 0)) is None  # no_mask is not causal
    padded = sliding.clone()
    padded[..., 0] = False
    assert check_detect(padded, (window_left, 0)) is None  # key padding is not a causal pattern either


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_detect_causal_single_token_mask(dtype):
    mask = encode(hf_causal(1, 1), dtype).view(1, 1, 1, 1)
    assert _detect_causal_mask(mask, (-1, 0)) == ("causal", (-1, 0))


# ----------------------------------------------------------------------------------------------------------------
# The per-mask cache
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def classify_calls(monkeypatch):
    """Counts the real classifications (cache misses)."""
    calls = []
    real = masks._classify

    def counting(mask, batch, q_len, kv_len):
        calls.append((batch, q_len, kv_len))
        return real(mask, batch, q_len, kv_len)

    monkeypatch.setattr(masks, "_classify", counting)
    with masks.cached_decisions():  # as inside an injected model's forward
        yield calls


def test_cache_hit_for_the_same_mask_object(classify_calls):
    mask = hf_causal(6, 6).view(1, 1, 6, 6).expand(2, 1, 6, 6)
    for _ in range(5):  # e.g. one call per layer
        assert classify_mask(mask, 2, 4, 6, 6) == CAUSAL
    assert len(classify_calls) == 1
    # an equal mask that is another object is classified again
    assert classify_mask(mask.clone(), 2, 4, 6, 6) == CAUSAL
    assert len(classify_calls) == 2


def test_decisions_end_with_the_outermost_forward():
    """Was: a classified mask kept a weak reference until the next forward began, so torch.utils.swap_tensors
    refused it between forwards."""
    mask, other = hf_causal(6, 6).view(1, 1, 6, 6).clone(), torch.ones(1, 1, 6, 6, dtype=torch.bool)
    with masks.cached_decisions():
        assert classify_mask(mask, 1, 1, 6, 6) == CAUSAL
        with pytest.raises(RuntimeError, match="weakref"):  # the cached decision holds one during the forward
            torch.utils.swap_tensors(mask, other)
    torch.utils.swap_tensors(mask, other)
    assert bool(mask.all()) and classify_mask(mask, 1, 1, 6, 6) == NO_MASK


def test_cache_key_includes_the_call_shape_and_batch(classify_calls):
    mask = hf_causal(6, 6, 2).view(1, 1, 6, 6)
    assert classify_mask(mask, 1, 1, 6, 6) == causal(2)
    assert classify_mask(mask, 1, 8, 6, 6) == causal(2)  # other heads: the same decision
    assert len(classify_calls) == 1
    # a per-row plan depends on the batch it is broadcast over: another batch is classified again
    padded = hf_causal(6, 6).clone()
    padded[:, :2] = False
    padded = padded.view(1, 1, 6, 6)
    assert classify_mask(padded, 1, 1, 6, 6).key_padding.shape == (1, 6)
    assert classify_mask(padded, 3, 1, 6, 6).key_padding.shape == (3, 6)
    assert classify_mask(padded, 3, 2, 6, 6).key_padding.shape == (3, 6)
    assert len(classify_calls) == 3
    # broadcasting a (1, 1, 1, kv) decode mask over different query counts must not reuse the decision
    decode_mask = torch.ones(1, 1, 1, 6, dtype=torch.bool)
    assert classify_mask(decode_mask, 1, 1, 1, 6) == NO_MASK
    assert classify_mask(decode_mask, 1, 1, 3, 6) == NO_MASK
    assert len(classify_calls) == 5


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.bfloat16])
def test_cache_sees_in_place_writes(classify_calls, dtype):
    mask = encode(hf_causal(5, 5), dtype).view(1, 1, 5, 5).contiguous()
    assert classify_mask(mask, 1, 2, 5, 5) == CAUSAL
    version = mask._version
    mask[0, 0, 0, 4] = True if dtype == torch.bool else 0.0  # un-mask a future key
    assert mask._version != version
    assert check_classify(mask, 1, 2, 5, 5) is None
    mask.copy_(encode(hf_causal(5, 5), dtype).view(1, 1, 5, 5))  # restore
    assert classify_mask(mask, 1, 2, 5, 5) == CAUSAL
    assert len(classify_calls) == 3
    mask.fill_(True if dtype == torch.bool else 0.0)
    assert classify_mask(mask, 1, 2, 5, 5) == NO_MASK
    assert len(classify_calls) == 4


def test_cache_sees_writes_through_another_view(classify_calls):
    """Views share the version counter: a write to the base invalidates the decision for the expanded view."""
    base = hf_causal(4, 4).view(1, 1, 4, 4).clone()
    view = base.expand(3, 1, 4, 4)
    assert classify_mask(view, 3, 2, 4, 4) == CAUSAL
    base[..., 0, 3] = True  # the first query sees the last key
    assert check_classify(view, 3, 2, 4, 4) is None
    assert len(classify_calls) == 2


def test_a_decision_neither_keeps_its_mask_alive_nor_outlives_it(classify_calls):
    """The cache holds masks weakly; a new mask at the freed one's address and shape gets its own decision."""
    mask = hf_causal(4, 4).view(1, 1, 4, 4).clone()
    assert classify_mask(mask, 1, 1, 4, 4) == CAUSAL
    alive = weakref.ref(mask)
    del mask
    gc.collect()
    assert alive() is None
    for _ in range(20):  # the allocator tends to hand the same block back
        assert classify_mask(torch.ones(1, 1, 4, 4, dtype=torch.bool), 1, 1, 4, 4) == NO_MASK


def test_inference_mode_tensors(classify_calls):
    with torch.inference_mode():
        mask = hf_causal(5, 5).view(1, 1, 5, 5).clone()
        assert mask.is_inference()
        assert classify_mask(mask, 1, 2, 5, 5) == CAUSAL
        mask[0, 0, 1, 3] = True  # no version counter to see this: the decision must not be cached
        assert check_classify(mask, 1, 2, 5, 5) is None
        mask[0, 0, 1, 3] = False
        assert classify_mask(mask, 1, 2, 5, 5) == CAUSAL
        # a normal tensor classified inside inference mode
    normal = hf_causal(5, 5).view(1, 1, 5, 5).clone()
    with torch.inference_mode():
        assert classify_mask(normal, 1, 2, 5, 5) == CAUSAL
    assert classify_mask(mask, 1, 2, 5, 5) == CAUSAL  # outside inference mode, still correct
    assert classify_mask(normal, 1, 2, 5, 5) == CAUSAL
    assert len(classify_calls) == 5  # every inference tensor call, plus the normal tensor once


def test_nothing_is_cached_outside_a_forward():
    """The SDPA replacement called on its own (no injected forward around it) decides every call afresh: a mask
    refilled through ``.data`` between two calls keeps its version counter and would reuse a stale decision."""
    mask = hf_causal(6, 6).view(1, 1, 6, 6).clone()
    assert classify_mask(mask, 1, 2, 6, 6) == CAUSAL
    mask.data[0, 0, 1, 3] = True  # a future key, version unchanged
    assert classify_mask(mask, 1, 2, 6, 6) is None


class _Owner:
    pass


def test_forwards_nested_in_their_parent_keep_decisions_and_others_start_afresh():
    model, decoder, layer, other_layer = _Owner(), _Owner(), _Owner(), _Owner()
    mask = hf_causal(6, 6).view(1, 1, 6, 6).clone()

    def decide():
        return classify_mask(mask, 1, 2, 6, 6)

    masks.enter_forward(model)
    masks.enter_forward(decoder, parent=model)
    masks.enter_forward(layer, parent=decoder)
    assert decide() == CAUSAL
    masks.leave_forward(layer)
    mask.data[0, 0, 1, 3] = True  # a refill inside one forward is not seen (decided once per forward) ...
    masks.enter_forward(other_layer, parent=decoder)
    assert decide() == CAUSAL
    # ... an interrupted forward (KeyboardInterrupt skips the forward hooks) never leaves: the next forward that is
    # not called from the stack top starts afresh, whether it is the model or a layer called on its own
    masks.enter_forward(layer, parent=decoder)
    assert decide() is None
    mask.data.copy_(hf_causal(6, 6))
    masks.enter_forward(model)
    assert decide() == CAUSAL
    masks.leave_forward(model)
    mask.data[0, 0, 1, 3] = True  # every forward has ended: nothing is cached any more
    assert decide() is None


def test_cache_is_consistent_across_threads():
    shared = [hf_causal(8, 8, w).view(1, 1, 8, 8).clone() for w in (-1, 2, 5)]
    shared[1][..., :3] = False  # key padding
    shared[2][..., 4:, :4] = False  # two documents
    errors = []
    barrier = threading.Barrier(4)

    def worker(seed):
        barrier.wait()
        gen = torch.Generator().manual_seed(seed)
        for n in range(60):
            which = int(torch.randint(0, 3, (1,), generator=gen))
            mask = shared[which] if n % 2 else shared[which].clone()
            try:
                with masks.cached_decisions():  # each thread's forwards start and end on their own
                    batch = 1 + n % 3
                    check_classify(mask, batch, 2, 8, 8, supported=True)
                    check_classify(mask, batch, 2, 8, 8, supported=True)
            except AssertionError as error:  # pragma: no cover - reported below
                errors.append(error)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_another_threads_forward_neither_clears_nor_shares_decisions(classify_calls):
    """Decisions belong to the thread's forward: another thread's outermost forward starting in the middle of it
    does not drop them (one classification, one host sync, per mask and forward)."""
    mask = hf_causal(8, 8).view(1, 1, 8, 8).expand(2, 1, 8, 8)
    first_done, other_started = threading.Event(), threading.Event()

    def other_forward():
        first_done.wait(timeout=60)
        with masks.cached_decisions():
            other_started.set()
            classify_mask(mask, 2, 4, 8, 8)  # its own decision

    other = threading.Thread(target=other_forward)
    other.start()
    with masks.cached_decisions():
        plans = [classify_mask(mask, 2, 4, 8, 8)]
        first_done.set()
        assert other_started.wait(timeout=60)
        other.join()
        plans.append(classify_mask(mask, 2, 4, 8, 8))
    assert plans[0] == plans[1] == AttentionPlan("causal", (-1, 0))
    assert len(classify_calls) == 2  # this forward once, the other thread's once


# ----------------------------------------------------------------------------------------------------------------
# plan_mask: a plan back to its SDPA mask (for calls a way in hands back to SDPA)
# ----------------------------------------------------------------------------------------------------------------

PLANS_TO_MASKS = [
    (NO_MASK, 2, 5, 7),
    (CAUSAL, 2, 6, 6),
    (causal(2), 2, 6, 6),
    (causal(-1, "causal_bottom_right"), 2, 3, 7),
    (causal(1, "causal_bottom_right"), 1, 1, 7),
    (AttentionPlan("causal", (-1, 0), key_padding=torch.tensor([[1, 1, 1, 0, 0, 0], [0, 1, 0, 1, 1, 1]])), 2, 6, 6),
    (AttentionPlan("causal", (1, 0), key_padding=torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])), 2, 6, 6),
    (AttentionPlan("causal", (-1, 0), cu_seqlens=torch.tensor([0, 2, 6, 7, 12], dtype=torch.int32)), 2, 6, 6),
    (AttentionPlan("causal", (1, 0), cu_seqlens=torch.tensor([0, 4, 6, 12], dtype=torch.int32)), 2, 6, 6),
]


@pytest.mark.parametrize("plan, batch, q_len, kv_len", PLANS_TO_MASKS)
def test_plan_mask_is_the_plans_pattern(plan, batch, q_len, kv_len):
    mask = masks.plan_mask(plan, batch, q_len, kv_len, torch.device("cpu"))
    assert mask.shape == (batch, 1, q_len, kv_len) and mask.dtype == torch.bool
    assert torch.equal(mask[:, 0], plan_pattern(plan, batch, q_len, kv_len))
