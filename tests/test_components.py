"""The text encoder as a search dimension: known answers under both schemes, attribution first.

tiny-z-image with a massive activation planted in the MLP input of text-encoder layer 1
(compensated in high precision, so BF16 is unchanged bit for bit).  Under ``vllm-omni`` the text
encoder runs W8A8 with per-token activation scales, so layer 1's gate/up projections lose their
input: FP8 everywhere lands near 27 dB PSNR, keeping layer 1 in BF16 near 33 dB, the whole text
encoder near 37 dB (the BF16 noise floor is ~45.6 dB).  Under ``seed`` the text encoder only
stores its weights in FP8: activations are untouched and FP8 everywhere stays near 33 dB.
A 30 dB mean (worst 25 dB) separates these with margin.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from layerscan.cli import main

CRITERION = ["--criterion-metric", "psnr", "--criterion-mean", "30", "--criterion-worst", "25"]
LAYER_1 = [f"model.layers.1.{p}" for p in (
    "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
    "self_attn.q_proj", "self_attn.v_proj")]


@pytest.fixture(scope="module")
def te_planted(tmp_path_factory) -> Path:
    from layerscan.tiny import save_planted_text_encoder

    return save_planted_text_encoder("tiny-z-image", 1, tmp_path_factory.mktemp("m") / "te1")


def _run(model: Path, out: Path, prompts: Path, *extra: str) -> dict:
    argv = ["run", "--model", str(model), "--prompts", str(prompts), "--steps", "4",
            "--height", "32", "--width", "32", "--metrics", "ssim,psnr", "--out", str(out),
            *CRITERION, *extra]
    assert main(argv) == 0
    return json.loads((out / "recommendation.json").read_text())


@pytest.mark.parametrize("strategy", ["greedy", "auto"])
def test_vllm_omni_keeps_the_planted_text_encoder_layer_and_nothing_in_the_dit(
        te_planted, two_prompts, tmp_path, strategy):
    rec = _run(te_planted, tmp_path / strategy, two_prompts, "--strategy", strategy,
               "--text-encoder-granularity", "block")
    assert rec["ignored_layers_patterns"] == ["text_encoder:model.layers.1."]
    # vLLM-Omni 0.30.0's Z-Image pipeline cannot load a per-component map: it is never offered.
    assert rec["forms"] == ["flat"] and rec["quantization_config_per_component"] is None
    # Z-Image's DiT and text encoder names never collide: one flat list says it.
    assert rec["quantization_config"] == {"method": "fp8", "ignored_layers": LAYER_1}
    assert rec["layers"]["text_encoder"]["bf16"] == LAYER_1 and not rec["layers"]["transformer"]["bf16"]
    attribution = rec["attribution"]
    assert attribution["text_encoder"]["passes"] is False  # the text encoder alone in FP8 fails
    assert attribution["transformer"]["passes"] is True  # the DiT alone in FP8 is fine
    report = (tmp_path / strategy / "report.md").read_text()
    lead = report.index("## What FP8 costs, component by component")
    assert lead < report.index("## Recommendation")  # the report leads with attribution
    if strategy == "auto":  # attribution put the text encoder first, its proxy layer 1
        assert "components in order of what their FP8 alone costs: text_encoder, transformer" in report
        assert rec["evaluated_configurations"] <= 5


def test_seed_text_encoder_needs_nothing(te_planted, two_prompts, tmp_path):
    rec = _run(te_planted, tmp_path / "seed", two_prompts, "--target", "seed", "--strategy", "greedy")
    assert rec["target"] == "seed" and rec["layer_match"] == "substring"
    assert rec["ignored_layers_patterns"] == []
    assert rec["quantization_config"] == {"method": "fp8", "ignored_layers": []}


def test_when_nothing_passes_the_report_names_the_component_that_sets_the_floor(
        te_planted, two_prompts, tmp_path):
    out = tmp_path / "floor"
    # 40 dB: the text encoder alone in FP8 (~28 dB) misses it by far, the DiT alone (~37 dB) by
    # less; the budget ends the search after the attribution.
    argv = ["run", "--model", str(te_planted), "--prompts", str(two_prompts), "--steps", "4",
            "--height", "32", "--width", "32", "--metrics", "ssim,psnr", "--out", str(out),
            "--criterion-metric", "psnr", "--criterion-mean", "40", "--criterion-worst", "25",
            "--strategy", "greedy", "--max-trials", "3"]
    assert main(argv) == 0
    rec = json.loads((out / "recommendation.json").read_text())
    assert rec["quantization_config"] is None
    report = (out / "report.md").read_text()
    assert "The `text_encoder` sets the floor" in report
    # The budget cut the search short: the row is in the report, but no row.md to publish.
    assert "| Keep BF16: no FP8 configuration met" in report
    assert rec["final"] is False and not (out / "row.md").exists()
