"""Stand-in for `tensordict` while tests import verl without it (tests/verl_standins/README.md)."""

from _verl_standin import module_getattr as __getattr__  # noqa: F401

__version__ = "0.10.0"  # verl.protocol compares it at import time
