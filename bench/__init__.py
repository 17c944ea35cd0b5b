"""rlops benchmarks, installed as rlops.bench: `rlops bench --help` (see bench/README.md)."""
