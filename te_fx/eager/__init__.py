"""The eager way in: ``inject_te_attention`` routes each HF attention module's SDPA calls to TE while it runs."""
