"""`layerscan run` end to end on tiny pipelines with known answers: planted, clean, broken."""

from __future__ import annotations

import json
import shutil
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from layerscan.cli import main
from layerscan.fp8 import FP8_DTYPE
from layerscan.report.document import write_report
from layerscan.runner import run_study
from layerscan.session import open_session
from layerscan.study import build_study, load_study

# Under vllm-omni the tiny pipelines in FP8 everywhere stay near their BF16 noise floor (~52 dB
# PSNR); a planted img_mlp drops FP8 everywhere to ~35 dB.  37 dB separates the two with margin.
CRITERION = ["--criterion-metric", "psnr", "--criterion-mean", "37", "--criterion-worst", "35"]
IMG_MLP = [f"transformer_blocks.{i}.img_mlp.{leaf}" for i in range(4) for leaf in ("net.0.proj", "net.2")]

def _run(model, out: Path, prompts: Path, *extra: str) -> dict:
    argv = ["run", "--model", str(model), "--study", "tiny-qwen-image", "--prompts", str(prompts),
            "--out", str(out), *CRITERION, *extra]
    assert main(argv) == 0
    return json.loads((out / "recommendation.json").read_text())


@pytest.mark.parametrize("strategy,extra", [
    ("greedy", []),
    ("auto", []),
    # 6 DiT families (vllm-omni 0.30.0 leaves Qwen-Image's text encoder alone): 64 subsets.
    ("exhaustive", ["--components", "transformer"]),
    ("optuna", ["--max-trials", "64"])])
def test_every_strategy_finds_the_planted_family(planted_dir, two_prompts, tmp_path, strategy, extra):
    rec = _run(planted_dir, tmp_path / strategy, two_prompts, "--strategy", strategy, *extra)
    # vLLM matches ignored_layers exactly: the pasteable list names every img_mlp layer.
    assert rec["quantization_config"] == {"method": "fp8", "ignored_layers": IMG_MLP}
    assert rec["ignored_layers_patterns"] == ["img_mlp"]
    assert rec["cli"] == f'--quantization fp8 --ignored-layers "{",".join(IMG_MLP)}"'
    # vLLM-Omni 0.30.0 quantizes only Qwen-Image's DiT: one component, one (flat) form.
    assert rec["target"] == "vllm-omni==0.30.0" and rec["forms"] == ["flat"]
    assert rec["quantization_config_per_component"] is None
    assert rec["layers"]["transformer"]["bf16"] == IMG_MLP and set(rec["layers"]) == {"transformer"}
    row = (tmp_path / strategy / "row.md").read_text()
    assert row == (f"| Tiny-Qwen-Image | `{planted_dir}` | Yes | | Keep `img_mlp` in BF16 | `img_mlp` |"
                   " No (vllm-omni==0.30.0 does not quantize it) |\n")
    trials = pd.read_csv(tmp_path / strategy / "trials.csv")
    fp8 = trials[~trials["bf16"]]
    assert len(fp8) == len(set(fp8["ignored_layers"].fillna("")))  # never evaluated twice
    assert {"psnr_mean", "psnr_worst", "ssim_mean", "weight_bytes_total", "seconds_per_image",
            "status"} <= set(trials.columns)
    if strategy == "exhaustive":
        assert len(fp8) == 2 ** 6
    if strategy == "optuna":
        assert (tmp_path / strategy / "study.db").is_file()
    report = (tmp_path / strategy / "report.md").read_text()
    for png in ("pareto.png", "images.png"):
        assert png in report and (tmp_path / strategy / png).is_file()
    assert "## What FP8 costs, component by component" in report
    # The one kept group is proven necessary: FP8 everywhere (img_mlp returned to FP8) fails.
    assert rec["minimality"]["necessary"] == {"img_mlp": []} and rec["minimality"]["unproven"] == []
    assert rec["final"] is True
    assert "a group is kept because the configuration then fails" in report
    assert re.search(r"\| `img_mlp` \| FP8 all \| [^\n]*\| fails", report)


@pytest.mark.parametrize("strategy", ["greedy", "auto"])
def test_clean_model_needs_nothing(two_prompts, tmp_path, strategy):
    rec = _run("tiny-qwen-image", tmp_path / "clean", two_prompts, "--strategy", strategy)
    assert rec["quantization_config"]["ignored_layers"] == []
    assert "| None |" in (tmp_path / "clean" / "row.md").read_text()
    # FP8 everywhere passed: nothing to try beyond it (under vllm-omni 0.30.0 the DiT is the one
    # quantized component, so attribution adds no component alone).
    assert set(rec["attribution"]) == {"transformer"}
    assert rec["evaluated_configurations"] == 1
    if strategy == "auto":
        assert "No proxy was measured" in (tmp_path / "clean" / "report.md").read_text()


def test_rerun_resumes_instead_of_repeating(planted_dir, two_prompts, tmp_path, capsys):
    _run(planted_dir, tmp_path / "r", two_prompts, "--strategy", "greedy")
    lines = (tmp_path / "r" / "trials.jsonl").read_text().splitlines()
    capsys.readouterr()
    _run(planted_dir, tmp_path / "r", two_prompts, "--strategy", "greedy")
    assert "(0 evaluated now)" in capsys.readouterr().out
    assert (tmp_path / "r" / "trials.jsonl").read_text().splitlines() == lines
    # A different criterion is a different question but the same measurements: still reused.
    _run(planted_dir, tmp_path / "r", two_prompts, "--strategy", "greedy", "--criterion-mean", "36")
    assert len((tmp_path / "r" / "trials.jsonl").read_text().splitlines()) == len(lines)


def test_nan_configuration_is_a_failed_trial_and_the_search_goes_on(planted_dir, two_prompts, tmp_path):
    values = load_study("tiny-qwen-image")
    values.update(model=str(planted_dir), prompts=str(two_prompts), criterion_metric="psnr",
                  criterion_mean=37.0, criterion_worst=35.0)
    session = open_session(build_study(values), "cpu")
    # FP8 weights of every to_out layer become NaN (e4m3fn has a NaN code): any configuration
    # that quantizes to_out now produces NaN images, for real, through the whole pipeline.
    session.engine.apply([])  # makes the FP8 copies, which stay resident ("both" on CPU)
    assert session.engine.residency == "both"
    modules = dict(session.loaded.transformer.named_modules())
    for layer in session.loaded.index.layers:
        if layer.engine_name.endswith("attn.to_out.0"):
            for name in layer.modules:
                modules[name].weight_fp8.fill_(float("nan"))
    poisoned = modules["transformer_blocks.0.attn.to_out.0"].weight_fp8
    assert poisoned.numel() > 0 and torch.isnan(poisoned.float()).all()
    session.engine.apply(None)
    outcome = run_study(session, tmp_path / "nan", "greedy")
    failed = [r for r in outcome.records if r.status == "failed"]
    assert failed and all("non-finite" in r.error for r in failed)
    assert all("to_out" not in (r.config or ()) for r in failed)
    assert outcome.recommended is not None
    assert set(outcome.recommended.config) == {"img_mlp", "to_out"}
    write_report(session, outcome, tmp_path / "nan")
    assert "failed" in (tmp_path / "nan" / "report.md").read_text()


def test_ctrl_c_keeps_finished_trials_and_rerun_resumes(planted_dir, two_prompts, tmp_path):
    out = tmp_path / "int"
    cmd = [sys.executable, "-m", "layerscan.cli", "run", "--model", str(planted_dir), "--study",
           "tiny-qwen-image", "--prompts", str(two_prompts), "--out", str(out),
           "--strategy", "exhaustive", "--components", "transformer", *CRITERION]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    trials = out / "trials.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (
            not trials.exists() or len(trials.read_text().splitlines()) < 4):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "rerun the same command to resume" in err
    lines = trials.read_text().splitlines()
    kept = len(lines)
    assert 4 <= kept < 64
    # The attribution stops FP8 everywhere early; the exhaustive search continues it in full.
    stopped = sum(json.loads(line)["record"]["status"] == "stopped" for line in lines)
    # The partial report is written too, and says everywhere that its answer is not final.
    report = (out / "report.md").read_text()
    assert report.splitlines()[2].startswith("> **Not final:** the run was interrupted")
    provisional = json.loads((out / "recommendation.json").read_text())
    assert provisional["final"] is False and provisional["stop_reason"] == "interrupted"
    assert "rerun the same command" in provisional["not_final_because"]
    assert not (out / "row.md").exists()
    assert main(["table", str(out)]) == 2
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    before = [json.loads(line)["record"] for line in lines]
    complete = {json.dumps(r["config"]) for r in before if r["status"] == "complete"}
    pending = len({json.dumps(r["config"]) for r in before if r["status"] == "stopped"} - complete)
    continued = f", {'one' if pending == 1 else pending} continued from an early stop" if pending else ""
    assert f"({64 - kept + stopped} evaluated now{continued})" in done.stdout
    final = json.loads((out / "recommendation.json").read_text())
    assert final["final"] is True and final["stop_reason"] == "done" and final["not_final_because"] is None
    assert (out / "row.md").is_file() and "Not final" not in (out / "report.md").read_text()
    assert main(["table", str(out)]) == 0
    records = [json.loads(line)["record"] for line in trials.read_text().splitlines()]
    assert len(records) == 64 + stopped  # the store only appends: a continued record is a new line
    assert len({json.dumps(r["config"]) for r in records if r["status"] == "complete"}) == 64


@pytest.mark.parametrize("target", ["vllm-omni==0.30.0", "seed"])
def test_the_text_encoder_runs_as_the_target_says_during_a_run(planted_dir, two_prompts, target):
    values = load_study("tiny-qwen-image")
    values.update(model=str(planted_dir), prompts=str(two_prompts), target=target)
    session = open_session(build_study(values), "cpu")
    session.engine.apply(["img_mlp"])
    up_proj = session.loaded.pipe.text_encoder.model.language_model.layers[0].mlp.up_proj
    if target == "vllm-omni==0.30.0":  # Qwen-Image's text encoder is loaded unquantized there
        assert not hasattr(up_proj, "fp8_enabled") and not hasattr(up_proj, "_layerscan_fp8_storage")
        assert up_proj.weight.dtype == torch.bfloat16
    else:  # FP8 weight storage, dequantized in forward hooks
        assert up_proj._layerscan_fp8_storage.weight_fp8.dtype == FP8_DTYPE
        assert up_proj.weight.numel() == 0


def test_a_criterion_metric_flag_brings_its_own_thresholds():
    from layerscan.cli import _study, build_parser
    from layerscan.errors import UserError
    from layerscan.study import Criterion

    parse = build_parser().parse_args
    # studies/demo.toml sets PSNR 30/25: those numbers mean nothing as an accuracy.
    assert _study(parse(["run", "--criterion-metric", "accuracy"])).criterion == Criterion("accuracy", 0.9, 0.0)
    assert _study(parse(["run", "--criterion-metric", "accuracy", "--criterion-mean", "0.7"])
                  ).criterion == Criterion("accuracy", 0.7, 0.0)
    with pytest.raises(UserError, match="outside the range of ssim"):
        _study(parse(["run", "--metrics", "ssim", "--criterion-metric", "ssim", "--criterion-mean", "30"]))


def test_the_missing_lpips_advice_works_as_printed(planted_dir, tmp_path, monkeypatch, capsys, two_prompts):
    """Without LPIPS weights the error names flags to continue with; run exactly those.  The
    model has no shipped study: metrics and criterion are the defaults (LPIPS)."""
    from layerscan.lpips_weights import WITHOUT_LPIPS_ADVICE

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    base = ["eval", "--model", str(planted_dir), "--prompts", str(two_prompts), "--steps", "2",
            "--height", "32", "--width", "32", "--out", str(tmp_path / "eval")]
    assert main(base) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    advice = message.split(WITHOUT_LPIPS_ADVICE, 1)[1].split()
    assert main(base + advice) == 0
    assert "criterion (psnr mean >= 30 and worst >= 25)" in capsys.readouterr().out


def test_no_image_is_generated_twice_in_a_run(planted_dir, two_prompts, tmp_path, monkeypatch):
    """Every pipeline call of a run, counted: the baseline and its floor variants once each,
    every FP8 evaluation once per image it scored, and the report draws on those images."""
    from diffusers import QwenImagePipeline

    calls = []
    original = QwenImagePipeline.__call__

    def counted(self, *args, **kwargs):
        calls.append(kwargs.get("prompt"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(QwenImagePipeline, "__call__", counted)
    out = tmp_path / "count"
    rec = _run(planted_dir, out, two_prompts, "--strategy", "greedy", "--cache-dir", str(tmp_path / "cache"))
    records = [json.loads(line)["record"] for line in (out / "trials.jsonl").read_text().splitlines()]
    images = 2 * 2  # two prompts, two seeds
    evaluated = sum(len(r["per_prompt"]) + (r["status"] == "failed") for r in records)
    # baseline + two noise-floor variants, then every FP8 evaluation's images; nothing else.
    assert len(calls) == 3 * images + evaluated
    # The run's own count of what it generated, taken before the report: the report adds none.
    assert rec["timing"]["outputs_generated"] == len(calls)
    # --cache-dir is the one cache: baseline, trial images and the proxy trajectory all live there.
    cache = tmp_path / "cache"
    assert {p.name for p in cache.iterdir()} >= {"baselines", "trials"}
    assert len(list((cache / "trials").rglob("*.png"))) == evaluated
    # Run again: everything is on record, nothing is generated at all.
    calls.clear()
    _run(planted_dir, out, two_prompts, "--strategy", "greedy", "--cache-dir", str(tmp_path / "cache"))
    assert calls == []
    # The outputs gone from the cache (another worker's, another cache's): still nothing is
    # generated, and the report says which columns its grid lacks.
    shutil.rmtree(cache / "trials")
    _run(planted_dir, out, two_prompts, "--strategy", "greedy", "--cache-dir", str(tmp_path / "cache"))
    assert calls == []
    report = (out / "report.md").read_text()
    assert ("Not shown: FP8 everywhere and the recommended configuration, whose images are not in "
            "this run's cache") in report
