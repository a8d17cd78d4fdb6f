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


@pytest.fixture(scope="module")
def render_gpu():
    return _benchmark_module("render_gpu")


def test_results_doc_matches_the_json(render_gpu, capsys):
    rc = render_gpu.main(["--check"])
    assert rc == 0, capsys.readouterr().err


def test_check_catches_an_edited_table(render_gpu, tmp_path, capsys):
    doc = tmp_path / "RESULTS.md"
    text = render_gpu.DOC.read_text()
    assert "| fp8_all | 231.1 |" in text
    doc.write_text(text.replace("| fp8_all | 231.1 |", "| fp8_all | 221.1 |", 1))
    assert render_gpu.main(["--check", "--doc", str(doc)]) == 1
    assert "block 'step_eager' differs" in capsys.readouterr().err


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


@pytest.fixture(scope="module")
def render_runs():
    return _benchmark_module("render_runs")


def test_whole_run_blocks_match_the_json(render_runs, capsys):
    rc = render_runs.main(["--check"])
    assert rc == 0, capsys.readouterr().err


def test_whole_run_check_catches_an_edited_number(render_runs, tmp_path, capsys):
    doc = tmp_path / "RESULTS.md"
    text = render_runs.DOC.read_text()
    assert "**1.25x**" in text
    doc.write_text(text.replace("**1.25x**", "**1.35x**", 1))
    assert render_runs.main(["--check", "--doc", str(doc)]) == 1
    assert "block 'fullsize' differs" in capsys.readouterr().err
