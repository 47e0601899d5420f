"""Analysis: power decomposition, batch-dependence probe, plots."""
