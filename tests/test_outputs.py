"""What users paste: quantization_config in the target's form, and table rows in the target's columns."""

from __future__ import annotations

import pytest

from layerscan.errors import UserError
from layerscan.evaluate import TrialRecord
from layerscan.pipeline import load_pipeline
from layerscan.report.outputs import cli_flags, quantization_configs, serve_flag
from layerscan.report.table import HEADERS, render_table, table_row, update_docs_table

IMG_MLP = [f"transformer_blocks.{i}.img_mlp.{leaf}" for i in range(4) for leaf in ("net.0.proj", "net.2")]

# vLLM-Omni's FP8 page as it is today (rows abridged), and as the seed guide had it.
UPSTREAM = """# FP8

Intro text.

| Model | HF models | Online | Pre-calibrated | Recommendation | `ignored_layers` | Text-Encoder quantization |
|-------|-----------|:-------:|:------:|----------------|------------------|------------------|
| Qwen-Image | `Qwen/Qwen-Image`, `Qwen/Qwen-Image-2512` | Yes | Yes | Skip sensitive image-stream MLPs when quality regresses | `img_mlp` | |
| Wan2.2 | Wan2.2 diffusion pipelines | Not validated | Not validated | Validate against BF16 before documenting as supported | TBD | |
| Z-Image | `Tongyi-MAI/Z-Image-Turbo` | Yes | Yes | All layers | None | ✅︎ |

Text after the table.
"""
SEED = """| Model | HF Models | DiT FP8 | Text Encoder FP8 | VAE FP8 | `ignored_layers` |
|-------|-----------|:-------:|:----------------:|:-------:|------------------|
| Qwen-Image | `Qwen/Qwen-Image` | ✅ | ✅ | ✅ | `img_mlp` |
"""


NOT_QUANTIZED = "No (vllm-omni==0.30.0 does not quantize it)"


@pytest.fixture(scope="module")
def omni(tiny_qwen_dir):
    return load_pipeline(str(tiny_qwen_dir), "cpu")


@pytest.fixture(scope="module")
def z_image():
    from layerscan.tiny import tiny_pipeline_dir

    return load_pipeline(str(tiny_pipeline_dir("tiny-z-image")), "cpu")


@pytest.fixture(scope="module")
def seed(tiny_qwen_dir):
    return load_pipeline(str(tiny_qwen_dir), "cpu", target="seed")


def record(*config: str) -> TrialRecord:
    return TrialRecord(tuple(sorted(config)), "complete", passes=True)


def test_exact_matching_lists_every_layer_and_the_flat_form_is_equivalent(omni):
    configs = quantization_configs(record("img_mlp"), omni)
    assert configs["flat"] == {"method": "fp8", "ignored_layers": IMG_MLP}
    assert configs["paste"] is configs["flat"]
    assert configs["per_component"] is None  # Qwen-Image's pipeline does not route a map by name
    assert cli_flags(configs["flat"]) == f'--quantization fp8 --ignored-layers "{",".join(IMG_MLP)}"'
    assert serve_flag(configs["flat"]).startswith("--diffusion-quantization-config '{\"method\":\"fp8\"")


def test_a_text_encoder_kept_whole_is_listed_in_full_flat_and_none_per_component(z_image, seed):
    w2 = [l.engine_name for l in z_image.index.of("transformer") if l.engine_name.endswith(".w2")]
    TE = [l.engine_name for l in z_image.index.of("text_encoder")]
    configs = quantization_configs(record("text_encoder:", "w2"), z_image)
    assert configs["per_component"] is None  # Z-Image's pipeline cannot load a map
    assert configs["paste"]["ignored_layers"] == sorted(w2 + TE)
    one_layer = quantization_configs(record("text_encoder:model.layers.1."), z_image)
    assert one_layer["paste"]["ignored_layers"] == sorted(n for n in TE if n.startswith("model.layers.1."))
    # Where a map is the only way to say it (seed: a text encoder stored whole), it is None there.
    stored = quantization_configs(record("text_encoder:", "img_mlp"), seed)
    assert stored["per_component"]["text_encoder"] is None and stored["flat"] is None


def test_substring_matching_keeps_the_compact_patterns(seed):
    configs = quantization_configs(record("img_mlp"), seed)
    assert configs["flat"] == {"method": "fp8", "ignored_layers": ["img_mlp"]}
    # The seed scheme's VAE is weight storage: keeping it in BF16 cannot be said with a list.
    configs = quantization_configs(record("img_mlp", "vae:"), seed)
    assert configs["flat"] is None
    assert configs["paste"] == configs["per_component"]
    assert configs["per_component"]["vae"] is None
    assert configs["per_component"]["text_encoder"] == {"method": "fp8", "ignored_layers": []}


def test_update_fills_todays_upstream_columns_and_keeps_every_other_byte(omni, tmp_path):
    doc = tmp_path / "fp8.md"
    doc.write_bytes(UPSTREAM.replace("\n", "\r\n").encode())
    row = table_row("Qwen-Image", "Qwen/Qwen-Image", omni, record("img_mlp"), "lpips mean <= 0.35")
    assert update_docs_table(doc, [row]) == ["replaced"]
    after = doc.read_bytes().decode()
    lines = after.split("\r\n")
    qwen = next(l for l in lines if l.startswith("| Qwen-Image |"))
    # Pre-calibrated is not something a run measures: the existing cell stays.
    assert qwen == ("| Qwen-Image | `Qwen/Qwen-Image` | Yes | Yes | Keep `img_mlp` in BF16 | "
                    f"`img_mlp` | {NOT_QUANTIZED} |")
    before_lines = UPSTREAM.split("\n")
    assert [l for l in lines if not l.startswith("| Qwen-Image |")] == \
        [l for l in before_lines if not l.startswith("| Qwen-Image |")]
    assert after.count("\r\n") == UPSTREAM.count("\n")  # CRLF kept, no line added or lost
    new = table_row("Tiny", "org/tiny", omni, None, "psnr mean >= 40")
    assert update_docs_table(doc, [new]) == ["inserted"]
    inserted = doc.read_bytes().decode().split("\r\n")
    assert inserted[inserted.index(next(l for l in inserted if l.startswith("| Z-Image"))) + 1] == \
        ("| Tiny | `org/tiny` | No | | Keep BF16: no FP8 configuration met psnr mean >= 40 "
         f"(see the layerscan report) | TBD | {NOT_QUANTIZED} |")


def test_update_fills_the_seed_columns(seed, tmp_path):
    doc = tmp_path / "old.md"
    doc.write_text(SEED)
    row = table_row("Qwen-Image", "Qwen/Qwen-Image", seed, record("img_mlp", "vae:"), "c")
    assert update_docs_table(doc, [row]) == ["replaced"]
    assert doc.read_text().splitlines()[2] == "| Qwen-Image | `Qwen/Qwen-Image` | ✅︎ | ✅︎ | — | `img_mlp` |"


def test_a_header_it_cannot_map_is_one_line(tmp_path, omni):
    doc = tmp_path / "odd.md"
    doc.write_text("| Model | Speed-up | `ignored_layers` |\n|---|---|---|\n| A | 1.2x | None |\n")
    with pytest.raises(UserError, match="cannot fill the table column 'Speed-up'") as err:
        update_docs_table(doc, [table_row("A", "org/a", omni, record(), "c")])
    assert "\n" not in str(err.value)
    assert doc.read_text().endswith("| A | 1.2x | None |\n")  # untouched


def test_render_table_under_either_header(omni):
    row = dict(table_row("Qwen-Image", "Qwen/Qwen-Image", omni, record(), "c"), _header="vllm-omni")
    today = render_table([row])
    assert today.startswith(HEADERS["vllm-omni"]) and f"| All layers | None | {NOT_QUANTIZED} |" in today
    assert render_table([row], HEADERS["seed"]).endswith("| ✅︎ | — | — | None |\n")
