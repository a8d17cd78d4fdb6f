"""GPU benchmarks of layerscan's FP8 path on the full-size Qwen-Image transformer.

Runs in few device calls and writes one JSON file of raw numbers (``--out``; an existing file is
updated: parts not run keep their old numbers, while ``env`` describes only the latest call).
``render_gpu.py`` renders the tables of benchmarks/RESULTS.md from the files kept in
benchmarks/results/, each table from the file it names.  Parts (``--parts``, comma-separated):

  gemm      FP8 vs BF16 GEMM throughput at the DiT's shapes, and the card's ceilings
  step      one DiT step at 1024x1024 (4096 image + 128 text tokens), eager: BF16, FP8 on the six
            families, FP8 with img_mlp kept; Amdahl ceiling from the measured GEMM share;
            profiler kernel names of the FP8 step
  compiled  the same three steps with the repeated blocks compiled (torch.compile)
  memory    analytic vs torch.cuda.memory_allocated per configuration (requantize residency),
            and the time to switch configuration in place
  reload    reloading the transformer from disk (save_pretrained/from_pretrained) vs switching
  overhead  per-trial bookkeeping (scoring, record, switch) as a share of generation time

``--layers`` scales the number of blocks (60 is Qwen-Image); ``--smoke`` runs everything tiny on
CPU to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from layerscan.engine import Fp8Engine
from layerscan.fp8 import (
    FP8_DTYPE, fp8_linear, quantize_activation, quantize_input, quantize_per_tensor,
)
from layerscan.layers import LayerIndex, profile_for
from layerscan.pipeline import LoadedPipeline
from layerscan.session import compile_transformer

from gpu_layout import SIX_FAMILIES_KEEP  # benchmarks/, the script's own directory


def timer(fn, device: torch.device, warmup: int = 3, iters: int = 10) -> float:
    """Median seconds of ``fn()``; CUDA events on the GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemm_shapes(hidden: int, tokens_img: int, tokens_txt: int) -> dict[str, tuple[int, int, int, int]]:
    """name -> (M, K, N, count per block) of the six families' GEMMs, as diffusers runs them."""
    return {
        "to_q/k/v (img)": (tokens_img, hidden, hidden, 3),
        "to_out (img)": (tokens_img, hidden, hidden, 1),
        "img_mlp up": (tokens_img, hidden, 4 * hidden, 1),
        "img_mlp down": (tokens_img, 4 * hidden, hidden, 1),
        "add_q/k/v (txt)": (tokens_txt, hidden, hidden, 3),
        "to_add_out (txt)": (tokens_txt, hidden, hidden, 1),
        "txt_mlp up": (tokens_txt, hidden, 4 * hidden, 1),
        "txt_mlp down": (tokens_txt, 4 * hidden, hidden, 1),
    }


def bench_gemm(args, device) -> dict:
    dtype = torch.bfloat16
    out = {"shapes": {}}
    n = 256 if args.smoke else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    flops = 2 * n ** 3
    out["ceiling_bf16_tflops"] = flops / timer(lambda: a @ b, device) / 1e12
    a8, b8 = a.to(FP8_DTYPE), b.to(FP8_DTYPE).t().contiguous().t()
    one = torch.ones((), device=device)
    out["ceiling_fp8_tflops"] = flops / timer(
        lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=dtype), device) / 1e12
    del a, b, a8, b8
    for name, (m, k, nn_, count) in gemm_shapes(args.hidden, args.tokens_img, args.tokens_txt).items():
        x = torch.randn(m, k, device=device, dtype=dtype)
        w = torch.randn(nn_, k, device=device, dtype=dtype) * 0.02
        wq, ws = quantize_per_tensor(w)
        xq, xs = quantize_activation(x, "token")
        fq, fs = quantize_input(x, "token")  # the fused kernel on CUDA
        matches = bool(torch.equal(fq.view(torch.uint8), xq.view(torch.uint8)) and torch.equal(fs, xs))
        wsc = ws.reshape(1, 1).expand(1, nn_).contiguous()
        t_bf16 = timer(lambda: F.linear(x, w), device)
        t_gemm = timer(lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=wsc,
                                                out_dtype=dtype), device)
        t_full = timer(lambda: fp8_linear(x, wq, ws, None), device)  # fused quant + GEMM
        # The same with quantization as separate PyTorch ops: what a naive path pays.
        t_naive = timer(lambda: fp8_linear(x, wq, ws, None,
                                           quantized_input=quantize_activation(x, "token")), device)
        f = 2 * m * k * nn_
        out["shapes"][name] = dict(m=m, k=k, n=nn_, count=count, bf16_s=t_bf16, fp8_gemm_s=t_gemm,
                                   fp8_fused_quant_s=t_full, fp8_unfused_quant_s=t_naive,
                                   bf16_tflops=f / t_bf16 / 1e12, fp8_tflops=f / t_gemm / 1e12,
                                   fused_quant_matches_reference=matches)
    return out


def build_transformer(args, device):
    from diffusers import QwenImageTransformer2DModel

    config = dict(num_layers=args.layers)
    if args.smoke:
        config.update(num_attention_heads=2, attention_head_dim=32, joint_attention_dim=64,
                      axes_dims_rope=(8, 12, 12))
    with torch.device("meta"):
        model = QwenImageTransformer2DModel(**config)
    model = model.to_empty(device=device).to(torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=gen)
            elif "norm" in name and "weight" in name:
                p.fill_(1.0)
            else:
                p.zero_()
    # Non-persistent buffers (rotary frequencies) were left uninitialised by to_empty.
    fresh = type(model.pos_embed)(theta=10000, axes_dim=list(model.config.axes_dims_rope),
                                  scale_rope=True)
    model.pos_embed = fresh.to(device)
    model.eval().requires_grad_(False)
    profile = profile_for(model)
    loaded = LoadedPipeline(SimpleNamespace(transformer=model), "qwen-image-random", Path("."), "",
                            torch.device(device), torch.bfloat16, profile,
                            LayerIndex.discover(model, profile))
    return model, loaded


def step_inputs(model, args, device):
    side = int(args.tokens_img ** 0.5)
    return dict(
        hidden_states=torch.randn(1, args.tokens_img, model.config.in_channels, device=device,
                                  dtype=torch.bfloat16),
        encoder_hidden_states=torch.randn(1, args.tokens_txt, model.config.joint_attention_dim,
                                          device=device, dtype=torch.bfloat16),
        encoder_hidden_states_mask=torch.ones(1, args.tokens_txt, device=device, dtype=torch.long),
        timestep=torch.tensor([0.5], device=device, dtype=torch.bfloat16),
        img_shapes=[(1, side, side)],
        return_dict=False,
    )


def bench_steps(args, device, model, engine, compiled: bool) -> dict:
    inputs = step_inputs(model, args, device)
    results = {}
    if compiled:
        compile_transformer(model)  # the same call `layerscan run --compile` makes
    for label, config in SIX_FAMILIES_KEEP.items():
        engine.apply(config)
        with torch.inference_mode():
            t0 = time.perf_counter()
            model(**inputs)  # first call: compilation when compiled
            if device.type == "cuda":
                torch.cuda.synchronize()
            first = time.perf_counter() - t0
            step = timer(lambda: model(**inputs), device, warmup=2, iters=args.iters)
        results[label] = dict(step_s=step, first_call_s=first)
    return results


def profile_kernels(model, engine, args, device) -> list[tuple[str, float]]:
    engine.apply([])
    inputs = step_inputs(model, args, device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.inference_mode(), torch.profiler.profile(activities=activities) as prof:
        model(**inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    attr = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    rows = sorted(((e.key, getattr(e, attr, 0) / 1e3) for e in events), key=lambda r: -r[1])
    return rows[:15]


def bench_memory_and_switch(args, device, model, engine) -> dict:
    out = {"configs": {}, "switch_s": {}}
    engine.apply(None)
    if device.type == "cuda":
        torch.cuda.synchronize()
    switches = {}
    for label, config in SIX_FAMILIES_KEEP.items():
        t0 = time.perf_counter()
        engine.apply(config)
        if device.type == "cuda":
            torch.cuda.synchronize()
        switches[f"both -> {label}"] = time.perf_counter() - t0
    engine.residency = "requantize"
    for label, config in SIX_FAMILIES_KEEP.items():
        t0 = time.perf_counter()
        engine.apply(config)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        switches[f"requantize -> {label}"] = time.perf_counter() - t0
        held = sum(t.numel() * t.element_size() for t in model.parameters()) + sum(
            b.numel() * b.element_size() for n, b in model.named_buffers() if "weight_" in n)
        measured = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        out["configs"][label] = dict(analytic=engine.weight_bytes(config)["transformer"],
                                     tensors_held=held, cuda_allocated=measured)
    engine.residency = "both"
    engine.apply(None)
    out["switch_s"] = switches
    return out


def bench_reload(args, device, model, engine) -> dict:
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        engine.apply(None)
        t0 = time.perf_counter()
        model.save_pretrained(tmp)
        saved = time.perf_counter() - t0
        from diffusers import QwenImageTransformer2DModel

        t0 = time.perf_counter()
        again = QwenImageTransformer2DModel.from_pretrained(tmp, dtype=torch.bfloat16).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        reload = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in Path(tmp).rglob("*.safetensors"))
        del again
    engine.apply([])  # FP8 copies exist from here on, as after a search's first trial
    engine.apply(None)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine.apply(["img_mlp"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    switch = time.perf_counter() - t0
    engine.apply(None)
    return dict(layers=args.layers, bytes_on_disk=size, save_s=saved, reload_s=reload,
                switch_s=switch, ratio=reload / switch)


def bench_overhead(args, device, step_s: float | None) -> dict:
    """Bookkeeping per image at 1024x1024 vs the generation it accompanies."""
    import numpy as np

    from layerscan.evaluate import TrialRecord
    from layerscan.metrics import Scorer
    from layerscan.search.store import TrialStore

    rng = np.random.default_rng(0)
    side = 64 if args.smoke else 1024
    ref = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    img = np.clip(ref.astype(int) + rng.integers(-8, 9, ref.shape), 0, 255).astype(np.uint8)
    scorer = Scorer(("ssim", "psnr"), device=str(device))
    score_s = timer(lambda: scorer.score_pair(img, ref), torch.device("cpu"), warmup=1, iters=5)
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        store = TrialStore(Path(tmp) / "t.jsonl", "k")
        record = TrialRecord(("img_mlp",), "complete", mean={"psnr": 30.0}, worst={"psnr": 29.0})
        store_s = timer(lambda: store.add(record), torch.device("cpu"), warmup=1, iters=5)
    steps = 100  # Qwen-Image: 50 steps with true CFG = 100 transformer calls per image
    generation_s = step_s * steps if step_s else None
    per_image = score_s + store_s / 4  # a record per trial of (here) 4 prompts
    return dict(score_ssim_psnr_s=score_s, record_s=store_s, image_side=side,
                transformer_calls_per_image=steps, generation_s=generation_s,
                overhead_share=per_image / generation_s if generation_s else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="gemm,step,memory,reload,overhead")
    parser.add_argument("--layers", type=int, default=60)
    parser.add_argument("--reload-layers", type=int, default=60)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--scratch", default=None, help="directory for the reload test's files")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    args.hidden, args.tokens_img, args.tokens_txt = (64, 64, 16) if args.smoke else (3072, 4096, 128)
    parts = set(args.parts.split(","))
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results["env"] = dict(date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
                          device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                          cuda=torch.version.cuda, command=" ".join(sys.argv))

    def save():
        args.out.write_text(json.dumps(results, indent=1))

    if "gemm" in parts:
        results["gemm"] = bench_gemm(args, device)
        save()
    if parts & {"step", "compiled", "memory", "reload"}:
        model, loaded = build_transformer(args, device)
        engine = Fp8Engine(loaded, residency="both")
        results["model"] = dict(layers=args.layers, params=loaded.index.total_params,
                                quantizable_params=loaded.index.quantizable_params,
                                residency=engine.residency)
        if "step" in parts:
            results["eager"] = bench_steps(args, device, model, engine, compiled=False)
            results["kernels_fp8_step"] = profile_kernels(model, engine, args, device)
            save()
        if "memory" in parts:
            results["memory"] = bench_memory_and_switch(args, device, model, engine)
            save()
        if "reload" in parts:
            results["reload"] = bench_reload(args, device, model, engine)
            save()
        if "compiled" in parts:
            results["compiled"] = bench_steps(args, device, model, engine, compiled=True)
            save()
    if "overhead" in parts:
        step = results.get("eager", {}).get("bf16", {}).get("step_s")
        results["overhead"] = bench_overhead(args, device, step)
        save()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
