"""Routing SDPA calls to te_fx without touching ``torch.nn.functional``.

A torch function mode sees every call of the SDPA builtin made while it is active, whether through the attribute
``F.scaled_dot_product_attention``, a local ``from torch.nn.functional import ...`` or a wrapper someone installed
on the attribute (PyTorch's ``context_parallel()`` does so) that calls the builtin. Modes are per thread and
stacked: nothing global changes, other threads and other modes are unaffected, and inside the handler this mode is
off, so the original SDPA it calls goes to whatever was there before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["SDPA", "sdpa_routed_to"]

SDPA: Callable = torch._C._nn.scaled_dot_product_attention  # the builtin ``F.scaled_dot_product_attention`` binds


class _RouteSdpa(TorchFunctionMode):
    def __init__(self, impl: Callable) -> None:
        super().__init__()
        self.impl = impl

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is SDPA:
            return self.impl(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def sdpa_routed_to(impl: Callable) -> Iterator[None]:
    """Inside the block, this thread's SDPA calls go to ``impl`` (which may call :data:`SDPA` to fall back)."""
    with _RouteSdpa(impl):
        yield
