"""Greedy and auto with 1 and 2 CPU workers: wall time, evaluations per hour, the answer.

    python benchmarks/bench_batch_workers.py            # writes results/runs/batch_workers.json

Each run is ``layerscan run --strategy S [--workers 2]`` on the tiny Qwen-Image with img_mlp
planted (the answer is known), into a fresh output directory, with the BF16 baseline already
cached (a warm-up run builds it first).  Every worker runs torch on one thread
(``OMP_NUM_THREADS=1``) so the comparison is of workers, not of threads.  Wall time is the whole
command (model load, the search, the minimality proof, the report): the helper loads its own
copy of the pipeline while this process starts searching, and that start-up is counted.
The section "## Batch strategies on workers (CPU)" of benchmarks/RESULTS.md is rendered from
the JSON (that section only is replaced).
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
SECTION = "## Batch strategies on workers (CPU)"
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


def render(data: dict) -> str:
    rows = ["| strategy | workers | wall s | evaluations (by the helper) | evaluations / hour | "
            "speed-up | answer |", "|---|---|---|---|---|---|---|"]
    for strategy in data["strategies"]:
        runs = [r for r in data["runs"] if r["strategy"] == strategy]
        one = next(r for r in runs if r["workers"] == 1)
        for r in runs:
            rows.append(f"| {strategy} | {r['workers']} | {r['wall_s']:.1f} | {r['evaluations']} "
                        f"({r['by_helper']}) | {r['evaluations_per_hour']:.0f} | "
                        f"{one['wall_s'] / r['wall_s']:.2f}x | {', '.join(r['answer']) or 'none'} |")
    return "\n".join([
        SECTION, "",
        f"`{data['command']}` on {data['machine']} ({data['cores']} cores), {data['date']}: the tiny "
        f"Qwen-Image with img_mlp planted, {data['images']} images per evaluation at "
        f"{data['steps']} steps, the DiT's six families, baseline cached, one torch thread per "
        "worker. Speed-up is one worker's wall time over this run's (whole command).", "",
        *rows, "",
        "What parallelises is a batch: greedy's six groups alone (the helper took "
        f"{next((r['by_helper'] for r in data['runs'] if r['strategy'] == 'greedy' and r['workers'] == 2), 0)} "
        "of them here); "
        "FP8 everywhere before it, the add-then-minimise steps and the proof after it (answered "
        "from the ledger here) run one at a time, and the helper's start-up (loading the pipeline "
        "and the cached baseline) shares the two cores with the search. Auto finds the planted "
        "answer in two evaluations that depend on each other, so a second worker only costs its "
        "start-up. The 1.8x goal is not met on this workload: it would need batches that dominate "
        "the run (more groups, or longer evaluations than a start-up).", ""])


def write_section(text: str) -> None:
    path = ROOT / "benchmarks" / "RESULTS.md"
    doc = path.read_text()
    if SECTION in doc:
        start = doc.index(SECTION)
        end = doc.find("\n## ", start + len(SECTION))
        doc = doc[:start] + text + (doc[end + 1:] if end != -1 else "")
    else:
        doc = doc.rstrip("\n") + "\n\n" + text
    path.write_text(doc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--strategies", default="greedy,auto")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "runs" / "batch_workers.json")
    parser.add_argument("--render", action="store_true", help="only re-render RESULTS.md from --out")
    args = parser.parse_args()
    if args.render:
        write_section(render(json.loads(args.out.read_text())))
        return
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
    write_section(render(data))
    print(render(data))


if __name__ == "__main__":
    main()
