"""Stand-in for `tensordict.tensorclass` (tests/verl_standins/README.md)."""

from _verl_standin import module_getattr as __getattr__  # noqa: F401
