"""Benchmarks of lightning_escape: the problems and harness, efficacy and overhead (not installed)."""
