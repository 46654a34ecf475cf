"""classify_mask / _detect_causal_mask against a brute-force oracle, and the per-mask decision cache.

The oracle decodes the mask itself (bool: True = attend; float: 0 attends, -inf or exactly finfo(dtype).min is
masked, anything else makes the mask malformed) and builds the TE patterns from explicit per-query key ranges.
A decision must be *sound* (the mask's attend pattern equals what TE computes for the returned type and window,
at every batch item and head, with no empty rows) and *complete* (a well-formed mask that equals one of the
canonical patterns for the layer, i.e. all-visible, bottom-right causal, or bottom-right causal with the layer's
window, must be recognised).
"""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis.control import currently_in_test_context
from hypothesis import strategies as st
from transformers import masking_utils

from oracles import hf_causal, te_pattern

from te_fx import masks
from te_fx.masks import classify_mask
from te_fx.te_attention import _detect_causal_mask

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# the classification tests are cheap: run them with 4x the profile's examples
MORE_EXAMPLES = settings(max_examples=4 * settings.default.max_examples)



# ----------------------------------------------------------------------------------------------------------------
# The oracle
# ----------------------------------------------------------------------------------------------------------------


def decode(mask: torch.Tensor, shape: tuple[int, int, int, int]) -> tuple[torch.Tensor, bool]:
    """(attend broadcast to ``shape``, malformed) straight from the mask's values."""
    if mask.dtype == torch.bool:
        return mask.expand(shape), False
    values = mask.to(torch.float64)
    attend = values == 0
    blocked = torch.isneginf(values) | (values == torch.finfo(mask.dtype).min)
    return attend.expand(shape), not bool((attend | blocked).all())


def canonical(q_len: int, kv_len: int, window_left: int) -> list[torch.Tensor]:
    patterns = [torch.ones(q_len, kv_len, dtype=torch.bool)]
    if q_len <= kv_len:
        patterns.append(hf_causal(q_len, kv_len))
        if window_left >= 0:
            patterns.append(hf_causal(q_len, kv_len, window_left))
    return patterns


def label(text: str) -> None:
    """A Hypothesis event (for --hypothesis-show-statistics) when called from a property test."""
    if currently_in_test_context():
        event(text)


def check_classify(mask, batch, heads, q_len, kv_len, window_left):
    """classify_mask's answer, asserted sound and complete."""
    decision = classify_mask(mask, batch, heads, q_len, kv_len, window_left)
    attend, malformed = decode(mask, (batch, heads, q_len, kv_len))
    windowed = decision is not None and decision.window_size[0] >= 0
    label(f"classify: {'malformed' if malformed else 'well-formed'} -> {decision and (decision[0], windowed)}")
    if malformed:
        assert decision is None, "a mask with values other than 0 / -inf / finfo.min was converted"
        return decision
    if decision is None:
        for pattern in canonical(q_len, kv_len, window_left):
            assert not bool((attend == pattern).all()), f"missed a canonical pattern:\n{pattern.int()}"
        return decision
    mask_type, window = decision
    assert mask_type in ("no_mask", "causal", "causal_bottom_right")
    if mask_type == "no_mask":
        assert window == (-1, -1)
    else:
        assert window[1] == 0 and (window[0] == -1 or window[0] >= 0)
    pattern = te_pattern(mask_type, window, q_len, kv_len)
    assert bool(pattern.any(-1).all()), "decision has queries with no visible key (SDPA and TE disagree there)"
    assert bool((attend == pattern).all()), f"unsound decision {decision} for\n{attend.int()}"
    return decision


def check_detect(mask: torch.Tensor, window_size: tuple[int, int]):
    """_detect_causal_mask's answer, asserted sound and complete (on 4D masks)."""
    result = _detect_causal_mask(mask, window_size)
    batch, heads, q_len, kv_len = mask.shape
    attend, malformed = decode(mask, tuple(mask.shape))
    label(f"detect: {'malformed' if malformed else 'well-formed'} -> {result[1] if result else None}")
    if malformed or q_len != kv_len:
        assert result is None
        return result
    if result is None:
        for pattern in canonical(q_len, kv_len, window_size[0])[1:]:
            assert not bool((attend == pattern).all()), f"missed causal pattern:\n{pattern.int()}"
        return result
    mask_type, window = result
    assert mask_type == "causal" and window[1] == 0
    assert bool((attend == te_pattern("causal", window, q_len, kv_len)).all()), f"unsound {result}"
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


# ----------------------------------------------------------------------------------------------------------------
# Mask strategies
# ----------------------------------------------------------------------------------------------------------------

# canonical kinds are listed more than once: they are the ones where both soundness and completeness bite
KINDS = (
    ("all", "causal", "causal", "sliding_layer", "sliding_layer", "sliding_layer", "sliding_other", "top_left")
    + ("pad_left", "pad_right", "packed", "random")
)


@st.composite
def patterns(draw, batch: int, mask_heads: int, q_len: int, kv_len: int, window_left: int) -> torch.Tensor:
    """A bool (batch, mask_heads, q_len, kv_len) attend pattern of some kind, possibly with one flipped element."""
    kind = draw(st.sampled_from(KINDS))
    event(f"kind={kind}")
    if kind == "all":
        base = torch.ones(q_len, kv_len, dtype=torch.bool)
    elif kind == "causal":
        base = hf_causal(q_len, kv_len)
    elif kind == "sliding_layer":
        base = hf_causal(q_len, kv_len, window_left)
    elif kind == "sliding_other":
        base = hf_causal(q_len, kv_len, draw(st.integers(0, kv_len)))
    elif kind == "top_left":
        base = te_pattern("causal", (-1, 0), q_len, kv_len)
    elif kind == "random":
        base = None
    else:
        base = hf_causal(q_len, kv_len, draw(st.sampled_from([-1, window_left])))
    full = torch.empty(batch, mask_heads, q_len, kv_len, dtype=torch.bool)
    for b in range(batch):
        row = base
        if kind in ("pad_left", "pad_right"):
            pads = draw(st.integers(0, kv_len - 1))
            row = base.clone()
            if kind == "pad_left":
                row[:, :pads] = False
            else:
                row[:, kv_len - pads :] = False
        elif kind == "packed":
            cuts = sorted(draw(st.sets(st.integers(1, max(1, kv_len - 1)), max_size=3)))
            doc = torch.zeros(kv_len, dtype=torch.long)
            for cut in cuts:
                doc[cut:] += 1
            query_doc = doc[kv_len - q_len :] if q_len <= kv_len else torch.zeros(q_len, dtype=torch.long)
            row = base & (query_doc[:, None] == doc[None, :])
        elif kind == "random":
            seed = draw(st.integers(0, 2**16))
            row = torch.rand(q_len, kv_len, generator=torch.Generator().manual_seed(seed)) < 0.7
        full[b] = row
    if draw(st.integers(0, 3)) == 0:  # one flipped element anywhere
        b, h = draw(st.integers(0, batch - 1)), draw(st.integers(0, mask_heads - 1))
        i, j = draw(st.integers(0, q_len - 1)), draw(st.integers(0, kv_len - 1))
        full[b, h, i, j] = ~full[b, h, i, j]
    return full


@st.composite
def encodings(draw, full: torch.Tensor) -> torch.Tensor:
    """The pattern as a bool or additive float mask (-inf / finfo.min), maybe with one malformed entry."""
    dtype = draw(st.sampled_from((torch.bool,) + FLOAT_DTYPES))
    if dtype == torch.bool:
        return full.clone()
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
    if draw(st.integers(0, 3)) == 0:  # a malformed entry: a finite penalty or a non-zero "attend" value
        index = tuple(draw(st.integers(0, n - 1)) for n in full.shape)
        mask[index] = draw(st.sampled_from([-1e4, -1.0, -100.0, 1e-3, 0.5, -1e-3, float("nan"), float("inf")]))
    return mask


@st.composite
def layouts(draw, mask: torch.Tensor) -> torch.Tensor:
    """The same values as an expanded (stride-0) view, a broadcastable smaller mask or a non-contiguous view."""
    options = ["as_is", "non_contiguous"]
    if torch.equal(mask, mask[:1].expand_as(mask)):
        options += ["expand_batch", "batch_one"]
        if mask.shape[1] == 1:
            options.append("two_dim")
    choice = draw(st.sampled_from(options))
    if choice == "non_contiguous":
        return mask.transpose(-1, -2).contiguous().transpose(-1, -2)
    if choice == "expand_batch":
        return mask[:1].expand_as(mask)
    if choice == "batch_one":
        return mask[:1].clone()
    if choice == "two_dim":
        return mask[0, 0].clone()
    return mask


@st.composite
def mask_cases(draw, max_len: int = 24, square: bool = False):
    batch = draw(st.integers(1, 3))
    heads = draw(st.integers(1, 3))
    mask_heads = draw(st.sampled_from([1, heads]))
    kv_len = draw(st.integers(1, max_len))
    if square:
        q_len = draw(st.one_of(st.just(kv_len), st.just(kv_len), st.integers(1, max_len)))
    else:
        q_len = draw(st.one_of(st.just(kv_len), st.integers(1, kv_len), st.integers(1, max_len)))
    window_left = draw(st.one_of(st.just(-1), st.integers(0, max(0, kv_len - 2)), st.integers(0, kv_len + 1)))
    full = draw(patterns(batch, mask_heads, q_len, kv_len, window_left))
    mask = draw(layouts(draw(encodings(full))))
    return mask, batch, heads, q_len, kv_len, window_left


# ----------------------------------------------------------------------------------------------------------------
# Property tests
# ----------------------------------------------------------------------------------------------------------------


@given(mask_cases())
@MORE_EXAMPLES
def test_classify_mask_is_exact(case):
    check_classify(*case)


@given(mask_cases(square=True))
@MORE_EXAMPLES
def test_detect_causal_mask_is_exact(case):
    mask, batch, heads, q_len, kv_len, window_left = case
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    check_detect(mask, (window_left, 0))


@st.composite
def hf_mask_cases(draw):
    batch = draw(st.integers(1, 3))
    q_len = draw(st.integers(1, 12))
    kv_len = q_len + draw(st.integers(0, 6))
    sliding = draw(st.one_of(st.none(), st.integers(1, kv_len + 1)))
    padding = draw(st.sampled_from(["none", "left", "right"]))
    dtype = draw(st.sampled_from((torch.bool,) + FLOAT_DTYPES[:3]))
    # the layer's window: the mask's (HF sliding_window w is TE's w - 1), none, or another one
    window_left = draw(st.sampled_from([sliding - 1 if sliding else -1, -1, draw(st.integers(0, kv_len))]))
    pads = [draw(st.integers(0, kv_len - 1)) for _ in range(batch)] if padding != "none" else [0] * batch
    return batch, q_len, kv_len, sliding, padding, pads, dtype, window_left


@given(hf_mask_cases())
@MORE_EXAMPLES
def test_classify_hf_masking_utils_masks(case):
    """Masks from transformers.masking_utils (sdpa_mask for bool, eager_mask for additive float masks)."""
    batch, q_len, kv_len, sliding, padding, pads, dtype, window_left = case
    attention_mask = None
    if padding != "none":
        attention_mask = torch.ones(batch, kv_len, dtype=torch.bool)
        for b, n in enumerate(pads):
            if n and padding == "left":
                attention_mask[b, :n] = False
            elif n:
                attention_mask[b, kv_len - n :] = False
    mask_function = masking_utils.causal_mask_function
    if sliding:
        mask_function = masking_utils.sliding_window_causal_mask_function(sliding)
    kwargs = dict(q_offset=kv_len - q_len, mask_function=mask_function, attention_mask=attention_mask)
    if dtype == torch.bool:
        mask = masking_utils.sdpa_mask(batch, q_len, kv_len, allow_is_causal_skip=False, **kwargs)
    else:
        mask = masking_utils.eager_mask(batch, q_len, kv_len, dtype=dtype, **kwargs)
    assert mask is not None
    decision = check_classify(mask, batch, 2, q_len, kv_len, window_left)
    if padding == "none" and (not sliding or window_left == sliding - 1 or sliding >= kv_len):
        expected_type = "causal" if q_len == kv_len else "causal_bottom_right"
        assert decision is not None
        if q_len > 1 or (sliding and sliding < kv_len):
            assert decision.mask_type == expected_type
    if padding != "none" and any(pads) and not sliding:
        assert decision is None  # a visible padded key (at least the last query sees every key)


def test_classify_masks_from_create_causal_mask():
    """The real entry points, with a config: full attention and a sliding-window (Mistral-style) layer."""
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
    assert check_classify(full, 2, 2, 6, 6, 2) == ("causal", (-1, 0))
    assert check_classify(sliding, 2, 2, 6, 6, 2) == ("causal", (2, 0))
    assert check_classify(sliding, 2, 2, 6, 6, -1) is None  # a full-attention layer given the sliding mask
    padded = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    mask = masking_utils.create_causal_mask(config, embeds, padded, None, positions, allow_is_causal_skip=False)
    assert check_classify(mask, 2, 2, 6, 6, -1) is None


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
    def decide(pattern, q_len, kv_len, window_left=-1, batch=2, heads=3):
        mask = encode(pattern, dtype, masked).view(1, 1, q_len, kv_len)
        return check_classify(mask, batch, heads, q_len, kv_len, window_left)

    assert decide(hf_causal(5, 5), 5, 5) == ("causal", (-1, 0))
    assert decide(hf_causal(5, 5), 5, 5, window_left=2) == ("causal", (-1, 0))
    assert decide(hf_causal(3, 7), 3, 7) == ("causal_bottom_right", (-1, 0))
    assert decide(hf_causal(6, 6, 2), 6, 6, window_left=2) == ("causal", (2, 0))
    assert decide(hf_causal(6, 6, 2), 6, 6, window_left=-1) is None
    assert decide(hf_causal(6, 6, 2), 6, 6, window_left=3) is None
    assert decide(hf_causal(3, 8, 2), 3, 8, window_left=2) == ("causal_bottom_right", (2, 0))
    assert decide(hf_causal(6, 6, 5), 6, 6, window_left=5) == ("causal", (-1, 0))  # the window covers everything
    assert decide(torch.ones(4, 6, dtype=torch.bool), 4, 6) == ("no_mask", (-1, -1))
    assert decide(torch.ones(1, 6, dtype=torch.bool), 1, 6) == ("no_mask", (-1, -1))  # decode
    assert decide(hf_causal(1, 6, 2), 1, 6, window_left=2) == ("causal_bottom_right", (2, 0))  # sliding decode
    assert decide(torch.ones(6, 4, dtype=torch.bool), 6, 4) == ("no_mask", (-1, -1))
    assert decide(hf_causal(6, 4), 6, 4) is None  # more queries than keys: empty rows
    assert decide(te_pattern("causal", (-1, 0), 3, 6), 3, 6) is None  # top-left is not what HF builds


@pytest.mark.parametrize(("dtype", "masked"), ENCODINGS)
@pytest.mark.parametrize(("q_len", "kv_len", "window_left"), [(5, 5, -1), (3, 6, -1), (6, 6, 2), (2, 6, 1)])
def test_every_single_flip_is_rejected(dtype, masked, q_len, kv_len, window_left):
    """Flip each element of a canonical mask, in one batch item and head of a (2, 2, ...) mask: never causal."""
    base = encode(hf_causal(q_len, kv_len, window_left), dtype, masked).expand(2, 2, q_len, kv_len).contiguous()
    assert check_classify(base, 2, 2, q_len, kv_len, window_left) is not None
    for b, h in ((0, 0), (1, 1)):
        for i in range(q_len):
            for j in range(kv_len):
                mask = base.clone()
                if dtype == torch.bool:
                    mask[b, h, i, j] = ~mask[b, h, i, j]
                else:
                    mask[b, h, i, j] = 0 if mask[b, h, i, j] != 0 else torch.finfo(dtype).min
                decision = check_classify(mask, 2, 2, q_len, kv_len, window_left)
                assert decision is None or decision.mask_type == "no_mask"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("value", [-1e4, -1.0, -30000.0, 1e-3, -1e-3, 0.5, float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["masked", "attended"])
def test_malformed_float_values_are_rejected(dtype, value, where):
    pattern = hf_causal(4, 4)
    mask = encode(pattern, dtype).view(1, 1, 4, 4)
    i, j = (0, 3) if where == "masked" else (3, 0)
    mask[0, 0, i, j] = value
    assert classify_mask(mask, 1, 1, 4, 4) is None
    assert _detect_causal_mask(mask, (-1, 0)) is None


def test_all_masked_penalty_mask_is_rejected_even_with_identical_penalties():
    """A constant -1e4 everywhere is harmless in SDPA but not 'attend': never silently taken as a pattern."""
    mask = torch.full((1, 1, 3, 3), -1e4)
    assert classify_mask(mask, 1, 1, 3, 3) is None


def test_unsupported_shapes_and_dtypes():
    causal = hf_causal(4, 4).view(1, 1, 4, 4)
    assert classify_mask(causal.int(), 1, 1, 4, 4) is None
    assert classify_mask(causal.view(1, 1, 1, 4, 4), 1, 1, 4, 4) is None
    assert classify_mask(causal, 1, 1, 4, 5) is None  # not broadcastable
    assert classify_mask(causal.expand(2, 1, 4, 4), 1, 1, 4, 4) is None  # larger than the call's batch
    assert classify_mask(causal.expand(2, 3, 4, 4), 2, 2, 4, 4) is None
    assert check_classify(causal[0, 0], 2, 2, 4, 4, -1) == ("causal", (-1, 0))  # 2D broadcasts
    assert check_classify(causal[0], 2, 2, 4, 4, -1) == ("causal", (-1, 0))
    assert check_classify(torch.tensor(True), 2, 2, 4, 4, -1) == ("no_mask", (-1, -1))
    assert _detect_causal_mask(causal[0], (-1, 0)) is None  # 3D
    assert _detect_causal_mask(hf_causal(3, 5).view(1, 1, 3, 5), (-1, 0)) is None  # q_len != kv_len


def test_expanded_views():
    causal = hf_causal(5, 5)
    for view in (
        causal.view(1, 1, 5, 5).expand(3, 1, 5, 5),
        causal.view(1, 1, 5, 5).expand(3, 4, 5, 5),
        causal.view(1, 1, 1, 5, 5).expand(1, 3, 1, 5, 5)[0],
        encode(causal, torch.bfloat16).view(1, 1, 5, 5).expand(2, 4, 5, 5),
    ):
        assert view.stride()[0] == 0 or view.stride()[1] == 0
        assert check_classify(view, view.shape[0], view.shape[1], 5, 5, -1) == ("causal", (-1, 0))
        assert check_detect(view, (-1, 0)) == ("causal", (-1, 0))
    # a batch-expanded view of a mask whose heads differ: the per-head difference must still be seen
    per_head = torch.stack([causal, hf_causal(5, 5, 1)]).view(1, 2, 5, 5).expand(3, 2, 5, 5)
    assert check_classify(per_head, 3, 2, 5, 5, 1) is None
    assert check_classify(per_head, 3, 2, 5, 5, -1) is None


@pytest.mark.parametrize("window_left", [-1, 0, 2, 4])
def test_detect_causal_mask_decisions(window_left):
    causal = hf_causal(5, 5).view(1, 1, 5, 5)
    assert check_detect(causal.expand(2, 3, 5, 5), (window_left, 0)) == ("causal", (-1, 0))
    causal_fp16 = encode(hf_causal(5, 5), torch.float16).view(1, 1, 5, 5)
    assert check_detect(causal_fp16, (window_left, 0)) == ("causal", (-1, 0))
    sliding = hf_causal(5, 5, window_left).view(1, 1, 5, 5)
    expected = ("causal", (window_left, 0)) if 0 <= window_left < 4 else ("causal", (-1, 0))
    assert check_detect(sliding, (window_left, 0)) == expected
    assert check_detect(torch.ones(1, 1, 5, 5, dtype=torch.bool), (window_left, 0)) is None  # no_mask is not causal
    padded = causal.clone()
    padded[..., 0] = False
    assert check_detect(padded, (window_left, 0)) is None


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
    masks._CACHE.clear()
    calls = []
    real = masks._classify

    def counting(mask, q_len, kv_len, window_left):
        calls.append((q_len, kv_len, window_left))
        return real(mask, q_len, kv_len, window_left)

    monkeypatch.setattr(masks, "_classify", counting)
    with masks.cached_decisions():  # as inside an injected model's forward
        yield calls
    masks._CACHE.clear()


def test_cache_hit_for_the_same_mask_object(classify_calls):
    mask = hf_causal(6, 6).view(1, 1, 6, 6).expand(2, 1, 6, 6)
    for _ in range(5):  # e.g. one call per layer
        assert classify_mask(mask, 2, 4, 6, 6) == ("causal", (-1, 0))
    assert len(classify_calls) == 1
    # an equal mask that is another object is classified again
    assert classify_mask(mask.clone(), 2, 4, 6, 6) == ("causal", (-1, 0))
    assert len(classify_calls) == 2


def test_decisions_end_with_the_outermost_forward():
    """Was: a classified mask kept a weak reference until the next forward began, so torch.utils.swap_tensors
    refused it between forwards."""
    mask, other = hf_causal(6, 6).view(1, 1, 6, 6).clone(), torch.ones(1, 1, 6, 6, dtype=torch.bool)
    with masks.cached_decisions():
        assert classify_mask(mask, 1, 1, 6, 6) == ("causal", (-1, 0))
        with pytest.raises(RuntimeError, match="weakref"):  # the cached decision holds one during the forward
            torch.utils.swap_tensors(mask, other)
    torch.utils.swap_tensors(mask, other)
    assert bool(mask.all()) and classify_mask(mask, 1, 1, 6, 6) == ("no_mask", (-1, -1))


def test_cache_key_includes_the_call_shape_and_window(classify_calls):
    mask = hf_causal(6, 6, 2).view(1, 1, 6, 6)
    assert classify_mask(mask, 1, 1, 6, 6, 2) == ("causal", (2, 0))
    assert classify_mask(mask, 1, 1, 6, 6, -1) is None
    assert classify_mask(mask, 1, 1, 6, 6, 3) is None
    assert len(classify_calls) == 3
    assert classify_mask(mask, 1, 1, 6, 6, 2) == ("causal", (2, 0))
    assert classify_mask(mask, 3, 8, 6, 6, 2) == ("causal", (2, 0))  # broadcast over another batch / heads
    assert len(classify_calls) == 3
    # broadcasting a (1, 1, 1, kv) decode mask over different query counts must not reuse the decision
    decode_mask = torch.ones(1, 1, 1, 6, dtype=torch.bool)
    assert classify_mask(decode_mask, 1, 1, 1, 6) == ("no_mask", (-1, -1))
    assert classify_mask(decode_mask, 1, 1, 3, 6) == ("no_mask", (-1, -1))
    assert len(classify_calls) == 5


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.bfloat16])
def test_cache_sees_in_place_writes(classify_calls, dtype):
    mask = encode(hf_causal(5, 5), dtype).view(1, 1, 5, 5).contiguous()
    assert classify_mask(mask, 1, 2, 5, 5) == ("causal", (-1, 0))
    version = mask._version
    mask[0, 0, 0, 4] = True if dtype == torch.bool else 0.0  # un-mask a future key
    assert mask._version != version
    assert check_classify(mask, 1, 2, 5, 5, -1) is None
    mask.copy_(encode(hf_causal(5, 5), dtype).view(1, 1, 5, 5))  # restore
    assert classify_mask(mask, 1, 2, 5, 5) == ("causal", (-1, 0))
    assert len(classify_calls) == 3
    mask.fill_(True if dtype == torch.bool else 0.0)
    assert classify_mask(mask, 1, 2, 5, 5) == ("no_mask", (-1, -1))
    assert len(classify_calls) == 4


def test_cache_sees_writes_through_another_view(classify_calls):
    """Views share the version counter: a write to the base invalidates the decision for the expanded view."""
    base = hf_causal(4, 4).view(1, 1, 4, 4).clone()
    view = base.expand(3, 1, 4, 4)
    assert classify_mask(view, 3, 2, 4, 4) == ("causal", (-1, 0))
    base[..., 0] = False  # padding at the first key
    assert check_classify(view, 3, 2, 4, 4, -1) is None
    assert len(classify_calls) == 2


def test_cache_entries_are_freed_with_the_mask(classify_calls):
    before = len(masks._CACHE._entries)
    mask = hf_causal(4, 4).view(1, 1, 4, 4).clone()
    classify_mask(mask, 1, 1, 4, 4)
    classify_mask(mask, 1, 1, 4, 4, 1)
    assert len(masks._CACHE._entries) == before + 2
    del mask
    assert len(masks._CACHE._entries) == before


def test_inference_mode_tensors(classify_calls):
    with torch.inference_mode():
        mask = hf_causal(5, 5).view(1, 1, 5, 5).clone()
        assert mask.is_inference()
        assert classify_mask(mask, 1, 2, 5, 5) == ("causal", (-1, 0))
        mask[0, 0, 1, 3] = True  # no version counter to see this: the decision must not be cached
        assert check_classify(mask, 1, 2, 5, 5, -1) is None
        mask[0, 0, 1, 3] = False
        assert classify_mask(mask, 1, 2, 5, 5) == ("causal", (-1, 0))
        # a normal tensor classified inside inference mode
    normal = hf_causal(5, 5).view(1, 1, 5, 5).clone()
    with torch.inference_mode():
        assert classify_mask(normal, 1, 2, 5, 5) == ("causal", (-1, 0))
    assert classify_mask(mask, 1, 2, 5, 5) == ("causal", (-1, 0))  # outside inference mode, still correct
    assert classify_mask(normal, 1, 2, 5, 5) == ("causal", (-1, 0))
    assert len(classify_calls) == 5  # every inference tensor call, plus the normal tensor once


def test_nothing_is_cached_outside_a_forward(classify_calls):
    """The SDPA replacement called on its own (no injected forward around it) decides every call afresh: a mask
    refilled through ``.data`` between two calls keeps its version counter and would reuse a stale decision."""
    mask = hf_causal(6, 6).view(1, 1, 6, 6).clone()
    stack = list(masks._scope_stack())
    masks._scope_stack().clear()  # out of the fixture's scope
    try:
        assert classify_mask(mask, 1, 2, 6, 6) == ("causal", (-1, 0))
        mask.data[0, 0, 3:, :3] = False  # two documents, version unchanged
        assert classify_mask(mask, 1, 2, 6, 6) is None
    finally:
        masks._scope_stack()[:] = stack
    assert len(classify_calls) == 2


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
    assert decide() == ("causal", (-1, 0))
    masks.leave_forward(layer)
    mask.data[0, 0, 3:, :3] = False  # a refill inside one forward is not seen (decided once per forward) ...
    masks.enter_forward(other_layer, parent=decoder)
    assert decide() == ("causal", (-1, 0))
    # ... an interrupted forward (KeyboardInterrupt skips the forward hooks) never leaves: the next forward that is
    # not called from the stack top starts afresh, whether it is the model or a layer called on its own
    masks.enter_forward(layer, parent=decoder)
    assert decide() is None
    mask.data.copy_(hf_causal(6, 6))
    masks.enter_forward(model)
    assert decide() == ("causal", (-1, 0))
    masks.leave_forward(model)
    assert not masks._scope_stack()


def test_cache_is_consistent_across_threads():
    masks._CACHE.clear()
    shared = [hf_causal(8, 8, w).view(1, 1, 8, 8).clone() for w in (-1, 2, 5)]
    errors = []
    barrier = threading.Barrier(4)

    def worker(seed):
        barrier.wait()
        gen = torch.Generator().manual_seed(seed)
        for n in range(60):
            which = int(torch.randint(0, 3, (1,), generator=gen))
            window = (-1, 2, 5)[int(torch.randint(0, 3, (1,), generator=gen))]
            mask = shared[which] if n % 2 else shared[which].clone()
            try:
                with masks.cached_decisions():  # each thread's forwards start and end on their own
                    check_classify(mask, 1, 2, 8, 8, window)
                    check_classify(mask, 1, 2, 8, 8, window)
            except AssertionError as error:  # pragma: no cover - reported below
                errors.append(error)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    masks._CACHE.clear()
