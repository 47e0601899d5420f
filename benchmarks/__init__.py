"""Layer and model benchmarks; each writes JSON and its table in README.md or a docs/ page,
as ratios to a baseline in the same run."""
