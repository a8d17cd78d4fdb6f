"""Render RESULTS.md's tables of whole runs from their raw JSON in benchmarks/results/runs/.

Same contract as render_gpu.py (whose marker handling this reuses), for the files that
bench_fullsize_run.py, bench_wan_step.py, bench_devices.py, bench_batch_workers.py and bench_prefer.py write: RESULTS.md holds the
rendered text between ``<!-- render_runs:NAME -->`` and ``<!-- /render_runs:NAME -->`` lines, the
prose around them is written by hand and must agree with them.

    python benchmarks/render_runs.py            # print every block
    python benchmarks/render_runs.py --write    # rewrite the blocks in RESULTS.md
    python benchmarks/render_runs.py --check    # exit 1 when RESULTS.md differs from the JSON
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from render_gpu import DOC, block_problems, blocks_in, body, replace_blocks

RUNS_DIR = Path(__file__).resolve().parent / "results" / "runs"
MARKER = re.compile(r"^<!-- (/?)render_runs:([A-Za-z0-9_]+) -->$", re.M)
FULLSIZE = {  # file -> label; the no-CFG pair ran with the pipeline's signature hidden (see prose)
    "fullsize_run_eager.json": "eager, true CFG",
    "fullsize_run_compiled.json": "compiled, true CFG",
    "fullsize_run_eager_nocfg.json": "eager, no CFG (superseded)",
    "fullsize_run_compiled_nocfg.json": "compiled, no CFG (superseded)",
}
DEVICES = {"devices_gpu_native.json": "H200, cuBLASLt FP8 GEMM",
           "devices_gpu_fp32.json": "H200, FP32 arithmetic on e4m3 values",
           "devices_cpu.json": "CPU (2 cores), FP32 arithmetic on e4m3 values",
           "devices_gpu_seed.json": "H200, seed scheme"}


def _gb(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e9:.1f}"


def _phases(p: dict, digits: int) -> str:
    """A run's phases as one cell: build / baseline+floor / search / report seconds."""
    return " / ".join(f"{p[k]:.{digits}f}" for k in ("build", "baseline_and_floor", "search", "report"))


def render_fullsize(runs: dict) -> list[str]:
    out = ["Source: " + ", ".join(f"`results/runs/{f}`" for f in FULLSIZE) + ".", "",
           "| run | BF16 s/img | FP8 all s/img | speed-up | peak GPU GB | residency | wall s | "
           "build / baseline+floor / search / report s | not generating |",
           "|---|---|---|---|---|---|---|---|---|"]
    for name, label in FULLSIZE.items():
        d = runs[name]
        p = d["phases_s"]
        out.append(f"| {label} | {d['bf16_seconds_per_image']:.2f} | {d['fp8_all_seconds_per_image']:.2f} | "
                   f"**{d['fp8_all_speedup']:.2f}x** | {_gb(d['peak_memory_bytes'])} | {d['residency']} | "
                   f"{d['wall_s']:.0f} | {_phases(p, 0)} | {100 * d['non_generation_share']:.0f} % |")
    out += ["", "Per configuration (true CFG runs):", "",
            "| run | configuration | s/img | peak GPU GB |", "|---|---|---|---|"]
    for name, label in list(FULLSIZE.items())[:2]:
        for e in runs[name]["evaluations"]:
            out.append(f"| {label} | {e['label']} | {e['seconds_per_image']:.2f} | {_gb(e['peak_memory_bytes'])} |")
    return out


def render_wan(runs: dict) -> list[str]:
    d = runs["wan_step.json"]
    clip, est = d["clip"], d["estimate"]
    out = ["Source: `results/runs/wan_step.json`.", "",
           f"One A14B expert ({d['expert_parameters'] / 1e9:.2f} B parameters), one eager DiT call on "
           f"{clip['frames']} frames at {clip['height']}x{clip['width']} ({clip['video_tokens']:,} video "
           f"+ {clip['text_tokens']} text tokens), {d['device']}:", "",
           "| precision | s per DiT call | speed-up | peak GPU GB |", "|---|---|---|---|"]
    for key, label in (("bf16", "BF16"), ("fp8_all", "FP8 everywhere"), ("fp8_ffn_only", "FP8 on ffn only")):
        speed = "1.00x" if key == "bf16" else f"{d['fp8_speedup'][key]:.2f}x"
        out.append(f"| {label} | {d['step_s'][key]:.2f} | {speed} | {_gb(d['peak_memory_bytes'][key])} |")
    out += ["", f"Estimate for `studies/wan2.2.toml` ({d['study']['steps']} steps, CFG: "
            f"{est['dit_calls_per_video']} DiT calls per video, {est['videos_per_configuration']} videos "
            f"per configuration): BF16 baseline and noise floor {est['baseline_videos']} videos, "
            f"{est['baseline_hours']} h; "
            f"{est['hours_per_configuration'][0]}-{est['hours_per_configuration'][1]} h per FP8 configuration; "
            + "; ".join(f"{k.replace('_', ' ')} ({v['configurations']} configurations) "
                        f"{v['hours'][0]}-{v['hours'][1]} h" for k, v in est["runs"].items())
            + f". Whole pipeline on one GPU (estimated): {_gb(d['pipeline_memory_estimate']['bytes'])} GB."]
    return out


def render_devices(runs: dict) -> list[str]:
    present = [f for f in DEVICES if f in runs]
    configs = list(dict.fromkeys(label for f in present for label in runs[f]["configs"]))
    out = ["Source: " + ", ".join(f"`results/runs/{f}`" for f in present) + ". PSNR in dB "
           "against each run's own BF16 baseline: mean [95 % CI] / worst image.", "",
           "| configuration | " + " | ".join(DEVICES[f] for f in present) + " |",
           "|---|" + "---|" * len(present)]
    out.append("| *noise floor* | " + " | ".join(
        f"{runs[f]['floor']['mean']['psnr']:.2f} / {runs[f]['floor']['worst']['psnr']:.2f}" for f in present) + " |")
    for label in configs:
        cells = []
        for f in present:
            c = runs[f]["configs"].get(label)
            if c is None:
                cells.append("—")
                continue
            lo, hi = c["ci"]["psnr"]
            cells.append(f"{c['mean']['psnr']:.2f} [{lo:.2f}, {hi:.2f}] / {c['worst']['psnr']:.2f}")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out += ["", "| seconds per image | " + " | ".join(DEVICES[f] for f in present) + " |",
            "|---|" + "---|" * len(present)]
    for label in ("BF16", "FP8 all"):
        out.append(f"| {label} | " + " | ".join(f"{runs[f]['configs'][label]['seconds_per_image']:.3f}"
                                                 for f in present) + " |")
    return out


PLANTED = {"fullsize_planted_before.json": "before (d26011a)", "fullsize_planted_after.json": "after"}
# studies/qwen-image.toml: 8 prompts x 3 seeds at 50 steps under each setting (the measured runs:
# 3 x 1 at 20); before its settings matrix it had one, 1024x1024.
SHIPPED = {"outputs": 24, "steps": 50}
MATRIX = "fullsize_matrix.json"
PREFER = "prefer_gpu.json"


def render_planted(runs: dict) -> list[str]:
    """``bench_fullsize_run.py --plant``: the same call, the code before and after, and the shipped
    study's time projected from the after run's measured per-image costs."""
    out = ["Source: " + ", ".join(f"`results/runs/{f}`" for f in PLANTED) + f" ({runs[next(iter(PLANTED))]['device']}).", "",
           "| code | answer | wall s | build / baseline+floor / search / report s | images: baseline phase / after it | "
           "floor variants not counted (bit-identical) | generation share after the baseline | residency |",
           "|---|---|---|---|---|---|---|---|"]
    for name, label in PLANTED.items():
        d = runs[name]
        p = d["phases_s"]
        out.append(f"| {label} | {', '.join(d['answer'] or ['none'])} | {d['wall_s']:.1f} | {_phases(p, 1)} | "
                   f"{d['baseline_phase_images']} / {d['search_phase_images']} | "
                   f"{', '.join(d['floor']['identical_variants']) or 'none'} | "
                   f"{100 * d['generation_share_after_baseline']:.0f} % | {d['residency']} |")
    before, after = (runs[f] for f in PLANTED)
    out += ["", f"After over before: **{after['wall_s'] / before['wall_s']:.2f}** of the wall time."]
    # The projection: per-output seconds scale with steps; overheads (compilation, switching,
    # proxies) are taken as measured, since they do not grow with steps or outputs.
    a, p = after, after["phases_s"]
    scale = SHIPPED["steps"] / a["steps"]
    bf16 = a["bf16_seconds_per_image"] * scale
    kept = next(e for e in a["evaluations"] if e["config"] == a["answer"])["seconds_per_image"] * scale
    per_fp8_all = next(e for e in a["evaluations"] if e["config"] == [])["seconds_per_image"] * scale
    n = SHIPPED["outputs"]
    floor_outputs = n + (1 if a["floor"]["identical_variants"] else n)
    baseline_overhead = p["baseline_and_floor"] - a["baseline_phase_generation_s"]
    search_generation = sum(e["images"] * e["seconds_per_image"] for e in a["evaluations"] if e["config"] is not None)
    search_overhead = max(0.0, p["search"] - search_generation)
    report_images = a["report_generated_images"]
    rows = [("build (random weights from configs)", p["build"]),
            (f"BF16 baseline: {n} outputs x {bf16:.2f} s", n * bf16),
            (f"floor: {floor_outputs} outputs x {bf16:.2f} s (latents+1ulp all, attention-math one: bit-identical)",
             floor_outputs * bf16),
            ("baseline-phase overhead as measured (compilation, trajectory capture)", baseline_overhead),
            (f"FP8 everywhere, stopped after 1 output x {per_fp8_all:.2f} s (its one measured output "
             "includes compilation, scaled with the rest: an overestimate)", per_fp8_all),
            (f"the answer in full: {n} outputs x {kept:.2f} s", n * kept),
            ("search overhead as measured (compilation, requantizing, proxies)", search_overhead),
            (f"report: {report_images} grid outputs of FP8 everywhere x {per_fp8_all:.2f} s, plus the rest",
             report_images * per_fp8_all + max(0.0, p["report"] - report_images * a["fp8_all_seconds_per_image"]))]
    total = sum(s for _, s in rows)
    out += ["", f"Projection for `studies/qwen-image.toml` at 1024x1024 alone, as it was before its "
            f"settings matrix ({n} outputs at {SHIPPED['steps']} steps, auto, the planted answer), "
            f"from the after run: seconds per output x {scale:.1f} for the steps, overheads as "
            "measured.", "", "| part | s |", "|---|---|"]
    out += [f"| {label} | {seconds:.0f} |" for label, seconds in rows]
    out.append(f"| **total** | **{total:.0f} ({total / 60:.1f} min)** |")
    return out


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _calls_by_evaluation(run: dict) -> dict[str, dict[int, list[float]]]:
    """The after-baseline image calls of a run, by evaluation and size: the evaluations generate
    their images in the order the run lists them, the report's grid outputs come last."""
    after = [c for c in run["image_calls"] if c["phase"] == "after"]
    out, position = {}, 0
    for e in run["evaluations"]:
        if e["config"] is None:
            continue
        taken, position = after[position:position + e["images"]], position + e["images"]
        for c in taken:
            out.setdefault(e["label"], {}).setdefault(c["height"], []).append(c["seconds"])
    for c in after[position:]:
        out.setdefault("report", {}).setdefault(c["height"], []).append(c["seconds"])
    return out


def _steady(seconds: list[float]) -> float:
    """Seconds per output once compiled: the median of all but the first (which compiles)."""
    return _median(seconds[1:] or seconds)


def render_matrix(runs: dict) -> list[str]:
    """``bench_fullsize_run.py --settings``: the planted full-size model under a settings matrix,
    per-setting costs, and the shipped two-resolution study's time projected from them."""
    d = runs[MATRIX]
    sizes, p = d["settings"], d["phases_s"]
    baseline = {h: [c["seconds"] for c in d["image_calls"] if c["phase"] == "baseline" and c["height"] == h]
                for h in sizes}
    by_eval = _calls_by_evaluation(d)
    answer = next(e["label"] for e in d["evaluations"] if e["config"] == d["answer"])
    bf16 = {h: _steady(baseline[h]) for h in sizes}
    kept = {h: _steady(by_eval[answer][h]) for h in sizes}
    fp8_all = {h: _median(by_eval["report"][h]) for h in sizes if h in by_eval.get("report", {})}
    out = [f"Source: `results/runs/{MATRIX}` ({d['device']}; `{d['command']}`).", "",
           f"Answer: {', '.join(d['answer'] or ['none'])} under every setting; wall {d['wall_s']:.0f} s "
           f"(build {p['build']:.0f}, baseline and floor {p['baseline_and_floor']:.0f}, search "
           f"{p['search']:.0f}, report {p['report']:.0f}); {d['images_generated']} outputs generated; "
           f"floor variants bit-identical under every setting: "
           f"{', '.join(d['floor']['identical_variants']) or 'none'}; {d['residency']} residency.", "",
           f"| setting | BF16 s/output | FP8 everywhere s/output | {answer} s/output | BF16 / FP8 everywhere |",
           "|---|---|---|---|---|"]
    for h in sizes:
        ratio = f"{bf16[h] / fp8_all[h]:.2f}x" if h in fp8_all else "—"
        out.append(f"| {h}x{h} | {bf16[h]:.2f} | {fp8_all.get(h, float('nan')):.2f} | {kept[h]:.2f} | {ratio} |")
    # The projection: per-output seconds scale with steps; overheads as measured.
    scale, n = SHIPPED["steps"] / d["steps"], SHIPPED["outputs"]
    floor_outputs = {h: len(baseline[h]) - d["images_per_configuration"] for h in sizes}
    identical_at = [h for h in sizes if floor_outputs[h] < 2 * d["images_per_configuration"]]
    per_setting = sum(bf16.values()) * scale
    attention_seconds = sum((1 if h in identical_at else n) * bf16[h] * scale for h in sizes)
    first_fp8 = by_eval["FP8 all"][sizes[0]][0] * scale
    search_generation = sum(sum(sum(v) for v in by_eval[e["label"]].values())
                            for e in d["evaluations"] if e["config"] is not None)
    report_grid = sum(sum(v) for v in by_eval.get("report", {}).values())
    rows = [("build (random weights from configs)", p["build"]),
            (f"BF16 baseline: {n} outputs under each setting, " + " + ".join(
                f"{bf16[h] * scale:.1f}" for h in sizes) + " s", n * per_setting),
            ("floor, latents+1ulp: the same", n * per_setting),
            ("floor, attention-math: " + ", ".join(
                f"{h}: {'1 output (bit-identical)' if h in identical_at else f'{n} outputs'}" for h in sizes),
             attention_seconds),
            ("baseline-phase overhead as measured (compilation, trajectory capture)",
             p["baseline_and_floor"] - d["baseline_phase_generation_s"]),
            (f"FP8 everywhere, stopped after 1 output at {sizes[0]}x{sizes[0]} (its measured output "
             "includes compilation: an overestimate)", first_fp8),
            (f"the answer in full: {n} outputs under each setting, " + " + ".join(
                f"{kept[h] * scale:.1f}" for h in sizes) + " s", n * sum(kept.values()) * scale),
            ("search overhead as measured (compilation, requantizing, proxies)",
             max(0.0, p["search"] - search_generation)),
            ("report: the grid's FP8-everywhere outputs, scaled, plus the rest as measured",
             report_grid * scale + max(0.0, p["report"] - report_grid))]
    total = sum(seconds for _, seconds in rows)
    out += ["", f"Projection for `studies/qwen-image.toml` with its two settings ({n} outputs at "
            f"{SHIPPED['steps']} steps under each of " + ", ".join(f"{h}x{h}" for h in sizes)
            + f", auto, the planted answer), from this run: seconds per output x {scale:.1f} for the "
            "steps, overheads as measured.", "", "| part | s |", "|---|---|"]
    out += [f"| {label} | {seconds:.0f} |" for label, seconds in rows]
    out.append(f"| **total** | **{total:.0f} ({total / 60:.1f} min)** |")
    return out


def render_prefer(runs: dict) -> list[str]:
    """``bench_prefer.py``: one planted model, every configuration, two preferences."""
    d = runs[PREFER]
    out = [f"Source: `results/runs/{PREFER}` ({d['device']}, torch {d['torch']}; `{d['command']}`), "
           f"planted: {d['planted']}.", "",
           "| configuration | verdict | psnr mean | ms / image | BF16-kept bytes |", "|---|---|---|---|---|"]
    for c in d["configurations"]:
        verdict = "reference" if c["configuration"] == "BF16" else ("passes" if c["passes"] else "fails")
        out.append(f"| {c['configuration']} | {verdict} | {c['psnr_mean']:.2f} | "
                   f"{1000 * c['seconds_per_image']:.1f} | {c['bf16_kept_bytes']:,} |")
    out += ["", "| --prefer | answer | speed-up over BF16 [95 % CI] | kept for the objective, not for quality |",
            "|---|---|---|---|"]
    for prefer, a in d["answers"].items():
        speed = a["speedup_vs_bf16"]
        out.append(f"| {prefer} | {', '.join(f'`{g}`' for g in a['answer'])} | {speed['median_ratio']:.2f}x "
                   f"[{speed['ci95'][0]:.2f}, {speed['ci95'][1]:.2f}] | "
                   f"{', '.join(f'`{g}`' for g in a['minimality']['kept_for_objective']) or 'none'} |")
    return out


def render_batch_workers(runs: dict) -> list[str]:
    """``bench_batch_workers.py``: each batch strategy on 1 and 2 CPU workers."""
    data = runs["batch_workers.json"]
    out = [f"Source: `results/runs/batch_workers.json` (`{data['command']}`, {data['machine']}, "
           f"{data['cores']} cores, {data['date']}; {data['images']} images per evaluation at "
           f"{data['steps']} steps).", "",
           "| strategy | workers | wall s | evaluations (by the helper) | evaluations / hour | "
           "speed-up | answer |", "|---|---|---|---|---|---|---|"]
    for strategy in data["strategies"]:
        runs_of = [r for r in data["runs"] if r["strategy"] == strategy]
        one = next(r for r in runs_of if r["workers"] == 1)
        for r in runs_of:
            out.append(f"| {strategy} | {r['workers']} | {r['wall_s']:.1f} | {r['evaluations']} "
                       f"({r['by_helper']}) | {r['evaluations_per_hour']:.0f} | "
                       f"{one['wall_s'] / r['wall_s']:.2f}x | {', '.join(r['answer']) or 'none'} |")
    return out


BLOCKS = {"fullsize": render_fullsize, "wan_step": render_wan, "devices": render_devices,
          "batch_workers": render_batch_workers, "planted": render_planted, "matrix": render_matrix,
          "prefer": render_prefer}


def render(runs_dir: Path = RUNS_DIR) -> dict[str, str]:
    runs = {p.name: json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json"))}
    return {name: "\n".join(fn(runs)) for name, fn in BLOCKS.items()}


def check(doc_path: Path = DOC, runs_dir: Path = RUNS_DIR) -> list[str]:
    known = set(FULLSIZE) | set(DEVICES) | set(PLANTED) | {"wan_step.json", "batch_workers.json", MATRIX, PREFER}
    problems = [f"results/runs/{p.name} is not declared in render_runs"
                for p in sorted(runs_dir.glob("*.json")) if p.name not in known]
    found, marker_problems = blocks_in(doc_path.read_text(), MARKER)
    return problems + marker_problems + block_problems(found, render(runs_dir), "render_runs")


def write(doc_path: Path = DOC, runs_dir: Path = RUNS_DIR) -> None:
    doc = doc_path.read_text()
    found, problems = blocks_in(doc, MARKER)
    rendered = render(runs_dir)
    problems += [f"RESULTS.md lacks the block {n!r}" for n in rendered.keys() - found.keys()]
    if problems:
        raise SystemExit("render_runs: " + "; ".join(problems))
    doc_path.write_text(replace_blocks(doc, rendered, "render_runs"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true")
    mode.add_argument("--write", action="store_true")
    parser.add_argument("--doc", type=Path, default=DOC)
    args = parser.parse_args(argv)
    if args.check:
        problems = check(args.doc)
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1 if problems else 0
    if args.write:
        write(args.doc)
        return 0
    for name, text in render().items():
        print(f"<!-- render_runs:{name} -->{body(text)}<!-- /render_runs:{name} -->\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
