"""Tests for the demo: seeded scenes, the task-level checker, and the shipped trained pipeline.

The checker is tested on pictures with known answers drawn two ways: with PIL here (CSS colours,
PIL's own shape drawing, independent of layerscan.demo.scenes) and with the scenes renderer the
pipeline was trained on. The pipeline tests load the shipped directory offline and generate on the
CPU exactly as layerscan generates its BF16 baseline.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from layerscan.demo import DEMO_PIPELINE_DIR
from layerscan.demo import checker, scenes
from layerscan.demo.checker import accuracy, check, parse_prompt, read_image

REPO = Path(__file__).resolve().parent.parent
DEMO_PROMPTS = REPO / "studies" / "prompts" / "demo.txt"

# CSS colours: what a person calls these names, not the training palette.
CSS = {
    "red": (255, 0, 0), "orange": (255, 165, 0), "yellow": (255, 255, 0), "green": (0, 128, 0),
    "cyan": (0, 255, 255), "blue": (0, 0, 255), "purple": (128, 0, 128), "pink": (255, 105, 180),
    "white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128),
}
CELL_CENTRES = {"top left": (10, 10), "top center": (32, 11), "top right": (53, 10),
                "middle left": (11, 32), "center": (32, 32), "middle right": (54, 31),
                "bottom left": (10, 53), "bottom center": (33, 54), "bottom right": (52, 53)}


def pil_scene(shape: str, colour: str, position: str, background: str, half: float = 8.0,
              offset: tuple[float, float] = (0.0, 0.0), blur: float = 0.0, noise: float = 0.0,
              seed: int = 0) -> np.ndarray:
    """A 64 px picture drawn with PIL at 4x and downsampled, optionally blurred and noisy."""
    k = 4
    cx, cy = CELL_CENTRES[position]
    cx, cy = (cx + offset[0]) * k, (cy + offset[1]) * k
    h = half * k
    img = Image.new("RGB", (64 * k, 64 * k), CSS[background])
    draw = ImageDraw.Draw(img)
    box = [cx - h, cy - h, cx + h, cy + h]
    if shape == "circle":
        draw.ellipse(box, fill=CSS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=CSS[colour])
    else:
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=CSS[colour])
    img = img.resize((64, 64), Image.LANCZOS)
    if blur:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    out = np.asarray(img, dtype=np.float64)
    if noise:
        out = out + np.random.default_rng(seed).normal(0.0, noise, out.shape)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def prompt(shape, colour, position, background) -> str:
    return scenes.caption(colour, shape, position, background)


# ----------------------------------------------------------------------------------------------
# Prompts and scenes
# ----------------------------------------------------------------------------------------------


def test_parse_prompt_reads_all_four_attributes():
    spec = parse_prompt("a red circle in the top left on a white background")
    assert (spec.colour, spec.shape, spec.position, spec.background) == ("red", "circle", "top left", "white")
    spec = parse_prompt("An orange triangle in the center on a black background")
    assert (spec.colour, spec.shape, spec.position, spec.background) == ("orange", "triangle", "center", "black")
    spec = parse_prompt("A grey square, upper right, on a grey background.")
    assert (spec.colour, spec.shape, spec.position, spec.background) == ("gray", "square", "top right", "gray")
    spec = parse_prompt("a blue circle")
    assert (spec.colour, spec.shape, spec.position, spec.background) == ("blue", "circle", None, None)


def test_every_caption_parses_back():
    for text in scenes.all_captions():
        spec = parse_prompt(text)
        assert scenes.caption(spec.colour, spec.shape, spec.position, spec.background) == text


def test_scenes_are_deterministic_from_the_seed():
    a, b, c = scenes.sample_scenes(20, 7), scenes.sample_scenes(20, 7), scenes.sample_scenes(20, 8)
    assert a == b and a != c
    assert np.array_equal(scenes.draw(a[0]), scenes.draw(b[0]))
    counts = {name: 0 for name in scenes.SHAPES}
    for s in scenes.sample_scenes(600, 0):
        counts[s.shape] += 1
        assert 0 <= s.cx - s.half_size and s.cx + s.half_size <= 64
    assert min(counts.values()) > 150  # uniform over shapes


def test_caption_words_are_single_tokens_and_prompt_set_is_trained_on():
    from layerscan import tiny

    tokenizer = tiny._qwen_tokenizer()
    words = {w for c in scenes.all_captions() for w in c.split()}
    assert all(len(tokenizer.tokenize(" " + w)) == 1 for w in words)
    prompts = [line for line in DEMO_PROMPTS.read_text().splitlines() if line and not line.startswith("#")]
    assert len(prompts) == 36 and set(prompts) <= set(scenes.all_captions())


# ----------------------------------------------------------------------------------------------
# The checker on pictures with known answers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("position", list(CELL_CENTRES))
@pytest.mark.parametrize("shape", scenes.SHAPES)
def test_checker_reads_pil_drawn_shapes(shape, position):
    for i, (colour, background) in enumerate([("red", "white"), ("cyan", "black"), ("purple", "gray"),
                                              ("yellow", "black"), ("pink", "white")]):
        half = 6.0 + i  # 12 to 20 px wide
        image = pil_scene(shape, colour, position, background, half=half, offset=(i % 3 - 1, 1 - i % 3))
        result = check(image, prompt(shape, colour, position, background))
        assert result.correct, (colour, background, half, checker.describe(result))


@pytest.mark.parametrize("colour", [c for c in CSS if c not in ("white", "black", "gray")])
def test_checker_names_css_colours(colour):
    for background in ("white", "black", "gray"):
        result = check(pil_scene("circle", colour, "center", background), prompt("circle", colour, "center", background))
        assert result.colour_ok and result.background_ok, checker.describe(result)


def test_checker_tolerates_soft_edges_and_noise():
    cases = [(shape, colour, position, background)
             for shape in scenes.SHAPES
             for colour, background in [("green", "white"), ("orange", "gray"), ("blue", "black")]
             for position in ("top left", "center", "bottom right")]
    for i, case in enumerate(cases):
        image = pil_scene(*case, half=7.5, blur=0.8, noise=6.0, seed=i)
        result = check(image, prompt(*case))
        assert result.correct, (case, checker.describe(result))


def test_checker_is_exact_on_rendered_training_scenes():
    sample = scenes.sample_scenes(120, 123)
    images = list((scenes.render(sample) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    assert accuracy(images, [s.caption for s in sample]) == {
        "colour": 1.0, "shape": 1.0, "position": 1.0, "background": 1.0, "correct": 1.0, "n": 120}


def test_checker_flags_each_wrong_attribute():
    image = pil_scene("circle", "red", "top left", "white")
    assert check(image, "a red circle in the top left on a white background").correct
    cases = {
        "a blue circle in the top left on a white background": "colour",
        "a red square in the top left on a white background": "shape",
        "a red triangle in the top left on a white background": "shape",
        "a red circle in the bottom right on a white background": "position",
        "a red circle in the top center on a white background": "position",
        "a red circle in the top left on a black background": "background",
    }
    for text, wrong in cases.items():
        result = check(image, text)
        assert not result.correct
        assert {a for a in checker.ATTRIBUTES if not getattr(result, f"{a}_ok")} == {wrong}, text


def test_checker_finds_no_shape_in_a_blank_picture():
    blank = np.full((64, 64, 3), 128, dtype=np.uint8)
    found = read_image(blank)
    assert found.shape is None and found.colour is None and found.background == "gray"
    result = check(blank, "a red circle in the center on a gray background")
    assert result.background_ok and not (result.colour_ok or result.shape_ok or result.position_ok)


def test_accuracy_counts_per_attribute():
    good = pil_scene("square", "green", "center", "white")
    images = [good, good, good, good]
    prompts = ["a green square in the center on a white background",
               "a green circle in the center on a white background",
               "a blue square in the center on a white background",
               "a green square in the top left on a black background"]
    acc = accuracy(images, prompts)
    assert acc == {"colour": 0.75, "shape": 0.75, "position": 0.75, "background": 0.75, "correct": 0.25, "n": 4}
    with pytest.raises(ValueError):
        accuracy(images, prompts[:2])


def test_accuracy_metric_scores_each_picture_against_its_prompt():
    from layerscan.metrics import Scorer

    good = pil_scene("square", "green", "center", "white")
    prompts = ["a green square in the center on a white background",
               "a green circle in the center on a white background"]
    summary = Scorer(["psnr", "accuracy"]).score([good, good], [good, good], prompts)
    assert [s["accuracy"] for s in summary.per_prompt] == [1.0, 0.0]
    assert summary.mean["accuracy"] == 0.5 and summary.worst["accuracy"] == 0.0
    assert summary.mean["psnr"] == 100.0  # the reference metrics still compare with the reference
    with pytest.raises(ValueError, match="needs the prompt"):
        Scorer(["accuracy"]).score_pair(good, good)


def test_accuracy_metric_refuses_prompts_the_checker_cannot_read():
    from layerscan.errors import UserError
    from layerscan.metrics import check_accuracy_prompts

    check_accuracy_prompts(["a red circle in the top left on a white background", "blue square"])
    with pytest.raises(UserError, match="1 prompt.*'a photo of a cat'"):
        check_accuracy_prompts(["a red circle", "a photo of a cat"])


def test_accuracy_criterion_stops_once_the_mean_is_out_of_reach():
    from layerscan.evaluate import failure_proven
    from layerscan.study import Criterion

    criterion = Criterion("accuracy", 0.75, 0.0)
    assert failure_proven([{"accuracy": 0.0}, {"accuracy": 0.0}], 4, criterion)  # at best 2/4
    assert not failure_proven([{"accuracy": 1.0}, {"accuracy": 0.0}], 4, criterion)  # 3/4 possible
    assert criterion.passes(0.75, 0.0) and not criterion.passes(0.7, 1.0)


# ----------------------------------------------------------------------------------------------
# The shipped pipeline
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_cpu_thread():
    """Tiny models gain nothing from intra-op threads, and a busy neighbour makes torch's pool spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo_pipe(one_cpu_thread):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(DEMO_PIPELINE_DIR, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def generated(demo_pipe) -> tuple[list[str], list[np.ndarray]]:
    """The first six prompts of the study's set, one image each, as layerscan generates them:
    seed 0 on a CPU generator, 20 steps, true CFG 4 with negative prompt " ", 64x64."""
    prompts = [line for line in DEMO_PROMPTS.read_text().splitlines() if line and not line.startswith("#")][:6]
    images = []
    for text in prompts:
        with torch.inference_mode():
            out = demo_pipe(prompt=text, negative_prompt=" ", true_cfg_scale=4.0, height=64, width=64,
                            num_inference_steps=20, generator=torch.Generator().manual_seed(0), output_type="np")
        image = np.asarray(out.images[0], dtype=np.float32)
        assert np.isfinite(image).all()
        images.append((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
    return prompts, images


def test_shipped_pipeline_directory():
    index = json.loads((DEMO_PIPELINE_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImagePipeline"
    assert index["transformer"] == ["diffusers", "QwenImageTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLQwenImage"]
    assert index["text_encoder"] == ["transformers", "Qwen2_5_VLForConditionalGeneration"]
    from safetensors import safe_open

    weights = sorted(DEMO_PIPELINE_DIR.rglob("*.safetensors"))
    assert {w.parent.name for w in weights} == {"transformer", "vae", "text_encoder"}
    for path in weights:
        with safe_open(str(path), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}, path
    total = sum(p.stat().st_size for p in DEMO_PIPELINE_DIR.rglob("*") if p.is_file())
    assert total <= 25 * 10**6
    record = json.loads((DEMO_PIPELINE_DIR / "training.json").read_text())
    assert record["parameters"]["transformer"] == 8_189_664


def test_shipped_pipeline_loads_offline_and_generates(demo_pipe, generated):
    from diffusers import QwenImagePipeline

    from layerscan.tiny import QWEN_TEMPLATE_PREFIX

    assert isinstance(demo_pipe, QwenImagePipeline)
    assert len(demo_pipe.tokenizer(QWEN_TEMPLATE_PREFIX).input_ids) == demo_pipe.prompt_template_encode_start_idx == 34
    assert demo_pipe.transformer.dtype == torch.bfloat16
    _, images = generated
    assert all(im.shape == (64, 64, 3) and im.dtype == np.uint8 for im in images)
    assert all(im.std() > 5 for im in images)  # pictures, not blank frames


def test_shipped_pipeline_follows_prompts_in_bf16(generated):
    # The shipped weights get 32 of the 36 study prompts fully right on the CPU in BF16 at 10
    # steps (89 %; 33 of 36 on the H200, see training.json); one miss is allowed for
    # thread-count-dependent rounding, so a regression in loading or generation still fails.
    prompts, images = generated
    results = [check(im, p) for im, p in zip(images, prompts)]
    assert sum(r.correct for r in results) >= 5, [checker.describe(r) for r in results]
    assert all(r.position_ok for r in results), [checker.describe(r) for r in results]


def test_demo_is_the_default_model_and_scores_accuracy(tmp_path, capsys, one_cpu_thread):
    from layerscan.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle in the top left on a white background\n"
                       "a blue square in the center on a black background\n")
    out = tmp_path / "eval"
    assert main(["eval", "--ignore", "img_mlp", "--prompts", str(prompts), "--steps", "3",
                 "--out", str(out)]) == 0
    assert "using the built-in demo model" in capsys.readouterr().err
    record = json.loads((out / "eval.json").read_text())
    assert record["config"] == ["img_mlp"]
    assert set(record["mean"]) == {"ssim", "psnr", "accuracy"}  # the demo study's metrics
    assert [p["accuracy"] in (0.0, 1.0) for p in record["per_prompt"]] == [True] * 4  # 2 seeds


def test_fp8_erases_the_planted_img_mlp_and_keeping_it_restores_the_picture(tmp_path, one_cpu_thread):
    """The shipped demo carries a massive activation in every block's img_mlp (training.json
    says how it was planted): FP8 everywhere fails the demo study's criterion by far, and
    img_mlp kept in BF16 restores the picture."""
    from layerscan.evaluate import evaluate
    from layerscan.session import open_session
    from layerscan.study import build_study, load_study

    record = json.loads((DEMO_PIPELINE_DIR / "training.json").read_text())
    assert record["planted"]["family"] == "img_mlp"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square in the center on a white background\n")
    values = load_study("demo")
    values.update(prompts=str(prompts), seeds=[0])
    session = open_session(build_study(values), "cpu", warn=lambda m: None)
    assert (session.criterion.metric, session.criterion.mean.value) == ("psnr", 30.0)
    psnr = {}
    for config in ([], ["img_mlp"]):
        result = evaluate(session.engine, config, session.spec, session.baseline, session.scorer,
                          session.criterion)
        psnr[tuple(config)] = result.mean["psnr"]
    assert psnr[()] < 25.0 < 32.0 < psnr[("img_mlp",)], psnr
