"""Benchmarks of esm-workers against the raw client loop of each broker and against FastStream.

Run with `python -m bench` (or `make bench`); results land in `bench/results/`.
"""
