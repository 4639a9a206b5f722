"""Benchmark scripts: every performance number in docs/ comes from one of them.

Run from a checkout root as ``PYTHONPATH=kernels:. python benchmarks/NAME.py`` (each script's
docstring gives its usage lines); ``benchmarks._step`` holds the training step they share.
"""
