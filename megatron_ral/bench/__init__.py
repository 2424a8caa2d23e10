"""Benchmarks (each module a harness and its command; ``tools/bench/<name>.py`` is a shim) and the TRL
peer/parity code. TRL is imported only here. Nothing in the product imports this package.
"""
