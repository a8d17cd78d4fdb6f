"""Shared fixtures: a per-session cache so tests never touch the user's ~/.cache/layerscan."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_CACHE = Path(tempfile.mkdtemp(prefix="layerscan-test-cache-"))
os.environ["LAYERSCAN_CACHE"] = str(_CACHE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def cache_root() -> Path:
    return _CACHE


@pytest.fixture(scope="session")
def tiny_qwen_dir() -> Path:
    from layerscan.tiny import tiny_pipeline_dir

    return tiny_pipeline_dir("tiny-qwen-image")


@pytest.fixture(scope="session")
def tiny_flux_dir() -> Path:
    from layerscan.tiny import tiny_pipeline_dir

    return tiny_pipeline_dir("tiny-flux")


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red circle\n# a comment\n\na blue square on the left\n")
    return path
