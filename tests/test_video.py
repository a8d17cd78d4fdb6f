"""Video end to end on the tiny Wan 2.2 (two experts): every frame kept, cached, scored and shown;
a planted expert found in that expert only; the Wan row of the supported-models table.

The planted model is the built-in ``tiny-wan2.2-outlier``: a massive activation in every ``ffn``
input of the low-noise expert (``transformer_2``) alone.  On the two prompts used here FP8
everywhere gives ~46 dB PSNR, keeping ``transformer_2:ffn`` in BF16 53.7 dB, the BF16 noise
floor 53.7 dB; its study asks for 50 dB mean and 48 dB worst.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from layerscan.cli import main
from layerscan.errors import UserError
from layerscan.generate import _load_verified, baseline_key, load_or_build_baseline, load_png, save_png
from layerscan.metrics import Scorer
from layerscan.pipeline import is_video_pipeline, load_pipeline
from layerscan.proxy.capture import sample_plan
from layerscan.proxy.scores import Proxies
from layerscan.report.plots import frame_strips, strip_frames
from layerscan.report.table import HEADERS, column_keys, render_row, table_row, update_docs_table
from layerscan.runner import run_study
from layerscan.session import open_session, output_metrics
from layerscan.study import build_study, load_study

PLANTED = "tiny-wan2.2-outlier"
FRAMES = 5  # the tiny studies' clips: 2 latent frames
LOW_NOISE_FFN = [f"blocks.{i}.ffn.{leaf}" for i in range(2) for leaf in ("net_0.proj", "net_2")]
BOUNDARY = 875  # boundary_ratio 0.875 of 1000 training timesteps


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """Tiny models gain nothing from intra-op threads; on a shared 2-core machine a busy neighbour
    makes torch's pool spin (a 0.6 s clip took 4 s with two threads under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("p") / "prompts.txt"
    path.write_text("a red circle on a white background\na blue square in the top left corner\n")
    return path


def _session(model: str, prompts: Path, **overrides):
    values = load_study(PLANTED)
    values.update(model=model, prompts=str(prompts), **overrides)
    return open_session(build_study(values), "cpu", warn=lambda m: None)


@pytest.fixture(scope="module")
def planted(prompts):
    return _session(PLANTED, prompts)


def _run(session, out: Path, strategy: str):
    study = dataclasses.replace(session.study, strategy=strategy)
    return run_study(dataclasses.replace(session, study=study), out, strategy)


# --- outputs, cache and scores -------------------------------------------------------------------

def test_video_strips_round_trip_whatever_their_size(tmp_path, monkeypatch):
    video = np.random.default_rng(0).integers(0, 256, (FRAMES, 8, 12, 3), dtype=np.uint8)
    save_png(video, tmp_path / "clip.png")
    with Image.open(tmp_path / "clip.png") as strip:
        assert strip.size == (FRAMES * 12, 8)  # the frames side by side: viewable as they are
    # A long clip passes Pillow's decompression-bomb limit; the file is layerscan's own.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert np.array_equal(load_png(tmp_path / "clip.png"), video)
    assert Image.MAX_IMAGE_PIXELS == 100  # the guard is back for everything else
    image = video[0]
    save_png(image, tmp_path / "image.png")
    assert np.array_equal(load_png(tmp_path / "image.png"), image)


def test_frame_strips_show_evenly_spaced_frames_with_their_differences(tmp_path):
    assert strip_frames(81) == [0, 11, 23, 34, 46, 57, 69, 80] and strip_frames(5) == [0, 1, 2, 3, 4]
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 256, (81, 24, 40, 3), dtype=np.uint8)
    rows = [(f"prompt {i}", [("BF16", clip), ("FP8 all", 255 - clip)]) for i in range(2)]
    frame_strips(rows, tmp_path / "frames.png")
    with Image.open(tmp_path / "frames.png") as figure:
        assert figure.width > figure.height  # rows of 8 frames, 3 rows per prompt
    with pytest.raises(ValueError, match="TxHxWx3"):
        frame_strips([("p", [("BF16", clip[0])])], tmp_path / "x.png")


def test_is_video_is_decided_from_the_pipeline_and_sets_the_metrics(planted, tiny_qwen_dir):
    assert planted.loaded.video and is_video_pipeline(planted.loaded.pipe)
    assert planted.metrics == ["ssim", "psnr", "temporal"]  # temporal added for videos
    assert planted.scorer.video
    image = load_pipeline(str(tiny_qwen_dir), "cpu")
    assert not image.video
    assert output_metrics(["ssim", "psnr"], image) == ["ssim", "psnr"]
    with pytest.raises(UserError, match="temporal.*makes images"):
        output_metrics(["psnr", "temporal"], image)


def test_every_frame_is_kept_cached_and_scored(planted, tmp_path):
    baseline, spec = planted.baseline, planted.spec
    assert [v.shape for v in baseline.images] == [(FRAMES, 32, 32, 3)] * 2
    for variant, videos in baseline.floor_images.items():  # the noise floor is made of clips too
        assert [v.shape for v in videos] == [(FRAMES, 32, 32, 3)] * 2, variant
        assert "temporal" in planted.floor.variants[variant]["mean"]
    # The cache holds one verified PNG strip per clip and gives the clips back exactly.
    again = load_or_build_baseline(planted.loaded, spec)
    assert again.cached and all(np.array_equal(a, b) for a, b in zip(again.images, baseline.images))
    assert all(np.array_equal(a, b) for v in baseline.floor_images
               for a, b in zip(again.floor_images[v], baseline.floor_images[v]))
    planted.engine.apply(None)
    strip = baseline.directory / spec.image_name(0)
    corrupt = bytearray(strip.read_bytes())
    corrupt[-20] ^= 0xFF
    strip.write_bytes(bytes(corrupt))
    found, problem = _load_verified(baseline.directory, baseline_key(planted.loaded, spec), 2)
    assert found is None and problem == f"{spec.image_name(0)} does not match its recorded hash"
    rebuilt = load_or_build_baseline(planted.loaded, spec)
    assert not rebuilt.cached and all(np.array_equal(a, b) for a, b in zip(rebuilt.images, baseline.images))
    # An evaluation scores every frame: its PSNR is the mean of the frames' PSNRs.
    out = tmp_path / "fp8"
    from layerscan.evaluate import evaluate

    record = evaluate(planted.engine, [], spec, baseline, planted.scorer, image_dir=out)
    planted.engine.apply(None)
    video = load_png(out / spec.image_name(0))
    per_frame = [Scorer(("psnr",)).score_pair(f, r)["psnr"] for f, r in zip(video, baseline.images[0])]
    assert record.per_prompt[0]["psnr"] == pytest.approx(np.mean(per_frame), rel=1e-12)
    assert record.per_prompt[0]["temporal"] > planted.floor.worst["temporal"]  # FP8 adds flicker


# --- the proxies see both experts ----------------------------------------------------------------

def test_proxies_record_and_replay_each_expert_on_its_own_steps(planted):
    proxies = Proxies(planted)
    traj = proxies.trajectory
    assert traj.components == ["transformer", "transformer_2"]
    plan = sample_plan(planted.spec.steps, len(planted.spec.items()))
    for expert, above in (("transformer", True), ("transformer_2", False)):
        samples = [s for s in traj.samples if s.component == expert]
        assert len(samples) == len(plan)
        # Each expert's samples are its own calls: the high-noise one above the boundary.
        assert all((float(s.kwargs["timestep"][0]) >= BOUNDARY) == above for s in samples)
    assert traj.calls_per_image == 8  # 4 steps x (conditional + unconditional), both experts
    assert proxies.end_to_end(["transformer:", "transformer_2:"]) == 0.0  # BF16 replays exactly
    local = proxies.layer_local()
    assert set(local) == {layer.name for layer in planted.loaded.index.layers}
    top = max(local, key=local.get)
    assert top.startswith("transformer_2:") and ".ffn.net_0.proj" in top
    assert max(v for k, v in local.items() if not k.startswith("transformer_2:")) < local[top] / 50
    planted.engine.apply(None)


# --- known answers -------------------------------------------------------------------------------

def _assert_low_noise_ffn_only(config: dict) -> None:
    assert config == {"transformer": {"method": "fp8", "ignored_layers": []},
                      "transformer_2": {"method": "fp8", "ignored_layers": LOW_NOISE_FFN},
                      "text_encoder": None, "vae": None}


@pytest.fixture(scope="module")
def greedy(planted, tmp_path_factory):
    return _run(planted, tmp_path_factory.mktemp("greedy"), "greedy")


def test_greedy_keeps_the_planted_experts_ffn_and_nothing_of_the_other(greedy):
    outcome = greedy
    assert outcome.recommended.config == ("transformer_2:ffn",)
    singles = {r.config[0]: r for r in outcome.records if r.config and len(r.config) == 1}
    # Each group alone in BF16: only the planted one passes (besides keeping its expert whole).
    assert {p for p, r in singles.items() if r.passes} == {"transformer_2:", "transformer_2:ffn"}
    assert outcome.attribution == {"transformer": ("transformer_2:",), "transformer_2": ("transformer:",)}
    # The kept group is proven necessary: returned to FP8, that is FP8 everywhere, which fails.
    assert outcome.minimality.config == ("transformer_2:ffn",) and outcome.minimality.complete
    assert outcome.minimality.necessary == {"transformer_2:ffn": ()}


def test_auto_finds_it_from_the_command_line_with_frame_strips(planted, prompts, tmp_path, capsys):
    out = tmp_path / "auto"
    assert main(["run", "--model", PLANTED, "--prompts", str(prompts), "--out", str(out),
                 "--strategy", "auto"]) == 0
    rec = json.loads((out / "recommendation.json").read_text())
    assert rec["ignored_layers_patterns"] == ["transformer_2:ffn"] and rec["final"] is True
    assert rec["minimality"]["necessary"] == {"transformer_2:ffn": []}
    _assert_low_noise_ffn_only(rec["quantization_config"])
    assert rec["quantization_config_flat"] is None  # one flat list would reach both experts
    # FP8 everywhere, each expert alone in FP8, then the proxies' first choice: it passes.
    assert rec["evaluated_configurations"] == 4
    assert set(rec["attribution"]) == {"transformer", "transformer_2"}
    report = (out / "report.md").read_text()
    assert "## Videos" in report and "![frames](frames.png)" in report and "## Images" not in report
    assert "2 videos of 5 frames" in report and "| s/video |" in report
    assert "DiT, low-noise expert (`transformer_2`)" in report
    assert "components in order of what their FP8 alone costs: transformer_2, transformer" in report
    assert (out / "frames.png").is_file() and not (out / "images.png").exists()
    assert load_png(out / "images" / "recommended_p000_s0.png").shape == (FRAMES, 32, 32, 3)
    trials = pd.read_csv(out / "trials.csv")
    assert {"temporal_mean", "temporal_worst", "temporal_floor_mean"} <= set(trials.columns)
    capsys.readouterr()
    assert main(["table", str(out), "--format", "seed"]) == 0
    seed_row = capsys.readouterr().out.splitlines()[2]
    assert seed_row == f"| Tiny-Wan2.2-Outlier | `{PLANTED}` | ✅︎ | — | — | `transformer_2:ffn` |"


def test_auto_finds_a_planted_high_noise_expert_too(prompts, tmp_path_factory, tmp_path):
    from layerscan.tiny import save_planted

    # The high-noise expert's damage is partly repaired by the low-noise steps after it: a gain of
    # 16 makes it show (FP8 everywhere ~50 dB, ffn kept ~53 dB, transformer_2:ffn kept ~51 dB).
    model = save_planted("tiny-wan2.2", "ffn", None, tmp_path_factory.mktemp("m") / "high",
                         expert="transformer", branch_gain=16.0)
    session = _session(str(model), prompts, criterion_mean=52.0, criterion_worst=51.0)
    outcome = _run(session, tmp_path / "auto", "auto")
    assert outcome.recommended.config == ("ffn",)
    groups = {e["pattern"]: e["layer_local"] for e in outcome.notes["proxy"]["groups"]}
    assert max(groups, key=groups.get) == "ffn"


# --- the supported-models table ------------------------------------------------------------------

def test_the_wan_study_fills_upstreams_tbd_row_under_both_headers(planted, greedy, tmp_path):
    values = load_study("wan2.2")
    study = build_study(values)
    assert [(s["name"], s["steps"], s["height"], s["width"], s["pipeline_kwargs"]["num_frames"])
            for s in study.generation_settings()] == [("33f", 40, 480, 832, 33), ("81f", 40, 480, 832, 81)]
    assert study.criterion.describe() == "lpips mean <= 0.2 and worst <= 0.35"
    record = greedy.recommended
    row = table_row(study.name, study.model, planted.loaded, record, study.criterion.describe())
    omni = render_row(row, column_keys(HEADERS["vllm-omni"].splitlines()[0], "test"))
    assert omni == ("| Wan2.2 | `Wan-AI/Wan2.2-T2V-A14B-Diffusers` | Yes | | Keep `transformer_2:ffn` "
                    "in BF16 | `transformer_2:ffn` | No (vllm-omni==0.30.0 does not quantize it) |")
    seed = render_row(row, column_keys(HEADERS["seed"].splitlines()[0], "test"))
    assert seed == "| Wan2.2 | `Wan-AI/Wan2.2-T2V-A14B-Diffusers` | ✅︎ | — | — | `transformer_2:ffn` |"
    docs = tmp_path / "fp8.md"
    docs.write_text(
        "| Model | HF models | Online | Pre-calibrated | Recommendation | `ignored_layers` | Text-Encoder quantization |\n"
        "|-------|-----------|:-------:|:------:|----------------|------------------|------------------|\n"
        "| Wan2.2 | Wan2.2 diffusion pipelines | Not validated | Not validated | Validate against BF16 "
        "before documenting as supported | TBD | |\n")
    assert update_docs_table(docs, [row]) == ["replaced"]  # matched by the study's name
    assert docs.read_text().splitlines()[2] == omni.replace("| Yes | |", "| Yes | Not validated |")
