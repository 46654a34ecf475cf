"""Executors: what runs the attention. "te" is TransformerEngine's fused attention (CUDA, fp16/bf16); "reference"
is the same call contract in plain PyTorch (any device and dtype), used on machines without a GPU and as the oracle.

:class:`Executor` is what te_fx's custom ops call (kernels on contiguous bshd tensors, in TE's bshd or thd format);
:class:`ExecutorModule` is what te_fx's attention modules are (they run an :class:`~te_fx.core.plan.AttentionPlan`).
Neither needs TransformerEngine: :func:`get_executor` imports it only for "te".
"""

from __future__ import annotations

import abc
import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..core.plan import UNKNOWN_LAYOUT, key_bias_terms, padding_route, thd_mask_type

if TYPE_CHECKING:
    from ..core.plan import AttentionPlan

__all__ = [
    "EXECUTORS",
    "QKV_FORMATS",
    "TE_INSTALL",
    "AttentionCall",
    "Executor",
    "ExecutorModule",
    "TEUnavailableError",
    "executor_env",
    "get_executor",
    "is_training",
    "load_te_executor",
    "qkv_mismatch_reason",
    "resolve_executor",
    "te_head_dims_supported",
    "te_limits_reason",
    "te_terms",
    "thd_mask_type",
    "unsupported_call_reason",
]

EXECUTORS = ("te", "reference")
QKV_FORMATS = ("bshd", "thd")
ENV_EXECUTOR = "TE_FX_EXECUTOR"
TE_INSTALL = "pip install --no-build-isolation 'transformer_engine[pytorch]' (see README.md, GPU installation)"


def te_head_dims_supported(head_dim_qk: int, head_dim_v: int) -> bool:
    """TE's F16 fused attention on sm90: head dims that are multiples of 8 and at most 256 (known without TE)."""
    return head_dim_qk % 8 == 0 and head_dim_v % 8 == 0 and max(head_dim_qk, head_dim_v) <= 256


def te_limits_reason(dtype: torch.dtype, device_type: str, head_dim_qk: int, head_dim_v: int) -> str | None:
    """What TE's fused attention needs that is known without importing TE (a stats key), or None: CUDA tensors,
    fp16/bf16 and :func:`te_head_dims_supported` head dims. The TE executor asks TE for the rest."""
    if device_type != "cuda":
        return "fallback_device"
    if dtype not in (torch.float16, torch.bfloat16):
        return "fallback_dtype"
    if not te_head_dims_supported(head_dim_qk, head_dim_v):
        return "fallback_head_dim"
    return None


def qkv_mismatch_reason(q: Tensor, k: Tensor, v: Tensor) -> str | None:
    """The reason "fallback_device" or "fallback_dtype" where k or v differ from q in device or dtype (no executor
    runs such a call), else None."""
    if k.device != q.device or v.device != q.device:
        return "fallback_device"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return "fallback_dtype"
    return None


def is_training(dropout_p: float, *tensors: Tensor) -> bool:
    """Whether a call must keep what its backward needs: it has dropout, or autograd will differentiate it."""
    return dropout_p > 0 or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def te_terms(plan: AttentionPlan, training: bool, q_len: int) -> tuple[str, tuple[int, int], str, bool]:
    """(TE mask type, window, qkv format, key bias) that te_fx's op runs ``plan`` with for ``q_len`` queries: key
    padding as :func:`~te_fx.core.plan.padding_route` says (``padding_causal``, or a key bias with
    :func:`~te_fx.core.plan.key_bias_terms`), packed documents in thd, anything else as the plan says in bshd."""
    window = tuple(plan.window_size)
    if plan.key_padding is not None:
        if padding_route(plan.key_layout or UNKNOWN_LAYOUT, training, plan.mask_type) == "key_bias":
            return (*key_bias_terms(plan.mask_type, window, q_len), "bshd", True)
        return "padding_causal", window, "bshd", False
    if plan.cu_seqlens is not None or plan.position_ids is not None:
        return thd_mask_type(plan.mask_type), window, "thd", False
    return plan.mask_type, window, "bshd", False


class TEUnavailableError(ImportError):
    """TransformerEngine cannot be imported; the message says what to install instead."""


def resolve_executor(executor: str | None) -> str:
    """The executor name: the argument, else ``$TE_FX_EXECUTOR``, else "te"."""
    name = executor or os.environ.get(ENV_EXECUTOR) or "te"
    if name not in EXECUTORS:
        raise ValueError(f"unknown te_fx executor {name!r}; choose one of {EXECUTORS}")
    return name


@contextlib.contextmanager
def executor_env(name: str) -> Iterator[None]:
    """``$TE_FX_EXECUTOR`` set to ``name`` inside the block (how the "te" attention backend, which takes no options,
    is told), restored afterwards. For tools and scripts: the variable is the process's."""
    before = os.environ.get(ENV_EXECUTOR)
    os.environ[ENV_EXECUTOR] = resolve_executor(name)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV_EXECUTOR, None)
        else:
            os.environ[ENV_EXECUTOR] = before


def load_te_executor() -> ModuleType:
    """The TE executor module, or a :class:`TEUnavailableError` that says how to get TransformerEngine."""
    try:
        from . import te
    except ImportError as error:  # TE missing, or its CUDA extension failed to load
        raise TEUnavailableError(
            f"te_fx's 'te' executor needs TransformerEngine with PyTorch support, which failed to import ({error}). "
            f"Install it with `{TE_INSTALL}` (needs CUDA), or pass executor='reference' "
            f"(or set {ENV_EXECUTOR}=reference) to run the pure-PyTorch reference executor."
        ) from error
    return te


@dataclass(frozen=True)
class AttentionCall:
    """What an executor's support check reads of a call: metadata only, so the eager path builds it from real
    tensors (:meth:`of_bshd`) and the compile pass from fake ones at their traced size hints.

    ``shape`` is (batch, heads, kv_heads, q_len, kv_len, head_dim_qk, head_dim_v) in plain ints; in the "thd"
    format batch is the number of documents, q_len / kv_len bound their lengths and ``num_tokens`` counts the packed
    tokens (None: batch * q_len). ``softmax_type`` is TE's: "vanilla", or "learnable" for a per-head sink logit in
    the softmax's denominator (attention sinks). ``key_bias``: a post-scale bias per row's keys (key padding in
    inference, :func:`~te_fx.core.plan.padding_route`), which the TE executor runs a row at a time.
    """

    dtype: torch.dtype
    device: torch.device
    shape: tuple[int, int, int, int, int, int, int]
    mask_type: str
    window_size: tuple[int, int]
    qkv_format: str = "bshd"
    num_tokens: int | None = None
    dropout_p: float = 0.0
    training: bool = False
    softmax_type: str = "vanilla"
    key_bias: bool = False

    @classmethod
    def of_bshd(
        cls,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask_type: str,
        window_size: tuple[int, int],
        qkv_format: str = "bshd",
        num_sequences: int | None = None,
        dropout_p: float = 0.0,
        training: bool = False,
        softmax_type: str = "vanilla",
        key_bias: bool = False,
    ) -> AttentionCall:
        """The call of bshd q (B, Sq, H, Dqk), k (B, Skv, Hkv, Dqk), v (B, Skv, Hkv, Dv); in "thd", ``num_sequences``
        documents packed over their B * Sq tokens."""
        thd = qkv_format == "thd"
        shape = (num_sequences if thd else q.shape[0], q.shape[2], k.shape[2], q.shape[1], k.shape[1], q.shape[3],
                 v.shape[3])  # fmt: skip
        return cls(
            q.dtype, q.device, tuple(int(size) for size in shape), mask_type, tuple(window_size), qkv_format,
            q.shape[0] * q.shape[1] if thd else None, float(dropout_p), bool(training), softmax_type, key_bias,
        )  # fmt: skip

    @classmethod
    def of_plan(
        cls,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        plan: AttentionPlan,
        dropout_p: float = 0.0,
        training: bool = False,
        softmax_type: str = "vanilla",
    ) -> AttentionCall:
        """The call te_fx's op makes to run ``plan`` on bshd q, k, v (:func:`te_terms`)."""
        mask_type, window, qkv_format, key_bias = te_terms(plan, training, q.shape[1])
        documents = plan.cu_seqlens.shape[0] - 1 if plan.cu_seqlens is not None else None
        return cls.of_bshd(
            q, k, v, mask_type, window, qkv_format, documents, dropout_p, training, softmax_type, key_bias
        )


class Executor(abc.ABC):
    """The kernels behind te_fx's custom ops, in TE's terms.

    Tensors are contiguous bshd: q (B, Sq, H, Dqk), k (B, Skv, Hkv, Dqk), v (B, Skv, Hkv, Dv). ``qkv_format`` says
    how the executor reads them: "bshd" (``cu_seqlens_*``, if given, are per-row lengths for the ``padding*`` mask
    types; None means full rows) or "thd" (the B * S tokens flattened, ``cu_seqlens_*`` the documents' boundaries;
    the mask type is ``padding*`` and applies within each document). ``softmax_offset`` (H,) float32, if given, is
    a per-head logit added to every softmax's denominator (TE's "learnable" softmax: attention sinks), and the
    backward returns its gradient. ``key_bias`` (B, 1, 1, Skv) in q's dtype, bshd only, is added to the scaled
    scores of each row's keys (TE's post-scale bias; the lowest value of the dtype hides a key); it has no gradient,
    and the TE executor takes it in inference only.
    """

    name: str

    @abc.abstractmethod
    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        cu_seqlens_q: Tensor | None,
        cu_seqlens_kv: Tensor | None,
        qkv_format: str,
        mask_type: str,
        window_size: tuple[int, int],
        softmax_scale: float,
        dropout_p: float,
        training: bool,
        softmax_offset: Tensor | None = None,
        key_bias: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(out bshd (B, Sq, H, Dv), softmax_stats, rng_state): the last two are what :meth:`backward` needs, shaped
        as :meth:`fake_aux` says."""

    @abc.abstractmethod
    def backward(
        self,
        d_out: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        softmax_stats: Tensor,
        rng_state: Tensor,
        cu_seqlens_q: Tensor | None,
        cu_seqlens_kv: Tensor | None,
        qkv_format: str,
        mask_type: str,
        window_size: tuple[int, int],
        softmax_scale: float,
        dropout_p: float,
        softmax_offset: Tensor | None = None,
        key_bias: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """(dq, dk, dv), contiguous bshd, and the gradient of ``softmax_offset`` (None without one), for the forward
        that returned ``out``, ``softmax_stats``, ``rng_state``."""

    @abc.abstractmethod
    def fake_aux(self, q: Tensor, qkv_format: str, dropout_p: float, training: bool) -> tuple[Tensor, Tensor]:
        """Empty (softmax_stats, rng_state) of the shapes :meth:`forward` returns (q may be a fake tensor)."""

    @abc.abstractmethod
    def call_unsupported_reason(self, call: AttentionCall) -> str | None:
        """Why this executor cannot run ``call`` (a te_fx stats key, :data:`te_fx.core.reasons.REASONS`), or None."""


@functools.cache
def get_executor(name: str) -> Executor:
    """The executor called ``name``: "te" (imports TransformerEngine, or raises :class:`TEUnavailableError`) or
    "reference"."""
    if name == "te":
        return load_te_executor().TEExecutor()
    if name == "reference":
        from .reference import ReferenceExecutor

        return ReferenceExecutor()
    raise ValueError(f"unknown te_fx executor {name!r}; choose one of {EXECUTORS}")


def _no_limits(call: AttentionCall) -> str | None:
    return None


def _te_limits(call: AttentionCall) -> str | None:
    return te_limits_reason(call.dtype, call.device.type, call.shape[5], call.shape[6])


# per executor, what it refuses that is known without loading it (so a CPU graph never imports TE)
_LIMITS: dict[str, Callable[[AttentionCall], str | None]] = {"te": _te_limits, "reference": _no_limits}


def unsupported_call_reason(name: str, call: AttentionCall) -> str | None:
    """Why the executor called ``name`` cannot run ``call`` (a stats key), or None. The limits known without the
    executor's library come first, so a call they refuse loads nothing (TE is imported only for calls it may run)."""
    reason = _LIMITS.get(name, _no_limits)(call)
    return reason if reason is not None else get_executor(name).call_unsupported_reason(call)


class ExecutorModule(nn.Module):
    """te_fx's own attention modules (TE's and the reference's): they run an :class:`~te_fx.core.plan.AttentionPlan`
    themselves (``run``) and say what they cannot run (``unsupported_reason``). Any other module stands in through
    TE's call contract.

    It defines no ``__init__``: in ``class M(ExecutorModule, SomeModule)`` nn.Module's is called once, by SomeModule.
    """

    def unsupported_reason(self, q: Tensor, k: Tensor, v: Tensor, plan: AttentionPlan) -> str | None:
        """Why this module cannot run ``plan`` on these bshd tensors (a te_fx stats key such as "fallback_device",
        "fallback_dtype", "fallback_head_dim", "fallback_shape", "fallback_fp8"), or None; from metadata only."""
        raise NotImplementedError

    def run(self, q: Tensor, k: Tensor, v: Tensor, plan: AttentionPlan) -> Tensor:
        """bshd (B, Sq, H, Dqk) in, bshd (B, Sq, H, Dv) out, differentiable: ``plan`` with its softmax scale (else
        this module's), and this module's attention dropout in training mode only. Callers ask
        :meth:`unsupported_reason` first."""
        raise NotImplementedError

    def _dropout_p(self) -> float:
        return getattr(self, "attention_dropout", 0.0) if self.training else 0.0

    def _softmax_scale(self, plan: AttentionPlan, head_dim: int) -> float:
        """The plan's scale, else this module's, else TE's default head_dim ** -0.5."""
        for scale in (plan.softmax_scale, getattr(self, "softmax_scale", None)):
            if scale is not None:
                return scale
        return head_dim**-0.5

    def _run_op(self, q: Tensor, k: Tensor, v: Tensor, plan: AttentionPlan, executor: str) -> Tensor:
        """``plan`` through te_fx's op on ``executor``."""
        from ..ops import attention

        scale = self._softmax_scale(plan, q.shape[-1])
        return attention(
            q, k, v, mask_type=plan.mask_type, window_size=plan.window_size, softmax_scale=scale,
            dropout_p=self._dropout_p(), key_padding_mask=plan.key_padding, cu_seqlens=plan.cu_seqlens,
            executor=executor, key_padding_layout=plan.key_layout,
        )  # fmt: skip
