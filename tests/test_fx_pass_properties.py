"""Property tests of the te_attn FX pass on generated attention modules (CPU, fp32, reference executor).

Hypothesis draws small attention modules: q/k/v projections in several layouts, MHA / GQA / MQA with repeat_kv
written several ways (and a wrong tiling that must not be elided), masks built in the graph in many ways, masks that
are graph inputs, padding masks ANDed in like HF, scales, windows, and keys that extend before the queries (a prefix
of cached / memory tokens: q_len < kv_len, HF's bottom-right causal alignment). For every module:

* it compiles with ``fullgraph=True``;
* the compiled output (and the input gradient) equals eager SDPA's;
* the compile report's decision, mask kind, window and head counts equal an independent oracle that decides from the
  generated parameters alone (analytically, never by running the pass's classifier) whether the rewrite is safe.

Deterministic tests at the end pin the cases the oracle singles out, and regressions of bugs found here.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import te_fx
from te_fx.core.reasons import REASONS

OPTIONS = {"executor": "reference", "inner": "aot_eager"}
TOL = dict(rtol=1e-5, atol=1e-5)
EMBED = 16
PADDING_REASON = "fallback_mask"


def _examples(n: int) -> int:
    """``n`` examples under the "ci" profile (40), proportionally more under larger profiles."""
    return max(n, settings.default.max_examples * n // 40)


def _settings(n: int):
    return settings(max_examples=_examples(n), suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------------------------- generated modules

LAYOUTS = ("transpose", "transpose_fn", "transpose_neg", "permute", "transpose_contiguous", "bhsd_view")
ELIDABLE_REPEATS = ("hf_index", "hf_index_ellipsis", "unsqueeze", "unsqueeze_neg", "hf_contiguous",
                    "repeat_interleave", "repeat_interleave_fn", "repeat_interleave_kw")  # fmt: skip
TILING_REPEATS = ("tile_repeat", "tile_expand")  # head h reads KV head h % KV: correct for SDPA, not repeat_kv
# masks without an input tensor. offset: "kv <= q + offset" forms; window: sliding window w (q - w < kv <= q)
OFFSET_MASKS = ("tril", "tril_float_bool", "index_le", "index_ge", "not_triu")
SLIDING_MASKS = ("sliding", "sliding_where")
SDPA_ONLY_MASKS = ("float_additive", "float_zero", "rand", "input_4d", "input_2d", "buffer_4d")
PADDING_STYLES = ("hf_gather", "broadcast", "ne0", "to_bool")
PADDING_WRONG = ("query_axis", "or_not", "float_bias", "padding_only")
PAD_PATTERNS = ("ones", "right", "left", "holes", "empty_row")


@dataclasses.dataclass(frozen=True)
class Spec:
    batch: int
    seq: int
    heads: int
    kv_heads: int
    head_dim: int
    layout: str = "transpose"
    k_repeat: str = "none"  # a repeat style, "none" (MHA) or "enable_gqa" (K/V keep their heads)
    v_repeat: str = "none"
    mask: str = "none"  # "none", "is_causal", OFFSET_MASKS, SLIDING_MASKS, SDPA_ONLY_MASKS, "padding"
    kv_prefix: int = 0  # keys/values of kv_prefix memory tokens before the sequence: kv_len = seq + kv_prefix
    offset: int = 0
    window: int = 1
    mask_expand: str = "none"  # "none": (1, 1, S, S); "batch": expanded to (B, 1, S, S); "heads": to (B, H, S, S)
    padding_style: str = "broadcast"
    padding_base: str = "causal"  # "causal" or "sliding"
    pad_pattern: str = "ones"
    pad_dtype: str = "long"
    scale: float | None = None
    with_grad: bool = False
    seed: int = 0

    @property
    def gqa(self) -> bool:
        return self.k_repeat == "enable_gqa"


def _pad_mask(spec: Spec) -> torch.Tensor:
    """The (B, S) 2D attention mask, nonzero = keep."""
    b, s = spec.batch, spec.seq
    mask = torch.ones(b, s, dtype=torch.long)
    cut = max(1, s // 3)
    if spec.pad_pattern == "right":
        mask[0, s - cut :] = 0
    elif spec.pad_pattern == "left":
        mask[-1, :cut] = 0
    elif spec.pad_pattern == "holes":
        mask[0, cut : 2 * cut] = 0
        mask[-1, ::3] = 0
    elif spec.pad_pattern == "empty_row":
        mask[0] = 0
    if spec.pad_dtype == "bool":
        return mask.bool()
    return mask.to(torch.int32 if spec.pad_dtype == "int32" else torch.long)


class GeneratedAttention(nn.Module):
    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.spec = spec
        self.q_proj = nn.Linear(EMBED, spec.heads * spec.head_dim)
        self.k_proj = nn.Linear(EMBED, spec.kv_heads * spec.head_dim)
        self.v_proj = nn.Linear(EMBED, spec.kv_heads * spec.head_dim)
        self.memory = nn.Parameter(torch.randn(spec.kv_prefix, EMBED)) if spec.kv_prefix else None
        if spec.mask == "buffer_4d":
            causal = torch.ones(spec.seq, spec.seq + spec.kv_prefix, dtype=torch.bool).tril(spec.kv_prefix)
            self.register_buffer("causal", causal[None, None])

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        b, s, _ = x.shape
        d, layout = self.spec.head_dim, self.spec.layout
        if layout == "bhsd_view":  # a different (legal) split of the projection: no transpose at all
            return x.view(b, n, s, d)
        x = x.view(b, s, n, d)
        if layout == "transpose":
            return x.transpose(1, 2)
        if layout == "transpose_fn":
            return torch.transpose(x, 1, 2)
        if layout == "transpose_neg":
            return x.transpose(-3, -2)
        if layout == "permute":
            return x.permute(0, 2, 1, 3)
        if layout == "transpose_contiguous":
            return x.transpose(1, 2).contiguous()
        raise AssertionError(layout)

    def _repeat(self, x: torch.Tensor, style: str) -> torch.Tensor:
        b, kv, s, d = x.shape
        n = self.spec.heads // kv
        if style in ("none", "enable_gqa"):
            return x
        if style == "hf_index":
            return x[:, :, None, :, :].expand(b, kv, n, s, d).reshape(b, kv * n, s, d)
        if style == "hf_index_ellipsis":
            return x[:, :, None, ...].expand(b, kv, n, s, d).reshape(b, kv * n, s, d)
        if style == "unsqueeze":
            return x.unsqueeze(2).expand(b, kv, n, s, d).reshape(b, kv * n, s, d)
        if style == "unsqueeze_neg":
            return torch.unsqueeze(x, -3).expand(b, kv, n, s, d).reshape(b, kv * n, s, d)
        if style == "hf_contiguous":
            return x[:, :, None].expand(b, kv, n, s, d).reshape(b, kv * n, s, d).contiguous()
        if style == "repeat_interleave":
            return x.repeat_interleave(n, dim=1)
        if style == "repeat_interleave_fn":
            return torch.repeat_interleave(x, n, 1)
        if style == "repeat_interleave_kw":
            return x.repeat_interleave(repeats=n, dim=-3)
        if style == "tile_repeat":
            return x.repeat(1, n, 1, 1)
        if style == "tile_expand":
            return x[:, None].expand(b, n, kv, s, d).reshape(b, n * kv, s, d)
        raise AssertionError(style)

    def _expand(self, mask: torch.Tensor, b: int) -> torch.Tensor:
        mask = mask if mask.dim() == 4 else mask[None, None]
        if self.spec.mask_expand == "batch":
            return mask.expand(b, 1, -1, -1)
        if self.spec.mask_expand == "heads":
            return mask.expand(b, self.spec.heads, -1, -1)
        return mask

    def _mask(self, b: int, s: int, attention_mask, input_mask) -> torch.Tensor | None:
        spec, kind = self.spec, self.spec.mask
        prefix = spec.kv_prefix
        kv_len = s + prefix
        q_idx = torch.arange(s)[:, None] + prefix  # query i sits at key position prefix + i (bottom right)
        kv_idx = torch.arange(kv_len)[None, :]
        if kind in ("none", "is_causal"):
            return None
        if kind == "tril":
            return self._expand(torch.ones(s, kv_len, dtype=torch.bool).tril(prefix + spec.offset), b)
        if kind == "tril_float_bool":
            return self._expand(torch.ones(s, kv_len).tril(diagonal=prefix + spec.offset).bool(), b)
        if kind == "index_le":
            return self._expand(kv_idx <= q_idx + spec.offset, b)
        if kind == "index_ge":
            return self._expand(q_idx + spec.offset >= kv_idx, b)
        if kind == "not_triu":
            return self._expand(~torch.ones(s, kv_len, dtype=torch.bool).triu(prefix + spec.offset + 1), b)
        if kind == "sliding":
            return self._expand((kv_idx > q_idx - spec.window) & (kv_idx <= q_idx), b)
        if kind == "sliding_where":
            distance = q_idx - kv_idx
            return self._expand(torch.where(distance < 0, False, distance < spec.window), b)
        if kind == "float_additive":
            return self._expand(torch.zeros(s, kv_len).masked_fill(kv_idx > q_idx, float("-inf")), b)
        if kind == "float_zero":  # an all-zero float mask: "no mask" in value, never converted (float)
            return self._expand(torch.zeros(s, kv_len), b)
        if kind == "rand":
            return self._expand(torch.rand(s, kv_len) > 0.5, b)
        if kind in ("input_4d", "input_2d"):
            return input_mask
        if kind == "buffer_4d":
            return self._expand(self.causal, b)
        if kind == "padding":
            assert prefix == 0, "padding specs are self-attention"
            return self._padding_mask(b, s, q_idx, kv_idx, attention_mask)
        raise AssertionError(kind)

    def _padding_mask(self, b, s, q_idx, kv_idx, attention_mask) -> torch.Tensor:
        spec = self.spec
        base = kv_idx <= q_idx
        if spec.padding_base == "sliding":
            base = base & (kv_idx > q_idx - spec.window)
        base = base[None, None]
        style = spec.padding_style
        if style == "hf_gather":  # HF's sdpa_mask: attention_mask[batch_idx, kv_idx] on broadcast index tensors
            batch_idx = torch.arange(b)[:, None, None, None]
            padding = attention_mask[batch_idx, kv_idx[None, None]].bool()
            return base & padding
        if style == "broadcast":
            return base & attention_mask[:, None, None, :].bool()
        if style == "ne0":
            return (attention_mask != 0)[:, None, None, :] & base
        if style == "to_bool":
            return base.expand(b, 1, s, s) & attention_mask.to(torch.bool)[:, None, None, :]
        if style == "query_axis":  # pads queries, not keys
            return base & attention_mask[:, None, :, None].bool()
        if style == "or_not":
            return base | ~attention_mask[:, None, None, :].bool()
        if style == "float_bias":
            return torch.zeros(b, 1, s, s).masked_fill(~(base & attention_mask[:, None, None, :].bool()), float("-inf"))
        if style == "padding_only":  # key padding without causality: TE has no rewrite for it here
            return attention_mask[:, None, None, :].bool().expand(b, 1, s, s)
        raise AssertionError(style)

    def forward(self, x, attention_mask=None, input_mask=None):
        b, s, _ = x.shape
        spec = self.spec
        kv_in = x if self.memory is None else torch.cat([self.memory.expand(b, -1, -1), x], dim=1)
        q = self._heads(self.q_proj(x), spec.heads)
        k = self._repeat(self._heads(self.k_proj(kv_in), spec.kv_heads), spec.k_repeat)
        v = self._repeat(self._heads(self.v_proj(kv_in), spec.kv_heads), spec.v_repeat)
        mask = self._mask(b, s, attention_mask, input_mask)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=spec.mask == "is_causal", scale=spec.scale, enable_gqa=spec.gqa
        )
        return out.transpose(1, 2).reshape(b, s, spec.heads * spec.head_dim)


# --------------------------------------------------------------------------------------------- the oracle


def _causal_kind(prefix: int) -> str:
    """TE's causal type: top-left and bottom-right coincide for q_len == kv_len; with a key prefix HF's causal
    mask is aligned bottom-right."""
    return "causal" if prefix == 0 else "causal_bottom_right"


def _offset_mask_kind(seq: int, offset: int, prefix: int = 0) -> tuple[str, tuple[int, int]] | None:
    """'kv <= q + prefix + offset' for seq queries (at key positions prefix + i) and seq + prefix keys."""
    if offset >= seq - 1:
        return "no_mask", (-1, -1)  # the first query already sees the last key
    if offset == 0:
        return _causal_kind(prefix), (-1, 0)
    return None  # offset < 0: the diagonal is missing; 0 < offset < seq - 1: keys after the diagonal


def _sliding_mask_kind(seq: int, window: int, prefix: int = 0) -> tuple[str, tuple[int, int]] | None:
    """'q - window < kv <= q' (window >= 1: a query sees itself and window - 1 keys before), positions as above."""
    if seq == 1 and window >= prefix + 1:
        return "no_mask", (-1, -1)  # one query that sees every key
    if window >= seq + prefix:
        return _causal_kind(prefix), (-1, 0)  # the window cuts nothing off
    return _causal_kind(prefix), (window - 1, 0)


def oracle(spec: Spec) -> dict:
    """What the report must say for ``spec``: decision, and for "te" mask_kind, window_size, num_kv_heads."""
    kind = spec.mask
    sdpa = {"decision": "sdpa"}
    if kind == "none":
        decided = ("no_mask", (-1, -1))
    elif kind == "is_causal":
        # SDPA's is_causal is top-left aligned: with a key prefix the keys past q_len are never seen, and TE's
        # causal runs on the first q_len keys; there is nothing to evaluate, so it is "causal" even at seq 1
        decided = ("causal", (-1, 0))
    elif kind in OFFSET_MASKS:
        decided = _offset_mask_kind(spec.seq, spec.offset, spec.kv_prefix)
    elif kind in SLIDING_MASKS:
        decided = _sliding_mask_kind(spec.seq, spec.window, spec.kv_prefix)
    elif kind in SDPA_ONLY_MASKS:
        # float masks, random masks and masks whose values are graph inputs are never converted
        decided = None
    elif kind == "padding":
        if spec.padding_style in PADDING_WRONG:
            decided = None
        else:
            base = _sliding_mask_kind(spec.seq, spec.window) if spec.padding_base == "sliding" else (
                _offset_mask_kind(spec.seq, 0))  # fmt: skip
            if base[0] != "causal":  # seq 1 (causal == all visible): key padding on it runs in inference only
                return {**sdpa, "reason": PADDING_REASON}
            decided = ("padding_causal", base[1])
    else:
        raise AssertionError(kind)
    if decided is None:
        return sdpa
    elided = spec.gqa or (spec.k_repeat in ELIDABLE_REPEATS and spec.v_repeat in ELIDABLE_REPEATS)
    return {
        "decision": "te",
        "reason": "rewritten",
        "mask_kind": decided[0],
        "window_size": decided[1],
        "num_heads": spec.heads,
        "num_kv_heads": spec.kv_heads if elided else spec.heads,
        "head_dim": spec.head_dim,
    }


# --------------------------------------------------------------------------------------------- running a spec


def _inputs(spec: Spec) -> tuple[torch.Tensor, dict]:
    generator = torch.Generator().manual_seed(spec.seed + 1)
    x = torch.randn(spec.batch, spec.seq, EMBED, generator=generator)
    kwargs = {}
    if spec.mask == "padding":
        kwargs["attention_mask"] = _pad_mask(spec)
    causal = torch.ones(spec.seq, spec.seq + spec.kv_prefix, dtype=torch.bool).tril(spec.kv_prefix)
    if spec.mask == "input_4d":
        kwargs["input_mask"] = causal[None, None]
    elif spec.mask == "input_2d":  # (S, S + P): the shape of a 2D padding mask when batch == seq
        kwargs["input_mask"] = causal
    return x, kwargs


def _compared_rows(spec: Spec) -> torch.Tensor:
    """(B, S) query positions whose outputs must match: all, except padding positions inside a row ("holes"), which
    the key-padding compaction documents as differing."""
    rows = torch.ones(spec.batch, spec.seq, dtype=torch.bool)
    if spec.mask == "padding" and spec.pad_pattern == "holes":
        rows = _pad_mask(spec) != 0
    return rows


def _run(module: nn.Module, spec: Spec, x: torch.Tensor, kwargs: dict, rows: torch.Tensor):
    x = x.clone().requires_grad_(spec.with_grad)
    torch.manual_seed(spec.seed)  # the "rand" mask draws the same values in eager and compiled runs
    out = module(x, **kwargs)
    grad = None
    if spec.with_grad:
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
        (out * weight)[rows].sum().backward()
        grad = x.grad
    return out.detach(), grad


def check_spec(spec: Spec) -> dict:
    """Compile the spec's module, compare with eager, compare the report with the oracle; returns the entry."""
    torch._dynamo.reset()
    te_fx.reset_compile_report()
    torch.manual_seed(spec.seed)
    module = GeneratedAttention(spec)
    x, kwargs = _inputs(spec)
    rows = _compared_rows(spec)
    ref, ref_grad = _run(module, spec, x, kwargs, rows)
    compiled = torch.compile(module, backend="te_attn", options=OPTIONS, fullgraph=True, dynamic=False)
    out, grad = _run(compiled, spec, x, kwargs, rows)
    report = te_fx.compile_report()
    assert len(report) == 1, report
    entry = report[0]
    expected = oracle(spec)
    assert {key: entry[key] for key in expected} == expected, (spec, entry)
    assert entry["executor"] == "reference"
    if entry["decision"] == "sdpa":
        assert entry["reason"] in REASONS and entry["detail"], entry
        assert entry["mask_kind"] is None and entry["window_size"] is None, entry
    assert torch.isfinite(ref[rows]).all()
    torch.testing.assert_close(out[rows], ref[rows], **TOL)
    if spec.with_grad:
        torch.testing.assert_close(grad, ref_grad, **TOL)
    return entry


# --------------------------------------------------------------------------------------------- strategies


@st.composite
def _heads(draw) -> tuple[int, int, str, str]:
    """(heads, kv_heads, k_repeat, v_repeat)."""
    heads = draw(st.sampled_from([2, 4]))
    kv_heads = draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0]))
    if kv_heads == heads:
        return heads, kv_heads, "none", "none"
    if draw(st.booleans()) and draw(st.booleans()):
        return heads, kv_heads, "enable_gqa", "enable_gqa"
    repeats = ELIDABLE_REPEATS + TILING_REPEATS
    k_repeat = draw(st.sampled_from(repeats))
    v_repeat = k_repeat if draw(st.booleans()) else draw(st.sampled_from(repeats))
    return heads, kv_heads, k_repeat, v_repeat


SEQ_LENS = st.sampled_from([8, 5, 11, 3, 2, 1])  # Hypothesis favours the first values


def _base(draw, seq=SEQ_LENS) -> dict:
    heads, kv_heads, k_repeat, v_repeat = draw(_heads())
    return dict(
        batch=draw(st.sampled_from([2, 1])),
        seq=draw(seq),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=draw(st.sampled_from([4, 8])),
        k_repeat=k_repeat,
        v_repeat=v_repeat,
        scale=draw(st.sampled_from([None, 0.37, 1.5])),
        with_grad=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


KV_PREFIXES = st.sampled_from([0, 0, 3, 1, 6])


@st.composite
def layout_specs(draw, layout: str) -> Spec:
    mask = draw(st.sampled_from(["none", "is_causal", "tril", "sliding"]))
    return Spec(**_base(draw), layout=layout, mask=mask, window=draw(st.integers(1, 6)), kv_prefix=draw(KV_PREFIXES))


@st.composite
def mask_specs(draw, mask: str) -> Spec:
    return Spec(
        **_base(draw),
        layout=draw(st.sampled_from(["transpose", "permute"])),
        mask=mask,
        kv_prefix=draw(KV_PREFIXES),
        offset=draw(st.sampled_from([0, 0, -1, 1, 2, 4, 7, 10, 12])),
        window=draw(st.integers(1, 12)),
        mask_expand=draw(st.sampled_from(["none", "batch", "heads"])),
    )


@st.composite
def padding_specs(draw, style: str) -> Spec:
    return Spec(
        **_base(draw),
        mask="padding",
        padding_style=style,
        padding_base=draw(st.sampled_from(["causal", "causal", "sliding"])),
        window=draw(st.integers(1, 12)),
        pad_pattern=draw(st.sampled_from(PAD_PATTERNS)),
        pad_dtype=draw(st.sampled_from(["long", "int32", "bool"])),
    )


# --------------------------------------------------------------------------------------------- properties


def _event_decision(entry: dict) -> None:
    """Hypothesis statistics (--hypothesis-show-statistics): how often each decision was exercised."""
    event(f"{entry['decision']} {entry['mask_kind'] or ''} {entry['window_size'] or ''}")


# The categorical dimension that matters most is a pytest parameter (every value is covered), the rest is drawn.


@pytest.mark.parametrize("layout", LAYOUTS)
@_settings(7)
@given(data=st.data())
def test_layouts_and_kv_head_elision(layout, data):
    spec = data.draw(layout_specs(layout))
    event(f"repeat {spec.k_repeat}/{spec.v_repeat}")
    _event_decision(check_spec(spec))


@pytest.mark.parametrize("mask", OFFSET_MASKS + SLIDING_MASKS + SDPA_ONLY_MASKS)
@_settings(5)
@given(data=st.data())
def test_masks_built_in_the_graph(mask, data):
    _event_decision(check_spec(data.draw(mask_specs(mask))))


@pytest.mark.parametrize("style", PADDING_STYLES + PADDING_WRONG)
@_settings(7)
@given(data=st.data())
def test_padding_masks(style, data):
    spec = data.draw(padding_specs(style))
    event(f"padding {spec.padding_base} {spec.pad_pattern}")
    _event_decision(check_spec(spec))


def test_oracle_sanity():
    """The oracle itself, on hand-checked cases (so a wrong oracle cannot hide a wrong pass)."""
    base = dict(batch=1, heads=4, kv_heads=2, head_dim=8, k_repeat="hf_index", v_repeat="hf_index")
    assert oracle(Spec(**base, seq=8, mask="tril")) == {
        "decision": "te", "reason": "rewritten", "mask_kind": "causal", "window_size": (-1, 0), "num_heads": 4,
        "num_kv_heads": 2, "head_dim": 8,
    }  # fmt: skip
    assert oracle(Spec(**base, seq=8, mask="sliding", window=3))["window_size"] == (2, 0)
    assert oracle(Spec(**base, seq=8, mask="sliding", window=8))["window_size"] == (-1, 0)
    assert oracle(Spec(**base, seq=8, mask="tril", offset=1)) == {"decision": "sdpa"}
    assert oracle(Spec(**base, seq=8, mask="tril", offset=7))["mask_kind"] == "no_mask"
    assert oracle(Spec(**{**base, "v_repeat": "tile_repeat"}, seq=8, mask="none"))["num_kv_heads"] == 4
    padded_sliding = oracle(Spec(**base, seq=8, mask="padding", padding_base="sliding", window=3))
    assert (padded_sliding["mask_kind"], padded_sliding["window_size"]) == ("padding_causal", (2, 0))
    assert oracle(Spec(**base, seq=1, mask="padding"))["decision"] == "sdpa"  # one token: causal is all-visible
    assert oracle(Spec(**base, seq=8, mask="padding"))["mask_kind"] == "padding_causal"
    assert oracle(Spec(**base, seq=3, mask="tril", kv_prefix=4))["mask_kind"] == "causal_bottom_right"
    assert oracle(Spec(**base, seq=3, mask="sliding", window=2, kv_prefix=4))["window_size"] == (1, 0)
    assert oracle(Spec(**base, seq=3, mask="sliding", window=7, kv_prefix=4))["window_size"] == (-1, 0)
    assert oracle(Spec(**base, seq=1, mask="sliding", window=5, kv_prefix=4))["mask_kind"] == "no_mask"
    assert oracle(Spec(**base, seq=1, mask="sliding", window=4, kv_prefix=4))["window_size"] == (3, 0)
    assert oracle(Spec(**base, seq=3, mask="is_causal", kv_prefix=4))["mask_kind"] == "causal"


# --------------------------------------------------------------------------------------------- pinned cases


@pytest.mark.parametrize(
    ("k_repeat", "v_repeat", "kv_heads_seen"),
    [("hf_index", "hf_index", 1), ("tile_repeat", "tile_repeat", 4), ("hf_index", "tile_expand", 4),
     ("repeat_interleave", "unsqueeze", 1)],
)  # fmt: skip
def test_wrong_tiling_is_not_elided(k_repeat, v_repeat, kv_heads_seen):
    """MQA with a tiling: for one KV head, tiling and repeat_kv agree; with 2 KV heads they differ (below)."""
    spec = Spec(batch=2, seq=7, heads=4, kv_heads=1, head_dim=8, k_repeat=k_repeat, v_repeat=v_repeat,
                mask="is_causal", with_grad=True)  # fmt: skip
    assert check_spec(spec)["num_kv_heads"] == kv_heads_seen


def test_tiling_differs_from_repeat_kv():
    """Guard for the property tests: with 2 KV heads a tiling is really another function than repeat_kv, so eliding
    it would change the output."""
    spec = Spec(batch=1, seq=6, heads=4, kv_heads=2, head_dim=8, k_repeat="tile_repeat", v_repeat="tile_repeat")
    torch.manual_seed(0)
    tiled = GeneratedAttention(spec)
    hf = GeneratedAttention(dataclasses.replace(spec, k_repeat="hf_index", v_repeat="hf_index"))
    hf.load_state_dict(tiled.state_dict())
    x, _ = _inputs(spec)
    assert (tiled(x) - hf(x)).abs().max() > 1e-2
    assert check_spec(spec)["num_kv_heads"] == 4


def test_mask_graph_input_is_never_rewritten():
    """A causal mask handed in as a forward argument: its values are unknown at compile time."""
    for kind in ("input_4d", "input_2d", "buffer_4d"):
        entry = check_spec(Spec(batch=2, seq=5, heads=2, kv_heads=2, head_dim=4, mask=kind))
        assert entry["decision"] == "sdpa", kind


def test_rank_2_mask_is_left_to_sdpa():
    """A 2D (S, S) causal mask (SDPA broadcasts it) is left on SDPA: the pass only converts 4D masks. Conservative,
    not wrong; pinned so that a change is noticed."""

    def attend(q, k, v):
        s = q.shape[2]
        idx = torch.arange(s)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=idx[None, :] <= idx[:, None])

    torch._dynamo.reset()
    te_fx.reset_compile_report()
    q, k, v = torch.randn(3, 1, 2, 5, 4).unbind(0)
    out = torch.compile(attend, backend="te_attn", options=OPTIONS, fullgraph=True)(q, k, v)
    torch.testing.assert_close(out, attend(q, k, v), **TOL)
    (entry,) = te_fx.compile_report()
    assert (entry["decision"], entry["reason"], entry["detail"]) == (
        "sdpa",
        "fallback_mask",
        "mask does not have the query/key shape",
    ), entry


def test_dropout_is_rewritten_with_dropout():
    """SDPA with dropout_p > 0 becomes TE attention with the same dropout (outputs are random: check statistics)."""

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.5, is_causal=True)

    torch._dynamo.reset()
    te_fx.reset_compile_report()
    q = k = torch.zeros(1, 2, 64, 4)
    v = torch.ones(1, 2, 64, 4)
    out = torch.compile(attend, backend="te_attn", options=OPTIONS, fullgraph=True)(q, k, v)
    (entry,) = te_fx.compile_report()
    assert entry["decision"] == "te" and entry["mask_kind"] == "causal"
    # each output row is (kept probability mass) / (1 - p): mean 1, not all rows 1, values in [0, 2]
    rows = out[..., 0]
    assert not torch.allclose(rows, torch.ones_like(rows))
    assert rows.min() >= 0 and rows.max() <= 2 + 1e-6
    assert abs(rows.mean().item() - 1.0) < 0.15


# --------------------------------------------------------------------------------------------- regressions
# Graphs where a careless rewrite gives a wrong output, a crash or a wrong decision; see the test's docstring.


def _compile_and_compare(fn, *args, seed: int | None = None):
    torch._dynamo.reset()
    te_fx.reset_compile_report()
    compiled = torch.compile(fn, backend="te_attn", options=OPTIONS, fullgraph=True, dynamic=False)
    if seed is not None:
        torch.manual_seed(seed)
    out = compiled(*args)
    if seed is not None:
        torch.manual_seed(seed)
    torch.testing.assert_close(out, fn(*args), **TOL)
    return te_fx.compile_report()


def test_bottom_right_causal_with_more_keys_than_queries():
    """HF's causal mask with a KV cache (queries at the end of the keys) is TE's causal_bottom_right. Was: the
    bottom-right pattern was classified but handed to TE as "causal", which is aligned top-left (wrong output)."""

    def attend(q, k, v):
        q_len, kv_len = q.shape[2], k.shape[2]
        q_pos = torch.arange(q_len)[:, None] + (kv_len - q_len)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(torch.arange(kv_len)[None, :] <= q_pos)[None, None])

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 4)
    (entry,) = _compile_and_compare(attend, q, k, v)
    assert (entry["decision"], entry["mask_kind"], entry["window_size"]) == ("te", "causal_bottom_right", (-1, 0))


def test_repeat_interleave_with_tensor_repeats_is_not_elided():
    """Was: a tensor of (non-uniform) repeats was elided as repeat_kv (wrong output)."""

    def attend(q, k, v):
        repeats = torch.tensor([1, 3])  # KV head 0 once, KV head 1 three times: not repeat_kv
        k = k.repeat_interleave(repeats, dim=1, output_size=4)
        v = v.repeat_interleave(repeats, dim=1, output_size=4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    (entry,) = _compile_and_compare(attend, q, k, v)
    assert entry["num_kv_heads"] == 4


def test_repeat_kv_with_unsqueeze_dim_keyword():
    """Was: ``unsqueeze(dim=2)`` (a keyword) crashed the pass with an IndexError, failing the whole compile."""

    def attend(q, k, v):
        b, kv, s, d = k.shape
        k = k.unsqueeze(dim=2).expand(b, kv, 2, s, d).reshape(b, kv * 2, s, d)
        v = torch.unsqueeze(v, dim=2).expand(b, kv, 2, s, d).reshape(b, kv * 2, s, d)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    torch.manual_seed(0)
    (entry,) = _compile_and_compare(attend, torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8))
    assert entry["decision"] == "te" and entry["num_kv_heads"] == 2


@pytest.mark.parametrize("draw", ["rand", "bernoulli", "dropout", "randint"])
def test_random_mask_is_never_rewritten(draw):
    """``causal & keep`` with a random ``keep`` that is almost always all True. Was: classified from one
    compile-time draw, so usually rewritten as plain causal, and wrong whenever a run drew a False."""

    def attend(x):
        s = x.shape[2]
        idx = torch.arange(s)
        if draw == "rand":
            keep = torch.rand(s, s) < 0.99
        elif draw == "bernoulli":
            keep = torch.bernoulli(torch.full((s, s), 0.99)).bool()
        elif draw == "dropout":
            keep = F.dropout(torch.ones(s, s), p=0.01, training=True) > 0
        else:
            keep = torch.randint(0, 100, (s, s)) > 0
        return F.scaled_dot_product_attention(x, x, x, attn_mask=((idx[None, :] <= idx[:, None]) & keep)[None, None])

    x = torch.randn(1, 2, 4, 8)
    for seed in range(3):
        (entry,) = _compile_and_compare(attend, x, seed=seed)
        assert entry["decision"] == "sdpa", entry


def test_dynamic_sliding_window_longer_than_the_sampled_sizes():
    """A window of 40 equals plain causal at small sizes. Was: the dynamic graph was classified at sizes up to 33
    only, rewritten as full causal, and wrong from 41 tokens on."""

    def attend(x):
        s = x.shape[2]
        idx = torch.arange(s)
        mask = (idx[None, :] <= idx[:, None]) & (idx[None, :] > idx[:, None] - 40)
        return F.scaled_dot_product_attention(x, x, x, attn_mask=mask[None, None])

    torch._dynamo.reset()
    te_fx.reset_compile_report()
    compiled = torch.compile(attend, backend="te_attn", options=OPTIONS, fullgraph=True)
    for seq in (16, 20, 64):  # the second length compiles the dynamic graph, the third reuses it
        x = torch.randn(1, 2, seq, 8)
        torch.testing.assert_close(compiled(x), attend(x), **TOL)
    static, dynamic = te_fx.compile_report()
    assert (static["decision"], static["window_size"]) == ("te", (-1, 0))  # exact at 16 tokens
    assert dynamic["decision"] == "sdpa" or dynamic["window_size"] == (39, 0), dynamic


def test_backward_through_an_inserted_transpose():
    """q/k/v built as (B, H, S, D) without a transpose (a plain view): the pass inserts transpose(1, 2). Was:
    te_fx::attention_bwd's fake strides (empty_like of the non-contiguous input) differed from the real contiguous
    gradients, and the backward's view failed at run time."""
    spec = Spec(batch=1, seq=3, heads=2, kv_heads=2, head_dim=4, layout="bhsd_view", mask="is_causal", with_grad=True)
    assert check_spec(spec)["decision"] == "te"


def test_a_windowed_padding_mask_inside_a_row_is_exact_with_and_without_dropout():
    """Dropout makes te_fx's op train-mode (it keeps what a backward needs) whatever the grad mode: a padding mask
    with a window, padded inside a row, runs the training route the op reads off the mask at run time; without
    dropout under no_grad, TE's key bias. Both equal SDPA (a dropout of 1e-12 drops nothing)."""
    window = 3

    def attend(q, k, v, keep, p):
        i, j = torch.arange(q.shape[2])[:, None], torch.arange(q.shape[2])[None, :]
        mask = ((j <= i) & (j > i - window))[None, None] & keep[:, None, None, :].bool()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 8, 16) for _ in range(3))
    keep = torch.ones(2, 8, dtype=torch.long)
    keep[0, 3:5] = 0  # padding inside a row
    for p in (0.0, 1e-12):
        torch._dynamo.reset()
        te_fx.reset_compile_report()
        with torch.no_grad():
            out = torch.compile(attend, backend="te_attn", options=OPTIONS)(q, k, v, keep, p)
            expected = attend(q, k, v, keep, 0.0)
        assert [entry["decision"] for entry in te_fx.compile_report()] == ["te"], p
        torch.testing.assert_close(out, expected)
