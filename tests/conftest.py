"""Shared fixtures: a per-session cache so tests never touch the user's ~/.cache/layerscan."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_CACHE = Path(tempfile.mkdtemp(prefix="layerscan-test-cache-"))
os.environ["LAYERSCAN_CACHE"] = str(_CACHE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Never fetch the 233 MB LPIPS backbone from a test; the download path is tested against a
# local server (tests/test_metrics.py), which unsets this.
os.environ["LAYERSCAN_OFFLINE"] = "1"


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


@pytest.fixture(scope="session")
def two_prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("p") / "prompts.txt"
    path.write_text("a red circle on a white background\na blue square in the top left corner\n")
    return path


@pytest.fixture(scope="session")
def planted_dir(tmp_path_factory) -> Path:
    """Tiny Qwen-Image with a massive activation planted in every img_mlp: FP8 hurts img_mlp."""
    from layerscan.tiny import save_planted

    return save_planted("tiny-qwen-image", "img_mlp", None, tmp_path_factory.mktemp("m") / "planted")
