"""Attention sinks (``softmax_offset``: one logit per query head in every softmax's denominator, TE's "learnable"
softmax, GPT-OSS's ``sinks``) through ``te_fx.ops.attention`` on the reference executor, against a float64 oracle
written as GPT-OSS's eager attention computes sinks (the logit appended to each row of scores, a softmax, the
sink's column dropped), on masks built by brute force: every path of the op, outputs and the gradients of q, k, v
and the sinks."""

from __future__ import annotations

import pytest
import torch

from te_fx import ops

B, S, H, HKV, D = 2, 10, 4, 2, 8
SCALE = D**-0.5


def _oracle(q, k, v, sinks, visible):
    """GPT-OSS's eager attention with sinks on a bool (B, Sq, Skv) ``visible`` mask, bshd in and out."""
    rep = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2)
    kh, vh = (t.transpose(1, 2).repeat_interleave(rep, dim=1) for t in (k, v))
    scores = (qh @ kh.transpose(-1, -2) * SCALE).masked_fill(~visible[:, None], float("-inf"))
    logits = torch.cat([scores, sinks.view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)], dim=-1)
    probs = logits.softmax(dim=-1)[..., :-1]
    return (probs @ vh).transpose(1, 2)


def _causal(q_len: int, kv_len: int, window: int = -1) -> torch.Tensor:
    i = torch.arange(q_len)[:, None] + kv_len - q_len  # bottom-right aligned, as TE's causal types with q_len < kv_len
    j = torch.arange(kv_len)[None, :]
    return (j <= i) & ((j >= i - window) if window >= 0 else True)


def _keep(padding: str) -> torch.Tensor:
    keep = torch.ones(B, S, dtype=torch.bool)
    if padding == "right":
        keep[1, 6:] = False
    elif padding == "left":
        keep[1, :3] = False
    return keep


def _case(path: str) -> tuple[dict, torch.Tensor, int]:
    """(ops.attention keywords, the visible mask, q_len) of each path the op has."""
    if path in ("causal", "window"):
        window = 3 if path == "window" else -1
        return {"mask_type": "causal", "window_size": (window, 0)}, _causal(S, S, window).expand(B, S, S), S
    if path == "bottom_right":
        return {"mask_type": "causal_bottom_right", "window_size": (-1, 0)}, _causal(4, S).expand(B, 4, S), 4
    if path.startswith("padding"):
        padding, window = path.split("_")[1], 3 if path.endswith("window") else -1
        keep = _keep(padding)
        kwargs = {"mask_type": "causal", "window_size": (window, 0), "key_padding_mask": keep,
                  "key_padding_layout": (False, True, True) if padding == "right" else None}  # fmt: skip
        return kwargs, _causal(S, S, window) & keep[:, None, :], S
    lengths = torch.tensor([3, 7, 6, 4])  # "thd": documents packed over the B * S tokens
    document = torch.repeat_interleave(torch.arange(4), lengths).view(B, S)
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    visible = _causal(S, S) & (document[:, :, None] == document[:, None, :])
    return {"mask_type": "causal", "window_size": (-1, 0), "cu_seqlens": cu_seqlens}, visible, S


PATHS = ["causal", "window", "bottom_right", "padding_right", "padding_left", "padding_left_window", "thd"]


@pytest.mark.parametrize("path", PATHS)
def test_sinks_match_the_eager_formula(path):
    kwargs, visible, q_len = _case(path)
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(B, q_len, H, D, dtype=torch.float64, generator=generator, requires_grad=True)
    k, v = (torch.randn(B, S, HKV, D, dtype=torch.float64, generator=generator, requires_grad=True) for _ in "kv")
    sinks = torch.tensor([-2.0, 0.0, 1.5, 4.0], dtype=torch.float64, requires_grad=True)
    out = ops.attention(q, k, v, softmax_scale=SCALE, softmax_offset=sinks, executor="reference", **kwargs)
    ref = _oracle(q, k, v, sinks, visible)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    grad = torch.randn(out.shape, dtype=torch.float64, generator=generator)
    got, expected = (torch.autograd.grad(o, (q, k, v, sinks), grad) for o in (out, ref))
    for name, g, e in zip("q k v sinks".split(), got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11, msg=name)
    assert expected[3].abs().min() > 0  # every sink takes part


def test_sinks_keep_the_models_dtype_for_their_gradient():
    """bf16 sinks (GPT-OSS's parameter in a bf16 model) get a bf16 gradient; the op computes in float32."""
    q, k, v = (torch.randn(1, 6, 4, 8, dtype=torch.bfloat16, requires_grad=True) for _ in "qkv")
    sinks = torch.zeros(4, dtype=torch.bfloat16, requires_grad=True)
    ops.attention(q, k, v, mask_type="causal", window_size=(-1, 0), softmax_scale=SCALE, softmax_offset=sinks,
                  executor="reference").sum().backward()  # fmt: skip
    assert sinks.grad.dtype == torch.bfloat16 and sinks.grad.shape == (4,)


@pytest.mark.parametrize("qkv_format", ["bshd", "thd"])
def test_opcheck_with_sinks(qkv_format):
    q = torch.randn(B, S, H, D, requires_grad=True)
    k, v = (torch.randn(B, S, HKV, D, requires_grad=True) for _ in "kv")
    sinks = torch.randn(H, requires_grad=True)
    cu = torch.tensor([0, 3, 10, 16, 20], dtype=torch.int32) if qkv_format == "thd" else None
    mask_type = "padding_causal" if qkv_format == "thd" else "causal"
    args = (q, k, v, cu, cu, mask_type, -1, 0, SCALE, 0.0, True, "reference", qkv_format, sinks)
    torch.library.opcheck(torch.ops.te_fx.attention_fwd.default, args)


@pytest.mark.parametrize(
    "sinks, error",
    [(torch.zeros(3), "one logit per query head"), (torch.zeros(4, 1), "1D floating-point"),
     (torch.zeros(4, dtype=torch.int64), "1D floating-point")],
)  # fmt: skip
def test_sinks_of_the_wrong_shape_are_a_clear_error(sinks, error):
    q, k, v = (torch.randn(1, 6, 4, 8) for _ in "qkv")
    with pytest.raises((ValueError, RuntimeError), match=error):
        ops.attention(q, k, v, mask_type="causal", window_size=(-1, 0), softmax_scale=SCALE, softmax_offset=sinks,
                      executor="reference")  # fmt: skip
