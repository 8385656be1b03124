"""Benchmarks: python -m bench.dispatch, python -m bench.moe_layer (results land in docs/benchmarks.md)."""
