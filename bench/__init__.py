"""rlops benchmarks: `python -m bench --help` (see bench/README.md)."""
