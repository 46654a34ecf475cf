"""Routing SDPA calls to te_fx without touching ``torch.nn.functional``, and telling the replacement which K/V
arguments are HF's ``repeat_kv`` of a tensor made in the routed block.

A torch function mode sees every call of the SDPA builtin made while it is active, whether through the attribute
``F.scaled_dot_product_attention``, a local ``from torch.nn.functional import ...`` or a wrapper someone installed
on the attribute (PyTorch's ``context_parallel()`` does so) that calls the builtin. Modes are per thread and
stacked: nothing global changes, other threads and other modes are unaffected, and inside the handler this mode is
off, so the original SDPA it calls goes to whatever was there before.

With a padding or sliding mask HF repeats K and V to the query heads before SDPA
(``x[:, :, None].expand(b, hkv, n_rep, s, d).reshape(b, hkv * n_rep, s, d)``). TE does GQA itself; reading the
KV heads back out of the repeat costs a strided copy, and in the backward a zero-filled (B, H, S, D) gradient
summed over the copies, for K and V of every layer. For an ``impl`` that declares ``takes_kv_repeats = True`` the
mode also records such repeats made inside the block (by the ops' shapes and strides, whoever calls them) in a
:class:`KVRepeats`, which it passes to ``impl`` as the keyword ``kv_repeats``. That lookup gives a repeat's
(B, Hkv, S, D) source as a view, for as long as neither has been written to since (their version counters). It
lives as long as the block (one mode per block and thread) and holds the repeats themselves only weakly.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["SDPA", "KVRepeats", "sdpa_routed_to"]

SDPA: Callable = torch._C._nn.scaled_dot_product_attention  # the builtin ``F.scaled_dot_product_attention`` binds
_EXPAND: Callable = torch.Tensor.expand
_RESHAPE: Callable = torch.Tensor.reshape


class KVRepeats:
    """The ``repeat_kv`` repeats made in one routed block: each (B, Hkv * n_rep, S, D) ``reshape`` of an ``expand``
    of a (B, Hkv, 1, S, D) tensor to n_rep > 1 along dim 2, with the version counters of the repeat and of that
    source as they were at the reshape."""

    __slots__ = ("_expanded", "_repeats")

    def __init__(self) -> None:
        # id(expanded) -> (expanded, its input); id(repeat) -> (repeat, its version, source, its version)
        self._expanded: dict[int, tuple[weakref.ref, torch.Tensor]] = {}
        self._repeats: dict[int, tuple[weakref.ref, int, torch.Tensor, int]] = {}

    def note_expand(self, source: Any, expanded: torch.Tensor) -> None:
        """Record ``expanded = source.expand(...)`` when it broadcasts a size-1 dim 2 of a 5D tensor, nothing else."""
        if not (isinstance(source, torch.Tensor) and isinstance(expanded, torch.Tensor)):
            return
        if not source.dim() == 5 == expanded.dim() or source.shape[2] != 1 or expanded.shape[2] < 2:
            return
        if source.is_inference():  # no version counter: a write could not be seen
            return
        shape, strides = source.shape, source.stride()
        if expanded.shape != (*shape[:2], expanded.shape[2], *shape[3:]):
            return
        if expanded.stride() != (*strides[:2], 0, *strides[3:]):
            return
        self._expanded[id(expanded)] = (weakref.ref(expanded), source)

    def note_reshape(self, expanded: Any, repeat: torch.Tensor) -> None:
        """Record ``repeat = expanded.reshape(...)`` when ``expanded`` is a recorded expand and the reshape merges
        its dims 1 and 2: then ``repeat[:, h * n_rep + i] == source[:, h, 0]`` for every copy i."""
        entry = self._expanded.get(id(expanded))
        if entry is None or entry[0]() is not expanded:
            return
        batch, kv_heads, n_rep, seq, dim = expanded.shape
        if not isinstance(repeat, torch.Tensor) or repeat.shape != (batch, kv_heads * n_rep, seq, dim):
            return
        if repeat.is_inference():
            return
        source = entry[1]
        self._repeats[id(repeat)] = (weakref.ref(repeat), repeat._version, source, source._version)

    def _entry(self, tensor: Any) -> tuple[weakref.ref, int, torch.Tensor, int] | None:
        entry = self._repeats.get(id(tensor))
        return entry if entry is not None and entry[0]() is tensor else None

    def source_of(self, tensor: Any) -> torch.Tensor | None:
        """The (B, Hkv, S, D) tensor ``tensor`` repeats, as a view of it (its backward is a view too), when
        ``tensor`` is a repeat made in this block and neither has been written to since; else None."""
        entry = self._entry(tensor)
        if entry is None:
            return None
        _, version, source, source_version = entry
        if tensor._version != version or source._version != source_version:
            return None
        view = source.squeeze(2)
        if view.requires_grad and not tensor.requires_grad:  # repeated under no_grad: no gradient may flow back
            return None
        return view

    def written_to(self, tensor: Any) -> bool:
        """Whether ``tensor`` is a repeat made in this block that has been written to since (so it may no longer
        hold equal copies)."""
        entry = self._entry(tensor)
        return entry is not None and tensor._version != entry[1]


class _RouteSdpa(TorchFunctionMode):
    def __init__(self, impl: Callable, repeats: KVRepeats | None) -> None:
        super().__init__()
        self.impl = impl
        self.repeats = repeats

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is SDPA:
            return (
                self.impl(*args, **kwargs)
                if self.repeats is None
                else self.impl(*args, kv_repeats=self.repeats, **kwargs)
            )
        out = func(*args, **kwargs)
        if self.repeats is not None:
            if func is _EXPAND:
                self.repeats.note_expand(args[0], out)
            elif func is _RESHAPE:
                self.repeats.note_reshape(args[0], out)
        return out


@contextlib.contextmanager
def sdpa_routed_to(impl: Callable) -> Iterator[None]:
    """Inside the block, this thread's SDPA calls go to ``impl`` (which may call :data:`SDPA` to fall back); with
    ``kv_repeats=`` (a :class:`KVRepeats` of the block) too when ``impl.takes_kv_repeats is True``."""
    takes_repeats = getattr(impl, "takes_kv_repeats", False) is True  # `is`: a MagicMock stand-in says anything
    with _RouteSdpa(impl, KVRepeats() if takes_repeats else None):
        yield
