"""Benchmarks of memsync, run from the repository root (see BENCHMARKS.md)."""
