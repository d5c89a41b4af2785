"""Benchmarks, run from the repository root as `python -m bench.<name>`;
each writes JSON to bench/results/ and prints a markdown table."""
