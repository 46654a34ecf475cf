"""te_fx benchmarks (GPU). Each script prints a table and can write JSON; see README."""
