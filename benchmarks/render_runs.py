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


# One device call each: the package before (22249cb) and after, side by side, each with empty
# compile caches.  The first pair's after made the CPU copies of the weights beside the baseline
# from its start, as the code does now (it predates SSIM on threads); the second pair's after
# started them once the first output existed, and was dropped (RESULTS.md says why).
PLANTED_CALLS = (
    ("fullsize_planted_before.json", "fullsize_planted_after.json",
     "after (36bc527): copies made beside the baseline from its start"),
    ("fullsize_planted_before_second_call.json", "fullsize_planted_copies_after_first_output.json",
     "after (da97838): copies started after the first output (dropped)"),
)
PLANTED = tuple(f for pair in PLANTED_CALLS for f in pair[:2])
# The clock alone (6727166): where the time went while the copies were still made up front.
PROFILE = "fullsize_planted_profile.json"
# studies/qwen-image.toml: 8 prompts x 3 seeds at 50 steps under each setting (the measured runs:
# 3 x 1 at 20).
SHIPPED = {"outputs": 24, "steps": 50}
MATRIX = "fullsize_matrix.json"
PREFER = "prefer_gpu.json"
BATCHING = "batching.json"
WAN_SETTINGS = ("wan_step_33f_h100.json", "wan_step_81f_h100.json")


def _evaluation(run: dict, config) -> dict:
    return next(e for e in run["evaluations"] if e["config"] == config)


def render_planted(runs: dict) -> list[str]:
    """``bench_fullsize_run.py --plant``: the same call, the code before and after, where the
    time went, and the shipped study's time projected from the measured costs."""
    first = runs[PLANTED_CALLS[0][1]]
    out = ["Source: " + ", ".join(f"`results/runs/{f}`" for f in PLANTED + (PROFILE,))
           + f" ({first['device']}).", "",
           "| call | code | answer | wall s | build / baseline+floor / search / report s | outputs: baseline phase / after it | "
           "floor variants not counted (bit-identical) | generation share after the baseline | residency |",
           "|---|---|---|---|---|---|---|---|---|"]
    for number, (before_file, after_file, label) in enumerate(PLANTED_CALLS, 1):
        for d, name in ((runs[before_file], runs[before_file]["label"]), (runs[after_file], label)):
            p = d["phases_s"]
            out.append(f"| {number} | {name} | {', '.join(d['answer'] or ['none'])} | {d['wall_s']:.1f} | {_phases(p, 1)} | "
                       f"{d['baseline_phase_images']} / {d['search_phase_images']} | "
                       f"{', '.join(d['floor']['identical_variants']) or 'none'} | "
                       f"{100 * d['generation_share_after_baseline']:.0f} % | {d['residency']} |")
    out.append("")
    for number, (before_file, after_file, _) in enumerate(PLANTED_CALLS, 1):
        ratio = runs[after_file]["wall_s"] / runs[before_file]["wall_s"]
        out.append(f"After over before, call {number}: **{ratio:.2f}** of the wall time.")
    columns = [(PROFILE, "the clock alone (6727166), copies made up front"),
               (PLANTED_CALLS[0][1], "call 1's after"), (PLANTED_CALLS[1][1], "call 2's after")]
    names = list(dict.fromkeys(n for f, _ in columns for n in runs[f]["timing"]["phases"]))
    out += ["", "Where the time went (`layerscan.clock`: seconds, and how many times the phase ran; "
            "from before the build to the end of the report, the bench's build of random weights "
            "falling in \"everything else\"):", "",
            "| phase | " + " | ".join(title for _, title in columns) + " |",
            "|---|" + "---|" * len(columns)]
    for name in names:
        cells = []
        for f, _ in columns:
            ph = runs[f]["timing"]["phases"].get(name)
            cells.append("—" if ph is None else f"{ph['seconds']:.1f}" + ("" if ph["count"] is None else f" ({ph['count']})"))
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out.append("| **wall** | " + " | ".join(f"**{runs[f]['timing']['wall']:.1f}**" for f, _ in columns) + " |")
    first_outputs = [(f, runs[f]["image_calls"][:2]) for f, _ in columns]
    out += ["", "The baseline's first two outputs (the first compiles the BF16 graphs), s: " + "; ".join(
        f"{title} {calls[0]['seconds']:.1f}, {calls[1]['seconds']:.1f}" for (f, calls), (_, title)
        in zip(first_outputs, columns)) + "."]
    return out + [""] + _projection(first, runs[MATRIX], runs[PLANTED_CALLS[1][1]])


def _projection(a: dict, matrix: dict, scored: dict) -> list[str]:
    """The shipped study's time from measured costs: per-output seconds scale with the steps;
    compilation, preparation, switching, proxies and the report are taken as measured (they do
    not grow with steps); scoring and saving per output as ``scored`` measured them (the code
    whose SSIM runs on threads), times the outputs.  The second setting's per-output costs come
    from the matrix run (same GPU model; the DiT's work per output is what this change leaves
    alone)."""
    scale, n = SHIPPED["steps"] / a["steps"], SHIPPED["outputs"]
    ph = {name: v["seconds"] for name, v in a["timing"]["phases"].items()}
    bf16 = {1024: a["bf16_seconds_per_image"]}
    kept = {1024: _evaluation(a, a["answer"])["seconds_per_image"]}
    m_calls = _calls_by_evaluation(matrix)
    m_base = [c["seconds"] for c in matrix["image_calls"] if c["phase"] == "baseline" and c["height"] == 1328]
    m_answer = next(e["label"] for e in matrix["evaluations"] if e["config"] == matrix["answer"])
    bf16[1328], kept[1328] = _steady(m_base), _steady(m_calls[m_answer][1328])
    fp8_all_1024 = _median(m_calls["report"][1024])  # compile-free FP8 everywhere, the matrix run's
    identical = bool(a["floor"]["identical_variants"])
    # Compilation: what the outputs that compiled took beyond a compile-free output of their
    # configuration; the second setting's recompilation (another shape) as the matrix run saw it.
    first_fp8_all = _evaluation(a, [])
    compiled = [c["seconds"] for c in a["image_calls"]]
    compile_1024 = (compiled[0] - bf16[1024]) + (first_fp8_all["seconds_per_image"] - fp8_all_1024) + \
        (_first_after(a, a["answer"]) - kept[1024])
    compile_1328 = (m_base[0] - bf16[1328]) + (m_calls[m_answer][1328][0] - kept[1328])
    sp = scored["timing"]["phases"]
    per_output = (sp["scoring"]["seconds"] + sp["saving outputs"]["seconds"]) / scored["images_generated"]
    fixed = [("build (random weights from configs)", a["phases_s"]["build"]),
             ("preparing FP8 layers, as measured (what the baseline did not hide)", ph.get("preparing FP8 layers", 0.0)),
             ("switching precision, proxies, report and the rest, as measured",
              sum(ph.get(k, 0.0) for k in ("switching precision", "proxies", "writing the report", "loading the pipeline"))
              + max(0.0, ph.get("everything else", 0.0) - a["phases_s"]["build"]))]

    def study(sizes: list[int]) -> tuple[list[tuple[str, float]], float]:
        attention = {h: 1 if identical else n for h in sizes}
        outputs = sum(n * 2 + attention[h] + n for h in sizes) + 1
        rows = fixed[:1] + [
            (f"BF16 baseline: {n} outputs under each setting, " + " + ".join(f"{bf16[h] * scale:.1f}" for h in sizes)
             + " s", n * sum(bf16[h] for h in sizes) * scale),
            ("floor, latents+1ulp: the same", n * sum(bf16[h] for h in sizes) * scale),
            ("floor, attention-math: " + ("1 output per setting (bit-identical, as measured)" if identical
                                          else f"{n} outputs per setting (it changed the outputs here)"),
             sum(attention[h] * bf16[h] for h in sizes) * scale),
            (f"FP8 everywhere, stopped after 1 output at 1024x1024: {fp8_all_1024 * scale:.1f} s",
             fp8_all_1024 * scale),
            (f"the answer in full: {n} outputs under each setting, " + " + ".join(f"{kept[h] * scale:.1f}" for h in sizes)
             + " s", n * sum(kept[h] for h in sizes) * scale),
            ("compilation (and the CPU copies made beside the first output), as measured"
             + (" (the second setting's: from the matrix run)" if len(sizes) > 1 else ""),
             compile_1024 + (compile_1328 if len(sizes) > 1 else 0.0)),
            (f"scoring and saving: {outputs} outputs x {per_output:.2f} s (as call 2 measured them)",
             outputs * per_output),
        ] + fixed[1:]
        return rows, sum(s for _, s in rows)

    out = []
    for sizes, title in (([1024], "at 1024x1024 alone"), ([1024, 1328], "with its two settings, 1024x1024 and 1328x1328")):
        rows, total = study(sizes)
        out += [f"Projection for `studies/qwen-image.toml` {title} ({n} outputs per setting at "
                f"{SHIPPED['steps']} steps, auto, the planted answer), from an empty cache: seconds per output "
                f"x {scale:.1f} for the steps.", "", "| part | s |", "|---|---|"]
        out += [f"| {label} | {seconds:.0f} |" for label, seconds in rows]
        out += [f"| **total** | **{total:.0f} ({total / 60:.1f} min)** |", ""]
    floor_two = n * sum(bf16[h] + kept[h] for h in (1024, 1328)) * scale
    out.append(f"Lower bound for the two settings, whatever the overheads and the floor: the BF16 baseline "
               f"and the answer's full evaluation alone take {floor_two:.0f} s ({floor_two / 60:.1f} min).")
    return out


def _first_after(run: dict, config) -> float:
    """Seconds of the first output an evaluation generated (the one that compiled its graphs)."""
    calls = [c["seconds"] for c in run["image_calls"] if c["phase"] == "after"]
    position = 0
    for e in run["evaluations"]:
        if e["config"] is None:
            continue
        if e["config"] == config:
            return calls[position]
        position += e["images"]
    raise KeyError(config)


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
    return out


def render_batching(runs: dict) -> list[str]:
    """``bench_batching.py``: one DiT call on a batch of two against two calls of one."""
    d = runs[BATCHING]
    out = [f"Source: `results/runs/{BATCHING}` ({d['device']}; `{d['command']}`); {d['image_tokens']} image "
           f"tokens ({d['size']}x{d['size']}), {d['residency']} residency.", "",
           "| mode | precision | two calls of one, s | one call of two, s | gain |", "|---|---|---|---|---|"]
    out += [f"| {r['mode']} | {r['precision']} | {r['two_calls_of_one_s']:.3f} | {r['one_call_of_two_s']:.3f} | "
            f"{r['gain']:.2f}x |" for r in d["rows"]]
    return out


def render_wan_settings(runs: dict) -> list[str]:
    """``bench_wan_step.py --frames``: one expert's step at each clip length of the shipped
    study, and the whole study's time from them (every setting's videos, both experts: each step
    runs one of two experts of one shape, so one expert's step is the unit)."""
    steps = [runs[f] for f in WAN_SETTINGS]
    out = ["Source: " + ", ".join(f"`results/runs/{f}`" for f in WAN_SETTINGS) + f" ({steps[0]['device']}, "
           f"{steps[0]['mode']}).", "",
           "| clip | tokens (video + text) | BF16 s per DiT call | FP8 everywhere | FP8 on ffn only | peak GPU GB (FP8) |",
           "|---|---|---|---|---|---|"]
    for d in steps:
        c, t = d["clip"], d["step_s"]
        out.append(f"| {c['frames']} frames, {c['height']}x{c['width']} | {c['video_tokens']:,} + {c['text_tokens']} | "
                   f"{t['bf16']:.2f} | {t['fp8_all']:.2f} | {t['fp8_ffn_only']:.2f} | "
                   f"{_gb(d['peak_memory_bytes']['fp8_all'])} |")
    e = [d["estimate"] for d in steps]
    videos, baseline_videos = e[0]["videos_per_configuration"], e[0]["baseline_videos"]
    bf16 = sum(x["seconds_per_video"]["bf16"] for x in e)
    per_config = [videos * sum(x["seconds_per_video"][k] for x in e) for k in ("fp8_all", "fp8_ffn_only")]
    baseline = baseline_videos * bf16
    hours = lambda seconds: seconds / 3600  # noqa: E731
    out += ["", f"Estimate for `studies/wan2.2.toml` (both settings, {steps[0]['study']['steps']} steps, CFG: "
            f"{e[0]['dit_calls_per_video']} DiT calls per video, {videos} videos per configuration under each "
            f"setting): BF16 baseline and noise floor {baseline_videos} videos per setting, "
            f"{hours(baseline):.2f} h; {hours(per_config[0]):.2f}-{hours(per_config[1]):.2f} h per FP8 "
            "configuration (every video of both settings)."]
    for key in ("auto_one_group", "greedy", "exhaustive"):
        n = e[0]["runs"][key]["configurations"]
        out.append(f"- {key.replace('_', ' ')} ({n} configurations): "
                   f"{hours(baseline + n * per_config[0]):.1f}-{hours(baseline + n * per_config[1]):.1f} h")
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
          "prefer": render_prefer, "batching": render_batching, "wan_settings": render_wan_settings}


def render(runs_dir: Path = RUNS_DIR) -> dict[str, str]:
    runs = {p.name: json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json"))}
    return {name: "\n".join(fn(runs)) for name, fn in BLOCKS.items()}


def check(doc_path: Path = DOC, runs_dir: Path = RUNS_DIR) -> list[str]:
    known = set(FULLSIZE) | set(DEVICES) | set(PLANTED) | set(WAN_SETTINGS) | {PROFILE, BATCHING, "wan_step.json", "batch_workers.json", MATRIX, PREFER}
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
