"""Drop-ins for the RL frameworks users already run: `trl`, `verl`, `openrlhf` (import the submodule)."""
