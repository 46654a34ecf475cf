"""The compile way in: the ``te_attn`` Dynamo backend and its FX pass over SDPA nodes and mask subgraphs."""
