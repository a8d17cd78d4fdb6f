#!/usr/bin/env python3
"""`--prefer speed` and `--prefer memory` on one planted model, on a GPU, as served (compiled).

    python benchmarks/bench_prefer.py --out benchmarks/results/runs/prefer_gpu.json

The model is the tiny Qwen-Image with a massive activation planted in block 1's ``img_mlp``
input only (``layerscan.tiny.save_planted``), searched at ``block`` granularity: every
configuration that keeps ``transformer_blocks.1.`` in BF16 passes with about the same quality,
and the four blocks weigh the same.  ``exhaustive`` evaluates all 16 configurations once, with
``--prefer speed``; the same command with ``--prefer memory`` then answers from the same records
(nothing is evaluated again).  Memory keeps the fewest bytes: block 1 alone.  Speed keeps what
the measured seconds per image say is fastest, whatever that is on this card: at these sizes the
FP8 activation quantization costs more than the matrix products it speeds up, so keeping more
blocks in BF16 may be faster (as AMD measured FP8 slower than BF16 on Wan 2.2).

Recorded: each configuration's verdict, median seconds per image (compiled, the images that
compiled nothing), BF16-kept bytes, and each preference's answer with its reason.  The two
reports are written next to the JSON (``prefer_gpu_speed.md``, ``prefer_gpu_memory.md``).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PLANTED_BLOCK = 1
CRITERION = ["--criterion-metric", "psnr", "--criterion-mean", "floor - 5", "--criterion-worst", "floor - 8"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="the JSON to write")
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)

    import pandas as pd
    import torch

    from layerscan.cli import main as layerscan
    from layerscan.tiny import save_planted

    work = Path(tempfile.mkdtemp(prefix="layerscan-prefer-"))
    model = save_planted("tiny-qwen-image", "img_mlp", [PLANTED_BLOCK], work / "model")
    run_dir = work / "run"
    answers = {}
    for prefer in ("speed", "memory"):  # speed first: it evaluates, memory reads the same records
        run_argv = ["run", "--model", str(model), "--study", "tiny-qwen-image-outlier", "--granularity",
                "block", "--strategy", "exhaustive", "--prefer", prefer, "--device", args.device,
                "--cache-dir", str(work / "cache"), "--out", str(run_dir), *CRITERION]
        code = layerscan(run_argv)
        if code != 0:
            raise SystemExit(f"layerscan run --prefer {prefer} exited {code}")
        rec = json.loads((run_dir / "recommendation.json").read_text())
        answers[prefer] = dict(answer=rec["ignored_layers_patterns"], final=rec["final"],
                               prefer=rec["prefer"], preference_note=rec["preference_note"],
                               minimality=rec["minimality"], speedup_vs_bf16=rec["speedup_vs_bf16"],
                               evaluated_configurations=rec["evaluated_configurations"])
        shutil.copy(run_dir / "report.md", args.out.with_name(f"{args.out.stem}_{prefer}.md"))
    trials = pd.read_csv(run_dir / "trials.csv")
    configurations = [dict(configuration=row.configuration, status=row.status, passes=bool(row.passes),
                           psnr_mean=row.psnr_mean, seconds_per_image=row.seconds_per_image,
                           bf16_kept_bytes=int(row.bf16_kept_bytes))
                      for row in trials.itertuples()]
    device = torch.device(args.device)
    result = dict(
        command="python benchmarks/bench_prefer.py " + " ".join(argv or sys.argv[1:]),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__, planted=f"img_mlp input of transformer_blocks.{PLANTED_BLOCK} only",
        criterion=CRITERION, answers=answers, configurations=configurations)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(answers, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
