#!/usr/bin/env python3
"""Do CPU and GPU agree on what FP8 does to a model?

    python benchmarks/bench_devices.py --device cpu  --out results/devices_cpu
    python benchmarks/bench_devices.py --device cuda --compare results/devices_cpu --out results/devices_gpu

Runs the study's prompts and seeds (default: the demo's) on one device, eagerly, and scores
FP8 everywhere, each DiT family kept in BF16 and the text encoder kept whole against that
device's own BF16 baseline, next to the BF16 noise floor; the images go to ``--out`` as PNG.
Given ``--compare`` (another device's ``--out``), it also scores this device's images against
that device's: BF16 against BF16 says how far the two devices' BF16 already are apart, FP8
against FP8 whether FP8 moves them further.  With ``--gemm fp32`` the FP8 GEMMs run as FP32
arithmetic on the e4m3 values (the CPU's path) on any device, so a GPU run can tell whether its
FP8 GEMM computes what the CPU computes.  Writes ``devices.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def fp32_arithmetic(x, weight_fp8, weight_scale, bias, scheme="token", quantized_input=None):
    """layerscan.fp8.fp8_linear's CPU arithmetic, on whatever device the operands are."""
    from layerscan.fp8 import quantize_input, row_scale

    out_features = weight_fp8.shape[0]
    x_fp8, x_scale = quantized_input or quantize_input(x, scheme)
    w_scale = weight_scale if weight_scale.dim() == 2 else row_scale(weight_scale, out_features)
    out = (x_fp8.float() @ weight_fp8.float().t()) * x_scale * w_scale
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], out_features)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--study", default="demo")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--target", default="vllm-omni==0.30.0")
    p.add_argument("--gemm", choices=("native", "fp32"), default="native")
    p.add_argument("--compare", type=Path, help="another device's --out directory")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    import layerscan.fp8 as fp8
    from layerscan.evaluate import evaluate
    from layerscan.generate import load_png, save_png
    from layerscan.layers import qualify
    from layerscan.metrics import Scorer
    from layerscan.session import open_session
    from layerscan.study import build_study, load_study

    if args.gemm == "fp32":
        fp8.fp8_linear = fp32_arithmetic  # Fp8Linear.forward looks it up at call time
    values = load_study(args.study)
    values.update(model=args.model, target=args.target, compile=False)
    study = build_study(values)
    session = open_session(study, args.device, cache_root=args.out / "cache")
    index = session.loaded.index
    configs: dict[str, tuple[str, ...] | None] = {"BF16": None, "FP8 all": ()}
    configs.update({f"keep {g.pattern}": (g.pattern,) for g in index.groups("family")
                    if g.component == "transformer"})
    for component in index.components[1:]:
        configs[f"keep {component} whole"] = (qualify(component, ""),)
    spec = session.spec
    names = [spec.image_name(i) for i in range(len(spec.items()))]
    results: dict = {"device": str(session.loaded.device), "gemm": args.gemm, "target": args.target,
                     "torch": torch.__version__, "floor": session.floor.as_dict(), "configs": {}}
    if session.loaded.device.type == "cuda":
        results["device"] += f" ({torch.cuda.get_device_name(session.loaded.device)})"
    for label, config in configs.items():
        start = time.perf_counter()
        directory = args.out / "images" / label.replace(" ", "_").replace(":", "")
        record = evaluate(session.engine, config, spec, session.baseline, session.scorer,
                          session.criterion, image_dir=directory)
        results["configs"][label] = dict(config=config, status=record.status, mean=record.mean,
                                         worst=record.worst, ci=record.ci, passes=record.passes,
                                         seconds_per_image=record.seconds_per_image,
                                         seconds=round(time.perf_counter() - start, 2))
        print(label, {m: round(v, 3) for m, v in record.mean.items()}, flush=True)
    session.engine.apply(None)
    if args.compare:
        scorer = Scorer(("ssim", "psnr"), device="cpu")
        across = {}
        for label in ("BF16", "FP8 all"):
            key = label.replace(" ", "_")
            mine = [load_png(args.out / "images" / key / n) for n in names]
            theirs = [load_png(args.compare / "images" / key / n) for n in names]
            summary = scorer.score(mine, theirs)
            across[label] = {"mean": summary.mean, "worst": summary.worst}
        results["across_devices"] = across
        print("across devices", json.dumps(across), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "devices.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
