"""Compiles every Triton kernel for given CUDA architectures (default sm_80 and sm_90) and prints
the report of rlops.bench.sass as one JSON object: what tests/test_compile.py checks.

Run in a process without TRITON_INTERPRET (the interpreter replaces @triton.jit functions with
Python it cannot compile).
"""

from __future__ import annotations

import json
import sys

from rlops.bench.sass import CASES, case_key, main, report_cases

__all__ = ["CASES", "case_key", "main", "report_cases"]

if __name__ == "__main__":
    print(json.dumps(main([int(a) for a in sys.argv[1:]] or [80, 90])))
