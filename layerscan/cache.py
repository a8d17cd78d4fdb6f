"""Where layerscan keeps what it can reuse across runs: baselines, trial images, proxy
trajectories and the built-in tiny pipelines, under one root.

The root is a value handed down from the caller (``--cache-dir``, ``open_session(cache_root=)``);
only when none is given does ``$LAYERSCAN_CACHE``, then ``~/.cache/layerscan``, decide.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_root() -> Path:
    root = os.environ.get("LAYERSCAN_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "layerscan"


def cache_root_or_default(root: Path | None) -> Path:
    return Path(root).expanduser() if root is not None else default_cache_root()
