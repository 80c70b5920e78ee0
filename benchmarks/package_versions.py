"""Installed versions of the named distributions, None where one is missing (for the benchmarks' result files)."""

from __future__ import annotations

import importlib.metadata as md


def package_versions(*names: str) -> dict[str, str | None]:
    out = {}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out
