"""benchmarks/RESULTS.md's rendered blocks agree with the raw JSON in benchmarks/results/.

Runs render_gpu.py's and render_runs.py's check modes on the committed files (no GPU, no torch: JSON and text only), so
a table edited by hand, or a result file changed without re-rendering, fails here.  Fix with
``python benchmarks/render_gpu.py --write``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _benchmark_module(name: str):
    """A script of benchmarks/ imported as a module (they import each other by plain name)."""
    import importlib

    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


RENDERERS = ("render_gpu", "render_runs")


@pytest.fixture(scope="module")
def render_gpu():
    return _benchmark_module("render_gpu")


@pytest.mark.parametrize("renderer", RENDERERS)
def test_results_doc_matches_the_json(renderer, capsys):
    rc = _benchmark_module(renderer).main(["--check"])
    assert rc == 0, capsys.readouterr().err


# One rendered cell per renderer, edited by hand: --check names the block it sits in.
@pytest.mark.parametrize("renderer, cell, edited, block", [
    ("render_gpu", "| fp8_all | 231.1 |", "| fp8_all | 221.1 |", "step_eager"),
    ("render_runs", "**1.25x**", "**1.35x**", "fullsize"),
])
def test_check_catches_an_edited_cell(renderer, cell, edited, block, tmp_path, capsys):
    module = _benchmark_module(renderer)
    doc = tmp_path / "RESULTS.md"
    text = module.DOC.read_text()
    assert cell in text
    doc.write_text(text.replace(cell, edited, 1))
    assert module.main(["--check", "--doc", str(doc)]) == 1
    assert f"block {block!r} differs" in capsys.readouterr().err


def test_check_catches_an_undeclared_result_file(render_gpu, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(render_gpu.RESULTS_DIR, results)
    shutil.copy(results / render_gpu.EAGER, results / "h200_eager_rerun.json")
    problems = render_gpu.check(render_gpu.DOC, results)
    assert problems == ["results/h200_eager_rerun.json is not declared in render_gpu.RUNS"]


def test_write_restores_the_blocks(render_gpu, tmp_path):
    doc = tmp_path / "RESULTS.md"
    text = render_gpu.DOC.read_text()
    doc.write_text(text.replace("**801x**", "**999x**", 1))  # the reload block's cell
    assert render_gpu.check(doc) != []
    render_gpu.write(doc)
    assert doc.read_text() == text
