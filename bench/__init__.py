"""Benchmarks of the fused optimizer steps (``python -m bench`` prints the table)."""
