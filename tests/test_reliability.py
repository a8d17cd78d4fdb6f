"""Bad settings are refused before the model loads, one run writes an --out at a time, a torn
trial record is set aside rather than glued to, and a budget-ended answer is marked provisional.

How each fault is injected: bad settings are real study files and flags; an unwritable --out is
a path beneath a regular file (the tests run as root in CI, where permission bits do not stop
writes); a second run is a real process holding the lock; a torn write is a child process that
appends half a record line and SIGKILLs itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from layerscan import session as session_module
from layerscan.cli import main
from layerscan.rundir import LOCK_NAME, hold_run_dir

CRITERION = ["--criterion-metric", "psnr", "--criterion-mean", "37", "--criterion-worst", "35"]


@pytest.fixture
def no_model_load(monkeypatch):
    """Every refusal below must come before the model loads: loading fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was refused")

    monkeypatch.setattr(session_module, "load_pipeline", refuse)


def _study_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "study.toml"
    path.write_text(f'model = "demo"\n{textwrap.dedent(body)}')
    return path


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("layerscan: error: ")]
    assert len(errors) == 1 and err[-1] == errors[0], err  # one line, and no traceback after it
    return errors[0].removeprefix("layerscan: error: ")


@pytest.mark.parametrize("body,expected", [
    ('[generation]\nsteps = "ten"', "setting steps = 'ten': expected a whole number"),
    ("[generation]\nsteps = 2.5", "setting steps = 2.5: expected a whole number"),
    ('[generation]\nseeds = "0"', "setting seeds = '0': expected a list of whole numbers"),
    ("[generation]\nseeds = [0, -1]", "setting seeds = [0, -1]: -1 is not a seed"),
    ('[generation]\nguidance = "x"', "setting guidance = 'x': expected a number"),
    ("[generation]\nheight = 0", "setting height = 0: expected a number above 0"),
    ('[budget]\nmax_trials = "lots"', "setting max_trials = 'lots': expected a whole number"),
    ('metrics = "ssim,psnr"', "setting metrics = 'ssim,psnr': expected a list of strings"),
    ('refine = "yes"', "setting refine = 'yes': expected true or false"),
    ('strategy = "fastest"', "setting strategy = 'fastest': expected one of 'auto', 'greedy'"),
    ("[criterion]\nmean = true", "setting criterion.mean = True: expected a number or a string"),
    ('pipeline_kwargs = "x"', "setting pipeline_kwargs = 'x': expected a table of keyword arguments"),
    ('colour = "red"', "unknown study field(s): colour"),
])
def test_a_wrongly_typed_study_setting_is_one_line_before_the_model_loads(
        tmp_path, capsys, no_model_load, body, expected):
    study = _study_file(tmp_path, body)
    assert main(["run", "--study", str(study), "--out", str(tmp_path / "out")]) == 2
    assert _one_line_error(capsys).startswith(expected)
    assert not (tmp_path / "out").exists()  # nothing was started


@pytest.mark.parametrize("flags,expected", [
    (["--timeout", "-5"], "--timeout -5.0: expected a number above 0"),
    (["--max-trials", "0"], "--max-trials 0: expected a number above 0"),
    (["--seeds", "0,-3"], "--seeds [0, -3]: -3 is not a seed"),
    (["--workers", "0"], "--gpus needs GPU indices (e.g. 0,1) and --workers a count of 1 or more"),
    (["--device", "tpu"], "--device tpu: not a device"),
    (["--device", "mps"], "--device mps: layerscan runs on cpu or cuda devices"),
])
def test_a_bad_flag_is_one_line_before_the_model_loads(tmp_path, capsys, no_model_load, flags, expected):
    assert main(["run", "--model", "demo", "--out", str(tmp_path / "out"), *flags]) == 2
    assert _one_line_error(capsys).startswith(expected)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for a GPU this machine lacks")
@pytest.mark.parametrize("flags,expected", [
    (["--device", "cuda"], "--device cuda: no CUDA GPU is visible here; use --device cpu"),
    (["--device", "cuda:3"], "--device cuda:3: no CUDA GPU is visible here"),
    (["--gpus", "3"], "--gpus 3: no CUDA GPU is visible here"),
])
def test_a_gpu_that_is_not_there_is_refused_before_the_model_loads(tmp_path, capsys, no_model_load,
                                                                   flags, expected):
    assert main(["run", "--model", "demo", "--out", str(tmp_path / "out"), *flags]) == 2
    assert _one_line_error(capsys).startswith(expected)


def test_an_out_that_cannot_hold_a_report_is_refused_before_the_model_loads(tmp_path, capsys, no_model_load):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    assert main(["run", "--model", "demo", "--out", str(a_file)]) == 2
    assert _one_line_error(capsys) == f"--out {a_file} is a file; name a directory"
    beneath = a_file / "report"
    assert main(["run", "--model", "demo", "--out", str(beneath)]) == 2
    assert _one_line_error(capsys).startswith(f"--out {beneath} is not a writable directory")
    assert main(["eval", "--model", "demo", "--out", str(a_file)]) == 2
    assert _one_line_error(capsys) == f"--out {a_file} is a file; name a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_a_read_only_out_is_refused(tmp_path, capsys, no_model_load):
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o500)
    assert main(["run", "--model", "demo", "--out", str(locked)]) == 2
    assert _one_line_error(capsys).startswith(f"--out {locked} is not a writable directory")


def _holder(out: Path, seconds: float) -> subprocess.Popen:
    """Another process holding ``out`` as a run does, for ``seconds``."""
    code = (f"import sys, time; from pathlib import Path; from layerscan.rundir import hold_run_dir\n"
            f"with hold_run_dir(Path({str(out)!r})):\n"
            f"    print('held', flush=True); time.sleep({seconds})\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_on_one_out_names_the_holder_and_exits(tmp_path, capsys, no_model_load):
    out = tmp_path / "out"
    holder = _holder(out, 30)
    try:
        assert main(["run", "--model", "demo", "--out", str(out)]) == 2
        line = _one_line_error(capsys)
        assert line.startswith(f"--out {out} is in use by another layerscan run (pid {holder.pid} on ")
        assert "pass --wait" in line
    finally:
        holder.kill()
        holder.wait()
    # The kernel let go of the lock with the process: the directory is free again.
    with hold_run_dir(out):
        assert f"pid {os.getpid()} " in (out / LOCK_NAME).read_text()


def test_wait_takes_the_out_once_its_holder_finishes(tmp_path, capsys):
    out = tmp_path / "out"
    holder = _holder(out, 1.5)
    began = time.monotonic()
    with hold_run_dir(out, wait=True):
        waited = time.monotonic() - began  # until the holder's 1.5 s were over
        assert f"pid {os.getpid()} " in (out / LOCK_NAME).read_text()
    holder.wait()
    assert waited >= 1.0
    assert f"waiting for the layerscan run that holds {out} (pid {holder.pid} on " in capsys.readouterr().err


def _run(planted_dir, out: Path, prompts: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "layerscan.cli", "run", "--model", str(planted_dir), "--study",
           "tiny-qwen-image", "--prompts", str(prompts), "--out", str(out), "--strategy", "greedy",
           *CRITERION, *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_a_record_torn_by_a_kill_is_set_aside_and_its_evaluation_runs_once_more(planted_dir, two_prompts, tmp_path):
    out = tmp_path / "torn"
    _run(planted_dir, out, two_prompts)
    trials = out / "trials.jsonl"
    lines = trials.read_bytes().splitlines(keepends=True)
    last = json.loads(lines[-1])["record"]
    trials.write_bytes(b"".join(lines[:-1]))
    # A writer killed mid-record: half of the last line is on disk, its end never is.
    fragment = lines[-1][: len(lines[-1]) // 2]
    writer = (f"import os, signal\n"
              f"fh = open({str(trials)!r}, 'ab')\n"
              f"fh.write({fragment!r}); fh.flush(); os.fsync(fh.fileno())\n"
              f"os.kill(os.getpid(), signal.SIGKILL)\n")
    killed = subprocess.run([sys.executable, "-c", writer])
    assert killed.returncode == -signal.SIGKILL
    assert trials.read_bytes().endswith(fragment)

    again = _run(planted_dir, out, two_prompts)
    side = out / "trials.jsonl.torn"
    assert side.read_bytes() == fragment + b"\n"  # kept, not lost
    said = [line for line in again.stderr.splitlines() if "set aside" in line]
    assert said == [f"{trials}: 1 unreadable line(s) ({len(fragment)} bytes, a record cut off by a "
                    f"kill) set aside in {side}; its evaluation runs again"]
    records = [json.loads(line)["record"] for line in trials.read_text().splitlines()]  # all readable
    assert [r["config"] for r in records].count(last["config"]) == 1  # evaluated once more, once
    assert "(1 evaluated now)" in again.stdout
    third = _run(planted_dir, out, two_prompts)
    assert "(0 evaluated now)" in third.stdout and "set aside" not in third.stderr


def test_an_answer_cut_short_by_the_budget_is_marked_everywhere(planted_dir, two_prompts, tmp_path, capsys):
    out = tmp_path / "budget"
    done = _run(planted_dir, out, two_prompts, "--max-trials", "2")
    assert "not final: the trial budget ran out before the search finished" in done.stderr
    rec = json.loads((out / "recommendation.json").read_text())
    assert rec["final"] is False and rec["stop_reason"] == "budget"
    assert not (out / "row.md").exists()
    assert (out / "report.md").read_text().splitlines()[2].startswith("> **Not final:** the trial budget")
    assert main(["table", str(out)]) == 2
    assert _one_line_error(capsys).startswith(f"{out}: not a final answer (the trial budget ran out")
    # The JSON and the report state the same counts.
    report = (out / "report.md").read_text()
    timing = rec["timing"]
    assert f"{timing['wall']:.1f} s, {timing['outputs_generated']} images generated" in report
    assert f"{rec['evaluated_configurations']} FP8 configurations on record" in report


def test_the_settings_schema_agrees_with_what_runs():
    """Study's annotations are the settings schema; the choices they list are the ones that exist."""
    from layerscan.layers import GRANULARITIES, TEXT_ENCODER_GRANULARITIES
    from layerscan.profiles import MATCH_MODES
    from layerscan.search import STRATEGIES
    from layerscan.cli import build_parser
    from layerscan.search.answer import resolve_preference
    from layerscan.study import choices

    assert set(choices("strategy")) == set(STRATEGIES)
    assert set(choices("granularity")) == set(GRANULARITIES)
    assert set(choices("text_encoder_granularity")) == set(TEXT_ENCODER_GRANULARITIES)
    assert set(choices("layer_match")) == set(MATCH_MODES)
    assert all(resolve_preference(p, "cpu", "eager")[0] in choices("prefer") for p in choices("prefer"))
    # The command line offers exactly the schema's choices.
    run = build_parser()._subparsers._group_actions[0].choices["run"]
    offered = {a.dest: list(a.choices) for a in run._actions if a.choices}
    for name in ("strategy", "granularity", "text_encoder_granularity", "layer_match", "lpips_net",
                 "activation_scheme", "prefer"):
        assert offered[name] == choices(name), name


def test_an_eval_pattern_that_matches_no_layer_is_refused_before_the_baseline(tmp_path, capsys, monkeypatch):
    """The pattern needs the loaded layers, but not the baseline: refused in between."""
    def no_baseline(*args, **kwargs):
        raise AssertionError("the baseline was built before the pattern was checked")

    monkeypatch.setattr(session_module, "load_or_build_baseline", no_baseline)
    assert main(["eval", "--model", "tiny-qwen-image", "--ignore", "no_such_family",
                 "--out", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "no_such_family" in err[-1]
