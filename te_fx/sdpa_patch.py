"""The eager patch: a thread-safe, exception-safe swap of ``torch.nn.functional.scaled_dot_product_attention``.

HF calls SDPA through the attribute ``torch.nn.functional.scaled_dot_product_attention``. While any patched forward
runs, that attribute is a dispatcher that calls the implementation installed by the *current thread*, or the
original function when the thread installed none. The dispatcher is installed by the first active forward and the
original is restored by the last one to leave, so threads never restore each other's functions.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch.nn.functional as F

__all__ = ["original_sdpa", "sdpa_override"]

_ORIGINAL: Callable = F.scaled_dot_product_attention
_lock = threading.Lock()
_active = 0
_local = threading.local()


def original_sdpa() -> Callable:
    """The SDPA function te_fx found at import, whatever is installed now."""
    return _ORIGINAL


def _dispatch(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
    impl = getattr(_local, "impl", None)
    return (impl or _ORIGINAL)(*args, **kwargs)


@contextlib.contextmanager
def sdpa_override(impl: Callable) -> Iterator[None]:
    """Route this thread's ``F.scaled_dot_product_attention`` calls to ``impl`` inside the block."""
    global _active
    with _lock:
        if _active == 0:
            F.scaled_dot_product_attention = _dispatch
        _active += 1
    previous = getattr(_local, "impl", None)
    _local.impl = impl
    try:
        yield
    finally:
        _local.impl = previous
        with _lock:
            _active -= 1
            if _active == 0:
                F.scaled_dot_product_attention = _ORIGINAL
