"""An FP8 configuration as data: the patterns kept in BF16, in one canonical form, and its name.

Strategies, the ledger and the reports speak of configurations; only the engine turns one into
pipeline state.  Keeping the form here lets the search side name configurations without
importing the engine.
"""

from __future__ import annotations

from typing import Sequence

from layerscan.layers import split_pattern

Ignored = tuple[str, ...] | None  # None: the BF16 baseline


def normalize(ignored: Sequence[str] | None) -> Ignored:
    """Canonical form of a configuration: sorted, deduplicated patterns (None stays BF16)."""
    return None if ignored is None else tuple(sorted(set(ignored)))


def describe(ignored: Ignored) -> str:
    if ignored is None:
        return "BF16"
    return "FP8 all" if not ignored else "FP8, BF16 kept: " + ", ".join(
        _readable(p) for p in ignored)


def _readable(pattern: str) -> str:
    component, inner = split_pattern(pattern)
    return f"{component} (whole)" if not inner else pattern
