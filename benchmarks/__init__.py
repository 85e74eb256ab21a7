"""Benchmarks (`make bench`): medians, p99 and ratios against a baseline measured in the same run."""
