"""Runs the benchmarks: python -m bench [--ops token_stats] [--quick] [--shapes 16384x151936] [--out DIR]."""

import os

import torch

# Without CUDA, the rlops-triton provider runs in Triton's interpreter (smoke runs only).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .run import main

raise SystemExit(main())
