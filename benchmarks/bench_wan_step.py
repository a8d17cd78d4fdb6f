#!/usr/bin/env python3
"""One full-size Wan 2.2 A14B expert's DiT step on one GPU, BF16 and FP8, and what a layerscan run
of ``studies/wan2.2.toml`` would cost from it.

    python benchmarks/bench_wan_step.py --out results/wan_step.json     # H200: well under 3 minutes
    python benchmarks/bench_wan_step.py --smoke --out /tmp/wan_step.json  # tiny config on the CPU

A Wan 2.2 T2V A14B pipeline is two experts of one shape (``transformer``: high-noise steps,
``transformer_2``: low-noise steps) and each denoising step runs one of them, so one expert's
step is the unit of cost.  It is built from its config (``WanTransformer3DModel``: 40 blocks,
width 5120 = 40 heads x 128, FFN 13824, text width 4096, 16 latent channels in and out, patches
(1, 2, 2): diffusers' defaults, which are Wan2.2-T2V-A14B's ``transformer/config.json``) with
random BF16 weights directly in GPU memory (no download, no disk), and called eagerly on one
480x832, 81-frame clip: latents 16x21x60x104 (4x temporal, 8x spatial VAE compression), which the
(1, 2, 2) patches make 21x30x52 = 32,760 tokens, with 512 text tokens (the pipeline's
``max_sequence_length``).  Random weights are right for time and memory, never for quality.

Timed, median of ``--iters`` calls after one warm-up, CUDA events:

* the DiT step in BF16, in FP8 everywhere (attn1, attn2, ffn of every block W8A8 with per-token
  activation scales, through layerscan's own engine: the Linears it converts and the fused
  ``attn1.to_qkv`` it shares one input quantization for), and in FP8 on the FFN only (attention
  kept in BF16: the setting upstream's Wan 2.2 thread found stable on long videos);
* the Wan VAE (diffusers' default ``AutoencoderKLWan``, the one A14B ships) decoding the clip's
  latents to its 81 frames, in BF16 as layerscan loads pipelines (``--no-vae`` skips it).

The estimate multiplies: DiT calls per video (steps, twice under classic CFG), videos per
configuration (prompts x seeds of the study), the baseline's videos (BF16 plus the noise floor's
variants) and a number of FP8 configurations.  Not measured and left out: the UMT5 text encoder
(two 512-token calls per video, milliseconds), scoring (LPIPS per frame, milliseconds per frame on
the GPU), and the proxies (auto's: a few percent of one evaluation).  Memory for the whole
pipeline on one GPU is estimated from the measured expert: two experts in BF16 with their FP8
copies resident (layerscan's ``both`` residency), the UMT5-XXL encoder (5.7 B parameters,
assumed, not built) and the VAE, plus the measured activation peak of a step.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Wan2.2-T2V-A14B's expert (transformer/config.json); the smoke config keeps its layout, tiny.
A14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
            out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
SMOKE = dict(A14B, num_attention_heads=4, attention_head_dim=16, text_dim=32, ffn_dim=128, num_layers=2)
UMT5_XXL_ENCODER_PARAMS = 5.7e9  # assumed: the text encoder is not built here
VAE_TEMPORAL, VAE_SPATIAL = 4, 8  # Wan VAE compression
CONFIGURATIONS = {  # FP8 configurations evaluated in full, for the estimate
    "auto_one_group": 4,  # FP8 everywhere, each expert alone in FP8, the proxies' first choice
    "greedy": 12,  # the above, six groups alone in BF16 (three per expert), a few additions
    "exhaustive": 64,  # every subset of the six groups
}


def timer(fn, device: torch.device, iters: int) -> float:
    """Median seconds of ``fn()`` after one warm-up call; CUDA events on the GPU."""
    fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def build_expert(config: dict, device: torch.device):
    """One Wan expert with random BF16 weights, created on ``device`` directly (14 B parameters
    would not fit in float32 on the way)."""
    from diffusers import WanTransformer3DModel

    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = WanTransformer3DModel(**config)
    finally:
        torch.set_default_dtype(default_dtype)
    return model.eval().requires_grad_(False)


def engine_for(model, device: torch.device):
    """layerscan's FP8 engine on the expert alone, named and grouped as vLLM-Omni's Wan."""
    from layerscan.engine import Fp8Engine
    from layerscan.pipeline import wrap_pipeline

    loaded = wrap_pipeline(SimpleNamespace(transformer=model), "wan2.2-a14b-expert-random", Path("."),
                           "random-seed-0", device, torch.bfloat16)
    return Fp8Engine(loaded, "token")


def latent_shape(frames: int, height: int, width: int) -> tuple[int, int, int]:
    return (frames - 1) // VAE_TEMPORAL + 1, height // VAE_SPATIAL, width // VAE_SPATIAL


def step_inputs(config: dict, latent: tuple[int, int, int], text_tokens: int, device: torch.device) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(0)
    latents = torch.randn(1, config["in_channels"], *latent, generator=gen)
    text = torch.randn(1, text_tokens, config["text_dim"], generator=gen)
    return dict(hidden_states=latents.to(device, torch.bfloat16), timestep=torch.tensor([900.0], device=device),
                encoder_hidden_states=text.to(device, torch.bfloat16), return_dict=False)


def time_vae(latent: tuple[int, int, int], device: torch.device, iters: int, smoke: bool) -> dict:
    """Decode one clip's latents with the default (A14B) Wan VAE in BF16."""
    from diffusers import AutoencoderKLWan

    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            vae = AutoencoderKLWan(base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1) if smoke \
                else AutoencoderKLWan()
    finally:
        torch.set_default_dtype(default_dtype)
    vae.eval().requires_grad_(False)
    z = torch.randn(1, vae.config.z_dim, *latent, device=device, dtype=torch.bfloat16)
    with torch.inference_mode():
        seconds = timer(lambda: vae.decode(z, return_dict=False), device, iters)
    params = sum(p.numel() for p in vae.parameters())
    del vae
    return dict(seconds=seconds, parameters=params)


def estimate(step_s: dict[str, float], vae_s: float, study, prompts: int) -> dict:
    """A layerscan run's device time from the measured pieces (hours)."""
    from layerscan.generate import FLOOR_VARIANTS

    cfg = 2 if study.guidance > 1 else 1  # the conditional and the unconditional call per step
    calls = study.steps * cfg
    videos = prompts * len(study.seeds)
    per_video = {name: calls * s + vae_s for name, s in step_s.items()}
    baseline_videos = videos * (1 + len(FLOOR_VARIANTS))
    baseline_h = baseline_videos * per_video["bf16"] / 3600
    # A configuration keeping more in BF16 runs between FP8 everywhere and BF16.
    low = videos * min(per_video["fp8_all"], per_video["bf16"]) / 3600
    high = videos * max(per_video["fp8_all"], per_video["bf16"]) / 3600
    return dict(
        dit_calls_per_video=calls, videos_per_configuration=videos,
        seconds_per_video={k: round(v, 1) for k, v in per_video.items()},
        baseline_videos=baseline_videos, baseline_hours=round(baseline_h, 2),
        hours_per_configuration=[round(low, 2), round(high, 2)],
        runs={name: dict(configurations=n, hours=[round(baseline_h + n * low, 1), round(baseline_h + n * high, 1)])
              for name, n in CONFIGURATIONS.items()},
        note="hours are device time on this GPU, one worker, eager; a failing configuration stopped "
             "early (auto, attribution) costs less than a full one, so these are upper ends; "
             "text encoder, scoring and proxies left out (small next to the DiT)",
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--smoke", action="store_true", help="tiny config on the CPU: checks the script")
    p.add_argument("--study", default="wan2.2", help="the study whose run is estimated")
    p.add_argument("--frames", type=int, help="default: the study's num_frames")
    p.add_argument("--height", type=int, help="default: the study's")
    p.add_argument("--width", type=int, help="default: the study's")
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--iters", type=int, default=2, help="timed calls per measurement, after one warm-up")
    p.add_argument("--no-vae", action="store_true", help="skip the VAE decode")
    args = p.parse_args(argv)

    from layerscan.generate import read_prompts
    from layerscan.study import build_study, load_study

    study = build_study(load_study(args.study))
    # The study's longest clip (a settings matrix lists several; each is estimated alike).
    frames = args.frames or max(int(s["pipeline_kwargs"].get("num_frames", 81))
                                for s in study.generation_settings())
    height, width = args.height or study.height, args.width or study.width
    config = A14B
    device = torch.device("cuda")
    if args.smoke:
        config, device = SMOKE, torch.device("cpu")
        frames, height, width, args.text_tokens = 5, 32, 32, 16
    latent = latent_shape(frames, height, width)
    tokens = latent[0] * (latent[1] // config["patch_size"][1]) * (latent[2] // config["patch_size"][2])
    wall = time.perf_counter()

    start = time.perf_counter()
    model = build_expert(config, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    build_s = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    bf16_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    engine = engine_for(model, device)
    inputs = step_inputs(config, latent, args.text_tokens, device)

    def step() -> None:
        with torch.inference_mode():
            model(**inputs)

    step_s, peaks = {}, {}
    # Upstream's settings: everything FP8; FFN only (attention kept: "stable on long videos").
    for name, ignored in (("bf16", None), ("fp8_all", []), ("fp8_ffn_only", ["attn1", "attn2"])):
        engine.apply(ignored)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step_s[name] = timer(step, device, args.iters)
        peaks[name] = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    engine.apply(None)
    # The FP8 copies resident beside the BF16 weights: one byte per quantized weight (the
    # difference below also takes off one 4-byte scale per layer: a few hundred bytes).
    fp8_copy_bytes = sum(engine.weight_bytes(None).values()) - sum(engine.weight_bytes([]).values())
    resident = int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else None
    activation_peak = max(p - resident for p in peaks.values()) if resident is not None else None
    del inputs, engine, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    vae = None if args.no_vae else time_vae(latent, device, 1, args.smoke)
    vae_s = vae["seconds"] if vae else 0.0
    prompts = len(read_prompts(study.prompts))

    te_bytes = int(2 * UMT5_XXL_ENCODER_PARAMS)
    pipeline_bytes = 2 * (bf16_bytes + fp8_copy_bytes) + te_bytes + (2 * vae["parameters"] if vae else 0)
    result = dict(
        command=" ".join(["python", "benchmarks/bench_wan_step.py", *(argv if argv is not None else sys.argv[1:])]),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__, python=platform.python_version(), smoke=args.smoke, mode="eager",
        expert_config={k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        expert_parameters=params, expert_bf16_bytes=bf16_bytes, expert_fp8_copy_bytes=fp8_copy_bytes,
        clip=dict(frames=frames, height=height, width=width, latent=list(latent), video_tokens=tokens,
                  text_tokens=args.text_tokens),
        build_s=round(build_s, 2),
        step_s={k: round(v, 4) for k, v in step_s.items()},
        fp8_speedup={k: round(step_s["bf16"] / v, 3) for k, v in step_s.items() if k != "bf16"},
        peak_memory_bytes=peaks, activation_peak_bytes=activation_peak,
        vae_decode=vae,
        pipeline_memory_estimate=dict(
            bytes=pipeline_bytes + (activation_peak or 0),
            parts="2 experts BF16 + their FP8 copies, UMT5-XXL encoder (assumed 5.7 B params) BF16, "
                  "VAE BF16, one step's activation peak",
            fits_on_this_gpu=(pipeline_bytes + (activation_peak or 0)
                              < torch.cuda.get_device_properties(device).total_memory)
            if device.type == "cuda" else None),
        study=dict(name=args.study, steps=study.steps, guidance=study.guidance, prompts=prompts,
                   seeds=list(study.seeds)),
        estimate=estimate(step_s, vae_s, study, prompts),
        wall_s=round(time.perf_counter() - wall, 1),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
