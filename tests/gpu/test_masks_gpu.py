"""The eager matcher on CUDA masks: every kind of plan found on the device, and reproducing the mask exactly
(``oracles.plan_pattern``, loops on the host, is the oracle). The CPU suite covers the matcher's logic; this covers
its tensors meeting on one device."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from oracles import attend_of, hf_causal, plan_pattern

from te_fx import ops
from te_fx.core.masks import classify_mask

DEV = torch.device("cuda")
S = 12


def _padded(window_left: int, keep: torch.Tensor) -> torch.Tensor:
    return hf_causal(S, S, window_left)[None, None] & keep[:, None, None, :].bool()


def _packed(window_left: int, documents: list[list[int]]) -> torch.Tensor:
    ids = torch.tensor([[d for d, n in enumerate(row) for _ in range(n)] for row in documents])
    same = ids[:, :, None] == ids[:, None, :]
    return (hf_causal(S, S, window_left)[None] & same)[:, None]


KEEP = torch.tensor([[1] * S, [1] * 9 + [0] * 3, [0] * 4 + [1] * 8, [0] * 2 + [1] * 7 + [0] * 3])
MASKS = {
    "no_mask": (torch.ones(1, 1, 5, S, dtype=torch.bool), "no_mask"),
    "causal": (hf_causal(S, S)[None, None], "causal"),
    "bottom_right": (hf_causal(5, S)[None, None], "causal_bottom_right"),
    "window": (hf_causal(S, S, 3)[None, None], "causal"),
    "padded": (_padded(-1, KEEP), "padding_causal"),
    "padded_window": (_padded(3, KEEP), "padding_causal"),
    "packed": (_packed(-1, [[5, 4, 3], [12]]), "thd"),
    "packed_window": (_packed(2, [[5, 4, 3], [2, 10]]), "thd"),
}


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("float_mask", [False, True])
def test_matcher_finds_exact_plans_on_cuda(name, float_mask):
    mask, kind = MASKS[name]
    batch, q_len = max(mask.shape[0], 2), mask.shape[-2]
    mask = mask.expand(batch, -1, -1, -1).to(DEV)
    if float_mask:
        mask = torch.zeros(mask.shape, dtype=torch.bfloat16, device=DEV).masked_fill(~mask, -float("inf"))
    plan = classify_mask(mask, batch, 4, q_len, S)
    assert plan is not None and plan.kind == kind
    host_plan = dataclasses.replace(
        plan, **{f: getattr(plan, f).cpu() for f in ("key_padding", "cu_seqlens") if getattr(plan, f) is not None}
    )
    assert torch.equal(plan_pattern(host_plan, batch, q_len, S), attend_of(mask.cpu())[:, 0])


def _te_fx_syncs(fn) -> int:
    """How many synchronizing CUDA operations ``fn`` runs from te_fx's own code."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) and "te_fx" in w.filename for w in caught)


@pytest.mark.parametrize("name", list(MASKS))
def test_matcher_syncs_once_per_mask(name):
    mask, _ = MASKS[name]
    batch = max(mask.shape[0], 2)
    mask = mask.expand(batch, -1, -1, -1).to(DEV)
    assert _te_fx_syncs(lambda: classify_mask(mask, batch, 4, mask.shape[-2], S)) == 1


@pytest.mark.parametrize("refinement", ["key_padding_mask", "checked_key_padding", "cu_seqlens"])
def test_op_runs_per_row_plans_with_at_most_the_layout_read(refinement):
    """Packed documents and key padding of a checked layout run without a host sync; unchecked key padding in
    training costs exactly one, the op reading the layout (once per mask in a compiled graph)."""
    batch = KEEP.shape[0]
    expected_syncs = 1 if refinement == "key_padding_mask" else 0
    if refinement == "key_padding_mask":
        given = {"key_padding_mask": KEEP.to(DEV).bool()}
    elif refinement == "checked_key_padding":
        given = {"key_padding_mask": KEEP.to(DEV).bool(), "key_padding_layout": (False, True, False)}
    else:
        given = {"cu_seqlens": torch.tensor([0, 5, 9, 12, 24, 30, 36, 48], dtype=torch.int32, device=DEV)}
    q, k, v = (torch.randn(batch, S, h, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True) for h in (4, 2, 2))

    def fwd_bwd():
        ops.attention(q, k, v, mask_type="causal", window_size=(-1, 0), softmax_scale=0.125, **given).sum().backward()

    fwd_bwd()  # TE's first call per shape may query the device
    assert _te_fx_syncs(fwd_bwd) == expected_syncs
