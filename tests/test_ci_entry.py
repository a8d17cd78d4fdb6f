"""The quality-test entry: upstream's QualityTestConfig form, a threshold derived from the
measurement, per-GPU thresholds across reports, and an honest mark where it cannot be upstream's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision

from layerscan.cli import main
from layerscan.report.ci_entry import (
    REQUIRED_FIELDS, UPSTREAM, build_entry, gpu_key, merge_by_gpu, parse_entry, render_entry, round_up,
)

ALEX_FILE = Path(torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url).name  # the LPIPS trunk's file
PLANTED = {"method": "fp8", "ignored_layers": ["transformer_blocks.0.img_mlp.net.2"]}


def _entry(**overrides) -> dict:
    values = dict(model="Qwen/Qwen-Image", quantization=PLANTED, video=False, edit=False,
                  prompt="a red fox", seed=0, steps=20, height=1024, width=1024, guidance=4.0,
                  num_frames=None, lpips_ci_high=0.1234, lpips_first=0.1010, lpips_floor=0.0151,
                  device_name="NVIDIA H100 80GB HBM3", metric="lpips")
    return build_entry(**{**values, **overrides})


def test_an_entry_is_upstreams_form_with_a_measured_threshold():
    entry = _entry()
    source = render_entry(entry)
    fields = parse_entry(source)
    assert set(REQUIRED_FIELDS) <= set(fields)
    assert fields["id"] == "fp8_qwen_image" and fields["task"] == "t2i"
    assert fields["quantization"] == PLANTED and fields["num_inference_steps"] == 20
    assert fields["max_lpips"] == 0.14  # 0.1234 + 0.0151 = 0.1385, rounded up at two decimals
    assert entry["for_upstream"] and entry["gpu"] == "H100"
    assert UPSTREAM["commit"] in json.dumps(entry["upstream"])
    assert "# max_lpips: max(LPIPS mean's 95 % CI upper end 0.1234, this output's 0.1010) + noise " \
           "floor 0.0151 (worst), rounded up (measured on NVIDIA H100 80GB HBM3)" in source


def test_the_one_output_upstream_scores_sets_the_threshold_when_it_is_worse_than_the_mean():
    hard = _entry(lpips_first=0.2013)  # the entry's prompt and seed is a hard one
    assert hard["fields"]["max_lpips"] == 0.22  # 0.2013 + 0.0151, rounded up


def test_thresholds_round_up_never_down():
    assert round_up(0.15) == 0.15 and round_up(0.1501) == 0.16 and round_up(0.149999999999) == 0.15


def test_one_model_on_two_gpus_gets_per_gpu_thresholds():
    h100 = _entry()
    b200 = _entry(lpips_ci_high=0.15, lpips_floor=0.02, device_name="NVIDIA B200")
    (merged,) = merge_by_gpu([h100, b200])
    assert merged["fields"]["max_lpips"] == {"B200": 0.17, "H100": 0.14}
    assert parse_entry(render_entry(merged))["max_lpips"] == {"B200": 0.17, "H100": 0.14}
    assert gpu_key("NVIDIA H200") == "H200" and gpu_key(None) is None
    (again,) = merge_by_gpu([h100, _entry(lpips_ci_high=0.16)])  # the same GPU twice: the looser
    assert again["fields"]["max_lpips"] == 0.18
    from layerscan.errors import UserError

    with pytest.raises(UserError, match="differ in num_inference_steps"):
        merge_by_gpu([h100, _entry(steps=50)])


def test_an_entry_without_lpips_or_for_an_edit_pipeline_is_not_for_upstream():
    entry = _entry(lpips_ci_high=None, lpips_floor=None, metric="psnr")
    source = render_entry(entry)
    assert not entry["for_upstream"] and entry["fields"]["max_lpips"] is None
    assert source.startswith("# NOT FOR UPSTREAM: LPIPS was not measured (scored with psnr)")
    assert parse_entry(source)["max_lpips"] is None
    edit = _entry(edit=True)
    assert not edit["for_upstream"] and "no task for editing pipelines" in render_entry(edit)
    cpu = _entry(device_name=None)
    assert not cpu["for_upstream"] and "measured on the CPU" in render_entry(cpu)
    provisional = _entry(final=False)
    assert not provisional["for_upstream"] and "the answer is not final" in render_entry(provisional)
    video = _entry(video=True, num_frames=81)
    assert parse_entry(render_entry(video))["task"] == "t2v" and video["fields"]["num_frames"] == 81


def test_parse_refuses_what_upstream_could_not_hold():
    with pytest.raises(ValueError):
        parse_entry('QualityTestConfig(id="x", task="t2i", prompt="p")')  # no max_lpips
    with pytest.raises(ValueError):
        parse_entry('QualityTestConfig(id="x", task="t2i", prompt="p", max_lpips=0.1, lora="y")')


def test_a_run_with_lpips_writes_an_entry_derived_from_its_measurement(
        planted_dir, two_prompts, tmp_path, monkeypatch, capsys):
    """A real run scored with LPIPS (a random-weight AlexNet trunk in a temporary TORCH_HOME:
    the loading path is real, the values mean nothing), and its entry parsed back."""
    home = tmp_path / "torch"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(1234)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(),
               home / "hub" / "checkpoints" / ALEX_FILE)
    monkeypatch.setenv("TORCH_HOME", str(home))
    out = tmp_path / "run"
    assert main(["run", "--model", str(planted_dir), "--study", "tiny-qwen-image", "--prompts",
                 str(two_prompts), "--out", str(out), "--metrics", "lpips,psnr", "--strategy", "greedy",
                 "--criterion-metric", "psnr", "--criterion-mean", "37", "--criterion-worst", "35"]) == 0
    rec = json.loads((out / "recommendation.json").read_text())
    entry = rec["ci_entry"]
    fields = parse_entry(entry["python"])
    assert fields["quantization"] == rec["quantization_config"]
    high = rec["metrics"]["ci95"]["lpips"][1]
    assert entry["derivation"]["lpips_ci95_high"] == high
    base = max(high, entry["derivation"]["lpips_of_this_output"])
    assert fields["max_lpips"] == round_up(base + rec["noise_floor"]["worst"]["lpips"])
    # Measured on the CPU: no GPU key, and marked not for upstream (FP8 emulated eagerly).
    assert not entry["for_upstream"] and entry["gpu"] is None
    assert entry["python"] in (out / "report.md").read_text()
    capsys.readouterr()
    assert main(["table", "--ci-entries", str(out)]) == 0
    assert parse_entry(capsys.readouterr().out) == fields


@pytest.mark.parametrize("report", sorted((Path(__file__).resolve().parent.parent / "reports").glob("*/report.md")),
                         ids=lambda p: p.parent.name)
def test_the_committed_example_reports_carry_an_entry_upstreams_test_could_hold(report):
    """Each example report shows the entry, in a python block after the quality-test line, and
    it parses as upstream's QualityTestConfig with the recommendation.json's fields."""
    text = report.read_text()
    section = text[text.index("Entry for vLLM-Omni's FP8 quality test"):]
    block = section[section.index("```python\n") + len("```python\n"):]
    block = block[:block.index("```")]
    values = parse_entry(block)
    rec = json.loads((report.parent / "recommendation.json").read_text())
    assert values == {k: v for k, v in rec["ci_entry"]["fields"].items()}
    assert values["quantization"] == rec["quantization_config"]
