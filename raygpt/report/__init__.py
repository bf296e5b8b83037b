"""Reports: summaries, equal-budget comparisons and plots from a run or sweep folder."""
