"""Render bench_gpu.py's JSON files as the markdown of benchmarks/RESULTS.md's GPU section.

The Amdahl ceiling of a configuration is the BF16 step with each quantized layer's BF16 GEMM
time replaced by its measured FP8 GEMM time (same card, same shapes): the speed-up FP8 could
give if activation quantization and everything else cost nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_gpu import FAMILY_OF_SHAPE, SIX_FAMILIES_KEEP


def ceiling(gemm: dict, layers: int, bf16_step: float, kept: list[str] | None) -> float:
    saved = 0.0
    for name, shape in gemm["shapes"].items():
        if FAMILY_OF_SHAPE[name] not in (kept or []):
            saved += layers * shape["count"] * (shape["bf16_s"] - shape["fp8_gemm_s"])
    return bf16_step / (bf16_step - saved)


def gemm_share(gemm: dict, layers: int, bf16_step: float) -> float:
    total = sum(layers * s["count"] * s["bf16_s"] for s in gemm["shapes"].values())
    return total / bf16_step


def render(files: list[Path]) -> str:
    r: dict = {}
    for f in files:
        data = json.loads(f.read_text())
        # The step's model (60 blocks) describes the tables; the reload file brings its own size.
        r.update({k: v for k, v in data.items() if k != "env" and not (k == "model" and k in r)})
        env = data["env"]
    gemm, layers = r["gemm"], r["model"]["layers"]
    out = [f"Measured {env['date']} on {env['device']}, torch {env['torch']} (CUDA {env['cuda']}); "
           f"Qwen-Image transformer at full size ({r['model']['params'] / 1e9:.2f} B parameters, "
           f"{layers} blocks, random weights), 1024x1024 = 4096 image + 128 text tokens, batch 1.", ""]
    out += ["### GEMMs at the DiT's shapes", "",
            f"Ceilings on this card (8192³): BF16 {gemm['ceiling_bf16_tflops']:.0f} TFLOP/s, "
            f"FP8 {gemm['ceiling_fp8_tflops']:.0f} TFLOP/s.", "",
            "| GEMM (M×K×N) | per block | BF16 µs | FP8 GEMM µs | FP8 + fused quant µs | FP8 + unfused quant µs | BF16 TFLOP/s | FP8 TFLOP/s | fused quant bit-identical |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, s in gemm["shapes"].items():
        out.append(f"| {name} ({s['m']}×{s['k']}×{s['n']}) | {s['count']} | {s['bf16_s'] * 1e6:.1f} | "
                   f"{s['fp8_gemm_s'] * 1e6:.1f} | {s['fp8_fused_quant_s'] * 1e6:.1f} | "
                   f"{s['fp8_unfused_quant_s'] * 1e6:.1f} | {s['bf16_tflops']:.0f} | "
                   f"{s['fp8_tflops']:.0f} | {s.get('fused_quant_matches_reference', '—')} |")
    out += ["", "### One DiT step", ""]
    for mode in ("eager", "compiled"):
        if mode not in r:
            continue
        bf16 = r[mode]["bf16"]["step_s"]
        out += [f"**{mode}** (quantized layers' BF16 GEMMs are "
                f"{100 * gemm_share(gemm, layers, bf16):.0f} % of the BF16 step):", "",
                "| configuration | step ms | speed-up vs BF16 | Amdahl ceiling | share of ceiling | first call s |",
                "|---|---|---|---|---|---|"]
        for label, kept in SIX_FAMILIES_KEEP.items():
            step = r[mode][label]["step_s"]
            speedup = bf16 / step
            ceil = 1.0 if kept is None else ceiling(gemm, layers, bf16, kept)
            out.append(f"| {label} | {step * 1e3:.1f} | {speedup:.3f}x | {ceil:.3f}x | "
                       f"{100 * speedup / ceil:.0f} % | {r[mode][label]['first_call_s']:.1f} |")
        out.append("")
    if "kernels_fp8_step" in r:
        out += ["Top device time in one eager FP8-all step (profiler; the FP8 GEMM is cuBLASLt's "
                "`nvjet_sm90_qqtst…` e4m3 kernel, the quantization Triton's "
                "`kernel`/`triton_red_fused…`):", "", "| op / kernel | ms |", "|---|---|"]
        out += [f"| `{name[:90]}` | {ms:.1f} |" for name, ms in r["kernels_fp8_step"][:10]]
        out.append("")
    if "memory" in r:
        out += ["### Weight memory per configuration (requantize residency)", "",
                "| configuration | analytic bytes | tensors held | torch.cuda.memory_allocated | analytic / allocated |",
                "|---|---|---|---|---|"]
        for label, m in r["memory"]["configs"].items():
            alloc = m["cuda_allocated"]
            out.append(f"| {label} | {m['analytic']:,} | {m['tensors_held']:,} | "
                       f"{alloc:,} | {m['analytic'] / alloc:.4f} |")
        out += ["", "Switching in place (seconds):", "", "| switch | s |", "|---|---|"]
        out += [f"| {k} | {v:.4f} |" for k, v in r["memory"]["switch_s"].items()]
        out.append("")
    if "reload" in r:
        rl = r["reload"]
        out += ["### Switching vs reloading", "",
                f"Transformer with {rl['layers']} blocks ({rl['bytes_on_disk'] / 1e9:.2f} GB of "
                f"safetensors): save {rl['save_s']:.1f} s, reload to the GPU {rl['reload_s']:.2f} s "
                f"(files still in the page cache: a lower bound), switch BF16 → FP8 keep img_mlp "
                f"in place {rl['switch_s'] * 1e3:.2f} ms: **{rl['ratio']:.0f}x** faster.", ""]
    if "overhead" in r:
        o = r["overhead"]
        out += ["### Orchestrator overhead per image", "",
                f"SSIM+PSNR on a {o['image_side']}² image {o['score_ssim_psnr_s']:.3f} s, trial "
                f"record {o['record_s'] * 1e3:.2f} ms, against {o['transformer_calls_per_image']} "
                f"BF16 DiT steps ({o['generation_s']:.1f} s, VAE and text encoder not counted): "
                f"**{100 * o['overhead_share']:.1f} %** of generation.", ""]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args()
    print(render(args.files))


if __name__ == "__main__":
    main()
