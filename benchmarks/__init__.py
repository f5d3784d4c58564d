"""Benchmarks (run as modules: ``python -m benchmarks.engine_bench``)."""
