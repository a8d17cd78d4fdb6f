"""Greedy and auto with 1 and 2 CPU workers: wall time, evaluations per hour, the answer.

    python benchmarks/bench_batch_workers.py            # writes results/runs/batch_workers.json

Each run is ``layerscan run --strategy S [--workers 2]`` on the tiny Qwen-Image with img_mlp
planted (the answer is known), into a fresh output directory, with the BF16 baseline already
cached (a warm-up run builds it first).  Every worker runs torch on one thread
(``OMP_NUM_THREADS=1``) so the comparison is of workers, not of threads.  Wall time is the whole
command (model load, the search, the minimality proof, the report): the helper loads its own
copy of the pipeline while this process starts searching, and that start-up is counted.
benchmarks/render_runs.py renders the JSON into RESULTS.md (block ``batch_workers``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle on a white background", "a blue square in the top left corner",
           "a green triangle in the middle", "two yellow stars on a black sky"]
CRITERION = ["--criterion-metric", "psnr", "--criterion-mean", "37", "--criterion-worst", "35"]


def run_once(strategy: str, workers: int, args, model: Path, prompts: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "layerscan.cli", "run", "--model", str(model), "--study",
           "tiny-qwen-image", "--prompts", str(prompts), "--steps", str(args.steps),
           "--seeds", "0,1", "--components", "transformer", "--out", str(out),
           "--strategy", strategy, *CRITERION]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LAYERSCAN_CACHE": str(args.cache)}
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.monotonic() - start
    if done.returncode != 0:
        raise SystemExit(f"{strategy} on {workers} worker(s) failed:\n{done.stderr[-3000:]}")
    rec = json.loads((out / "recommendation.json").read_text())
    lines = (out / "trials.jsonl").read_text().splitlines()
    helper_log = out / "workers" / "w1.log"
    by_helper = helper_log.read_text().count("evaluated [") if helper_log.exists() else 0
    return {"strategy": strategy, "workers": workers, "wall_s": round(wall, 2),
            "evaluations": len(lines), "by_helper": by_helper,
            "evaluations_per_hour": round(3600 * len(lines) / wall, 1),
            "answer": rec["ignored_layers_patterns"], "final": rec["final"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--strategies", default="greedy,auto")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "runs" / "batch_workers.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="layerscan-bench-batch-"))
    args.cache = work / "cache"
    model = Path(subprocess.run([sys.executable, "-m", "layerscan.cli", "tiny", "tiny-qwen-image-outlier",
                                 "--out", str(work / "model")], capture_output=True, text=True,
                                check=True).stdout.strip())
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    strategies = args.strategies.split(",")
    run_once("greedy", 1, args, model, prompts, work / "warm-up")  # builds the baseline
    runs = []
    for strategy in strategies:
        for workers in (1, 2):
            runs.append(run_once(strategy, workers, args, model, prompts, work / f"{strategy}-{workers}"))
            print(runs[-1], flush=True)
    data = {"command": "python benchmarks/bench_batch_workers.py", "date": dt.date.today().isoformat(),
            "machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "steps": args.steps, "images": len(PROMPTS) * 2, "strategies": strategies, "runs": runs}
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {args.out}; render it into RESULTS.md with: python benchmarks/render_runs.py --write")


if __name__ == "__main__":
    main()
