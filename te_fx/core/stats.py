"""The dispatch counters of the eager injection and the "te" attention backend: ``te_hits`` and one ``fallback_*``
count per reason (:mod:`te_fx.core.reasons`)."""

from __future__ import annotations

import logging
import os
import threading

from ..core.reasons import STATS_KEYS

__all__ = ["STATS", "count", "snapshot", "reset"]

logger = logging.getLogger("te_fx")

STATS: dict[str, int] = dict.fromkeys(STATS_KEYS, 0)
_LOCK = threading.Lock()
LOG_EVERY = int(os.environ.get("TE_FX_STATS_LOG_EVERY", "0"))


def snapshot() -> dict[str, int]:
    """A copy of the counters."""
    with _LOCK:
        return dict(STATS)


def reset() -> None:
    """Zero the counters."""
    with _LOCK:
        for key in STATS:
            STATS[key] = 0


def count(key: str) -> None:
    """Count one call under ``key``; log the counters every ``TE_FX_STATS_LOG_EVERY`` calls (0: never)."""
    with _LOCK:
        STATS[key] += 1
        total = sum(STATS.values()) if LOG_EVERY > 0 else 0
    if LOG_EVERY > 0 and total % LOG_EVERY == 0:
        logger.info("te_fx attention dispatch: %s", snapshot())
