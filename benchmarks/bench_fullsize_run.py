#!/usr/bin/env python3
"""A full-size Qwen-Image pipeline through `layerscan run`, end to end, on one GPU.

    python benchmarks/bench_fullsize_run.py --mode eager    --out results/fullsize_eager.json
    python benchmarks/bench_fullsize_run.py --mode compiled --out results/fullsize_compiled.json
    python benchmarks/bench_fullsize_run.py --mode eager --cap-gb 80 --out results/fullsize_cap80.json

The pipeline is built from configs with random weights directly in GPU memory (no download, no
disk): diffusers' default ``QwenImageTransformer2DModel`` (the 20.4 B DiT), a text encoder of
Qwen2.5-VL-7B's shape, the default ``AutoencoderKLQwenImage`` and layerscan's offline Qwen
tokenizer.  Random weights are right for time and memory, never for quality: the criterion here
(PSNR mean >= 60 dB, worst >= 0) is one no configuration meets and none can be proven to miss
early, so every evaluation runs in full and the search runs until its trial budget.

Recorded: the phases of the run (model build, BF16 baseline with its noise-floor variants, each
evaluation, report), seconds per image of BF16 and of every FP8 configuration (median; the
first image of a configuration includes compilation when compiled), peak GPU memory, and the
share of wall time spent outside image generation.  ``--cap-gb`` caps this process's GPU memory
(``torch.cuda.set_per_process_memory_fraction``) so the BF16 and FP8 copies of the quantized
layers do not fit side by side and the requantize residency runs at full size.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
# ``--code DIR``: the layerscan package to measure, e.g. an earlier commit's
# (``git archive COMMIT layerscan | tar -x -C DIR``), so before and after run in one call.
_code = sys.argv[sys.argv.index("--code") + 1] if "--code" in sys.argv else str(REPO)
sys.path.insert(0, _code)

PROMPTS = ("a red fox in fresh snow, morning light, photograph",
           "a street sign that reads OPEN 24 HOURS, neon, night",
           "a bowl of ramen on a wooden table, steam, closeup")


def build_pipeline(device: torch.device, smoke: bool = False):
    """Full-size Qwen-Image with random BF16 weights, created on ``device`` directly (``smoke``:
    the same classes at toy sizes, to test this script where no GPU is)."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from layerscan import tiny

    tokenizer = tiny._qwen_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # 20 B parameters would not fit in float32 first
    try:
        with torch.device(device):
            torch.manual_seed(0)
            if smoke:
                transformer = QwenImageTransformer2DModel(num_layers=2, attention_head_dim=16,
                                                          num_attention_heads=2, joint_attention_dim=64,
                                                          axes_dims_rope=(4, 6, 6))
                text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, mrope_section=[2, 3, 3])
            else:
                transformer = QwenImageTransformer2DModel()
                text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                            num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                            mrope_section=[16, 24, 24])
            mrope = text.pop("mrope_section")
            config = Qwen2_5_VLConfig(
                text_config=dict(**text, max_position_embeddings=128000,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                  "mrope_section": mrope},
                                 bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                                 pad_token_id=tokenizer.pad_token_id),
                vision_config=dict(out_hidden_size=text["hidden_size"]) if not smoke else dict(
                    depth=1, hidden_size=64, intermediate_size=128, num_heads=2,
                    out_hidden_size=64, fullatt_block_indexes=[0]),
                image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
            text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
            vae = AutoencoderKLQwenImage(base_dim=16, dim_mult=[1, 2], num_res_blocks=1,
                                         temperal_downsample=[False]) if smoke else AutoencoderKLQwenImage()
    finally:
        torch.set_default_dtype(default_dtype)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=math.log(3), max_shift=math.log(3),
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
        time_shift_type="exponential")
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                             tokenizer=tokenizer, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _threshold(text: str):
    try:
        return float(text)
    except ValueError:
        return text  # "floor - N": the study resolves it against the measured noise floor


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("eager", "compiled"), default="eager")
    p.add_argument("--cap-gb", type=float, default=None, help="cap this process's GPU memory")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--settings", type=lambda t: [int(x) for x in t.split(",")],
                   help="square sizes of a settings matrix, e.g. 1024,1328 (replaces --size)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--prompts", type=int, default=3, help="images per configuration (>= 3: the "
                   "median then leaves out a first image that includes compilation)")
    p.add_argument("--max-trials", type=int, default=4, help="FP8 configurations to evaluate")
    p.add_argument("--strategy", default="greedy")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: tests the script")
    p.add_argument("--code", help="directory holding the layerscan package to measure (default: this checkout's)")
    p.add_argument("--label", help="what the tables call this code, e.g. 'before (22249cb)'")
    p.add_argument("--plant", action="store_true",
                   help="plant a massive activation in every block's img_mlp input (as "
                        "tiny-qwen-image-outlier does), so there is an answer to find: img_mlp")
    p.add_argument("--criterion-mean", default="60", help="PSNR mean threshold (a number or 'floor - N')")
    p.add_argument("--criterion-worst", default="0", help="PSNR worst-image threshold")
    args = p.parse_args(argv)

    from layerscan.generate import synchronize
    from layerscan.pipeline import wrap_pipeline
    from layerscan.report.document import write_report
    from layerscan.runner import run_study
    from layerscan.session import open_session
    from layerscan.study import build_study

    device = torch.device("cpu" if args.smoke else "cuda")
    if args.cap_gb:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(args.cap_gb * 2**30 / total, torch.cuda.current_device())
    try:  # where the run's time went, phase by phase (packages before layerscan.clock lack it)
        from layerscan.clock import CLOCK, timing_since
        started = CLOCK.snapshot()
    except ImportError:
        timing_since = None
    work = Path(tempfile.mkdtemp(prefix="layerscan-fullsize-"))
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:args.prompts]) + "\n")
    phases: dict[str, float] = {}
    wall = time.perf_counter()
    start = time.perf_counter()
    pipe = build_pipeline(device, args.smoke)
    if args.plant:
        from layerscan.plant import plant_massive_activation

        with torch.no_grad():
            plant_massive_activation(pipe, "img_mlp")
    synchronize(device)
    phases["build"] = time.perf_counter() - start
    params = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
              for name in ("transformer", "text_encoder", "vae")}

    generation = {"seconds": 0.0, "images": 0}
    calls: list[tuple[int, float]] = []  # (height, seconds) of every image, in order
    call = type(pipe).__call__

    @functools.wraps(call)  # keeps the signature: layerscan reads it to find the CFG knob
    def timed(self, *a, **kw):  # every image generated, whatever generates it
        synchronize(device)
        t = time.perf_counter()
        try:
            return call(self, *a, **kw)
        finally:
            synchronize(device)
            generation["seconds"] += time.perf_counter() - t
            generation["images"] += 1
            calls.append((kw.get("height"), time.perf_counter() - t))

    type(pipe).__call__ = timed
    study = build_study(dict(
        model="fullsize-qwen-image", name="Qwen-Image (full size, random weights)",
        prompts=str(prompts), seeds=[0], steps=args.steps, height=args.size, width=args.size,
        guidance=4.0, metrics=["ssim", "psnr"], criterion_metric="psnr",
        criterion_mean=_threshold(args.criterion_mean), criterion_worst=_threshold(args.criterion_worst),
        strategy=args.strategy, max_trials=args.max_trials,
        compile=args.mode == "compiled",
        settings=[dict(name=f"{size}px", height=size, width=size) for size in args.settings or ()]))
    loaded = wrap_pipeline(pipe, study.model, work, "random-seed-0", device, torch.bfloat16)
    start = time.perf_counter()
    session = open_session(study, str(device), cache_root=work / "cache", loaded=loaded,
                           warn=lambda m: print(m, file=sys.stderr))
    synchronize(device)
    phases["baseline_and_floor"] = time.perf_counter() - start
    baseline_generation = dict(generation)
    baseline_calls = len(calls)
    evaluations: list[dict] = []
    start = time.perf_counter()
    outcome = run_study(session, work / "report", study.strategy)
    synchronize(device)
    phases["search"] = time.perf_counter() - start
    start = time.perf_counter()
    write_report(session, outcome, work / "report")
    phases["report"] = time.perf_counter() - start
    wall = time.perf_counter() - wall
    after_baseline = phases["search"] + phases["report"]
    search_generation = generation["seconds"] - baseline_generation["seconds"]
    for r in outcome.records:
        evaluations.append(dict(config=None if r.config is None else list(r.config), label=r.label,
                                status=r.status, images=len(r.per_prompt),
                                seconds_per_image=r.seconds_per_image,
                                peak_memory_bytes=r.peak_memory_bytes, mode=r.execution_mode,
                                psnr_mean=r.mean.get("psnr")))
    bf16 = outcome.ledger.reference.seconds_per_image
    fp8_all = next((r.seconds_per_image for r in outcome.records if r.config == ()), None)
    result = dict(
        command=" ".join(["python", "benchmarks/bench_fullsize_run.py", *(argv or sys.argv[1:])]),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", torch=torch.__version__, python=platform.python_version(),
        mode=args.mode, cap_gb=args.cap_gb, residency=session.engine.residency, size=args.size,
        steps=args.steps, images_per_configuration=args.prompts, parameters=params,
        phases_s={k: round(v, 2) for k, v in phases.items()}, wall_s=round(wall, 2),
        generation_s=round(generation["seconds"], 2), images_generated=generation["images"],
        non_generation_share=round(1 - generation["seconds"] / wall, 4),
        baseline_phase_images=baseline_generation["images"],
        baseline_phase_generation_s=round(baseline_generation["seconds"], 2),
        search_phase_images=generation["images"] - baseline_generation["images"],
        generation_share_after_baseline=round(search_generation / after_baseline, 4) if after_baseline else None,
        answer=None if outcome.recommended is None else list(outcome.recommended.config),
        floor={"mean": session.floor.mean, "worst": session.floor.worst,
               "identical_variants": list(getattr(session.floor, "identical", ()))},
        criterion=session.criterion.describe(), code=args.code or "checkout", label=args.label,
        layerscan_package=str(Path(sys.modules["layerscan"].__file__).parent),
        peak_memory_bytes=int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
        bf16_seconds_per_image=bf16, fp8_all_seconds_per_image=fp8_all,
        fp8_all_speedup=(bf16 / fp8_all) if bf16 and fp8_all else None,
        new_evaluations=outcome.new_evaluations,
        # Before the report drew only on evaluated outputs, it generated what a stopped one lacked.
        report_generated_images=getattr(outcome.ledger, "report_generations", 0),
        timing=timing_since(started) if timing_since else None,
        stop_reason=outcome.stop_reason, evaluations=evaluations,
        settings=args.settings,
        # Every image's seconds by size and phase (the first of each shape and configuration
        # includes compilation), for per-setting costs of a matrix.
        image_calls=[dict(height=h, seconds=round(t, 3), phase="baseline" if i < baseline_calls else "after")
                     for i, (h, t) in enumerate(calls)])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "evaluations"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
