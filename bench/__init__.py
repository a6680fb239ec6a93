"""Benchmarks for the Goldilocks core. Run each as a module, e.g. `python -m bench.compile`.

See bench/README.md for what each one measures and docs/benchmarks.md for recorded results.
"""
