"""Layer and model benchmarks; each writes JSON and the README tables, as ratios to a baseline in the same run."""
