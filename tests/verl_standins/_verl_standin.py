"""An inert placeholder for any name verl imports from a stand-in module (see README.md)."""

from __future__ import annotations


class Placeholder:
    """Accepts any construction, call or attribute and does nothing."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __call__(self, *args: object, **kwargs: object) -> Placeholder:
        return Placeholder()

    def __getattr__(self, name: str) -> Placeholder:
        if name.startswith("__"):
            raise AttributeError(name)
        return Placeholder()


def module_getattr(name: str) -> type[Placeholder]:
    """A module-level __getattr__: every public name is the placeholder class."""
    if name.startswith("__"):
        raise AttributeError(name)
    return Placeholder
