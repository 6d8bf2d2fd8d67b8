"""The model families parity replays, by ai-toolkit ``arch`` (torch-free: only the families' rules load here)."""

from __future__ import annotations

import importlib

from pipelines.family import Family

# family module -> its Family object is ``FAMILY`` there. Order: the README's "Supported models" table.
FAMILY_MODULES = ("pipelines.omnigen2.family", "pipelines.flux.family")


def families() -> list[Family]:
    """Every family this install has."""
    found = []
    for name in FAMILY_MODULES:
        try:
            found.append(importlib.import_module(name).FAMILY)
        except ModuleNotFoundError as exc:
            if exc.name is None or not (name == exc.name or name.startswith(exc.name + ".")):
                raise  # a family that is here but broken must say so
    return found


def supported_archs() -> tuple[str, ...]:
    return tuple(arch for family in families() for arch in family.archs)


def family_for(arch: str) -> Family:
    """The family serving ``arch``; KeyError naming the supported ones otherwise."""
    for family in families():
        if arch in family.archs:
            return family
    raise KeyError(f"model.arch is {arch!r}; parity supports: {', '.join(supported_archs())}")
