"""te_fx's core: what every way in shares (the plan type, the fallback reasons, the SDPA-call guards)."""
