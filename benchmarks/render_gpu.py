"""Render the tables of benchmarks/RESULTS.md's GPU section from bench_gpu.py's raw JSON.

How RESULTS.md and this script fit together
--------------------------------------------
RESULTS.md holds the rendered text between marker lines (each marker a line of its own)::

    <!-- render_gpu:NAME -->
    (exactly what this script renders for block NAME)
    <!-- /render_gpu:NAME -->

Everything between a pair of markers belongs to this script; everything outside them is prose,
written by hand, which must agree with the blocks.  Commands (from the repository root)::

    python benchmarks/render_gpu.py            # print every block, with its markers
    python benchmarks/render_gpu.py --write    # rewrite the blocks in RESULTS.md in place
    python benchmarks/render_gpu.py --check    # exit 1 (and show a diff) if RESULTS.md's blocks
                                               # differ from what the JSON renders

tests/test_results_doc.py runs ``--check`` on the committed files.

Where each number comes from
----------------------------
Nothing is merged.  Each block declares in ``BLOCKS`` the (file, key) pairs it reads and is
handed those and nothing else; it names its files in its text (a "Source:" line, or a column of
file names).  Where several files hold the same measurement, the rule is: the block renders the
file named in ``BLOCKS`` (the reason is the comment at the file's constant), and every other file
holding that measurement is either rendered next to it, labelled with its file name (blocks
``eager_runs`` and ``reload``), or listed under "not rendered" in the ``runs`` block, which names
every file in results/, its command, and which of its parts each block renders.  ``--check``
also fails when results/ holds a file that ``RUNS`` does not declare, so a new run cannot slip in
unnoticed.

The Amdahl ceiling of a configuration is the BF16 step with each quantized layer's BF16 GEMM time
replaced by its measured FP8 GEMM time (same card, same shapes, GEMMs timed in isolation in the
GEMM run): the speed-up FP8 could give if activation quantization and everything else cost
nothing.  Its GEMM times come from another run than the step times, so it is an estimate, not a
hard bound.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gpu_layout import FAMILY_OF_SHAPE, SIX_FAMILIES_KEEP

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
DOC = HERE / "RESULTS.md"

PART1 = "h200_part1_memory_overhead.json"
PART2 = "h200_part2_gemm_eager.json"
EAGER = "h200_eager_bias_fused.json"
COMPILED = "h200_compiled.json"
RELOAD_WARM = "h200_reload_warm_switch.json"
RELOAD_COLD = "h200_reload_cold_switch.json"

# Every file results/ may hold, in the order the runs table lists them.
RUNS = (PART1, PART2, EAGER, COMPILED, RELOAD_WARM, RELOAD_COLD)

# GEMMs are in PART1 and PART2.  PART2 is rendered: it is the run whose file has the
# bit-identity check (``fused_quant_matches_reference``) that the committed bench_gpu.py always
# writes; PART1 lacks it, so it came from an earlier bench_gpu.py.
GEMM = PART2
# Eager steps (and the FP8 step's profile) are in PART1, PART2 and EAGER.  EAGER is rendered: the
# run after the bias moved into _scaled_mm's epilogue (its profile shows the ``…_bias_TNT``
# kernel).  All three are compared, labelled, in the ``eager_runs`` block.
EAGER_RUNS = (PART1, PART2, EAGER)
# Memory and overhead were measured only in PART1; reload in two runs, both rendered, labelled.
RELOAD_RUNS = (RELOAD_WARM, RELOAD_COLD)

Runs = dict[str, dict]


def part(runs: Runs, name: str, key: str):
    """``runs[name][key]`` from a block's view, which holds only what the block declares."""
    try:
        return runs[name][key]
    except KeyError:
        raise KeyError(f"render_gpu: a block reads {key!r} of results/{name} without declaring "
                       "it in BLOCKS") from None


def source_line(**files: str) -> str:
    return "Source: " + "; ".join(f"{what} `results/{name}`" for what, name in files.items()) + "."


def ceiling(gemm: dict, layers: int, bf16_step: float, kept: list[str] | None) -> float:
    saved = 0.0
    for name, shape in gemm["shapes"].items():
        if FAMILY_OF_SHAPE[name] not in (kept or []):
            saved += layers * shape["count"] * (shape["bf16_s"] - shape["fp8_gemm_s"])
    return bf16_step / (bf16_step - saved)


def gemm_share(gemm: dict, layers: int, bf16_step: float) -> float:
    total = sum(layers * s["count"] * s["bf16_s"] for s in gemm["shapes"].values())
    return total / bf16_step


def kernel_names(rows: list) -> tuple[str, str]:
    """(FP8 GEMM kernel, quantization kernel) named in a profile, '—' where none is."""
    gemm = next((n for n, _ in rows if n.startswith("nvjet")), "—")
    quant = next((n for n, _ in rows if n == "kernel" or n.startswith("triton_")), "—")
    return gemm, quant


# --- blocks --------------------------------------------------------------------------------------

def render_gemm(runs: Runs) -> list[str]:
    gemm = part(runs, GEMM, "gemm")
    out = [source_line(GEMMs=GEMM), "",
           f"Ceilings on this card (8192³): BF16 {gemm['ceiling_bf16_tflops']:.0f} TFLOP/s, "
           f"FP8 {gemm['ceiling_fp8_tflops']:.0f} TFLOP/s.", "",
           "| GEMM (M×K×N) | per block | BF16 µs | FP8 GEMM µs | FP8 + fused quant µs | "
           "FP8 + unfused quant µs | BF16 TFLOP/s | FP8 TFLOP/s | fused quant bit-identical |",
           "|---|---|---|---|---|---|---|---|---|"]
    identical = {True: "yes", False: "**no**", None: "not recorded"}
    for name, s in gemm["shapes"].items():
        out.append(f"| {name} ({s['m']}×{s['k']}×{s['n']}) | {s['count']} | {s['bf16_s'] * 1e6:.1f} | "
                   f"{s['fp8_gemm_s'] * 1e6:.1f} | {s['fp8_fused_quant_s'] * 1e6:.1f} | "
                   f"{s['fp8_unfused_quant_s'] * 1e6:.1f} | {s['bf16_tflops']:.0f} | "
                   f"{s['fp8_tflops']:.0f} | {identical[s.get('fused_quant_matches_reference')]} |")
    return out


def step_table(runs: Runs, name: str, mode: str) -> list[str]:
    steps, gemm = part(runs, name, mode), part(runs, GEMM, "gemm")
    layers = part(runs, name, "model")["layers"]
    bf16 = steps["bf16"]["step_s"]
    out = [source_line(**{"step times": name, "GEMM times of the ceiling": GEMM}), "",
           f"Quantized layers' BF16 GEMMs are {100 * gemm_share(gemm, layers, bf16):.0f} % of the "
           f"BF16 step ({layers} blocks).", "",
           "| configuration | step ms | speed-up vs BF16 | Amdahl ceiling | share of ceiling | first call s |",
           "|---|---|---|---|---|---|"]
    for label, kept in SIX_FAMILIES_KEEP.items():
        step = steps[label]["step_s"]
        speedup = bf16 / step
        ceil = 1.0 if kept is None else ceiling(gemm, layers, bf16, kept)
        out.append(f"| {label} | {step * 1e3:.1f} | {speedup:.3f}x | {ceil:.3f}x | "
                   f"{100 * speedup / ceil:.0f} % | {steps[label]['first_call_s']:.1f} |")
    return out


def render_eager_runs(runs: Runs) -> list[str]:
    out = ["Every eager step in results/ (BF16, FP8 on all six families, FP8 with img_mlp in BF16; "
           "kernels as named in the same run's profile of the FP8-all step):", "",
           "| run | BF16 ms | FP8-all ms | FP8-all vs BF16 | keep img_mlp ms | keep img_mlp vs BF16 | "
           "FP8 GEMM kernel | quantization kernel |",
           "|---|---|---|---|---|---|---|---|"]
    for name in EAGER_RUNS:
        steps = part(runs, name, "eager")
        bf16, fp8, keep = (steps[k]["step_s"] for k in ("bf16", "fp8_all", "fp8_keep_img_mlp"))
        gemm_kernel, quant_kernel = kernel_names(part(runs, name, "kernels_fp8_step"))
        out.append(f"| `{name}` | {bf16 * 1e3:.1f} | {fp8 * 1e3:.1f} | {bf16 / fp8:.3f}x | "
                   f"{keep * 1e3:.1f} | {bf16 / keep:.3f}x | `{gemm_kernel}` | `{quant_kernel}` |")
    return out


def render_kernels(runs: Runs) -> list[str]:
    rows = part(runs, EAGER, "kernels_fp8_step")
    out = [source_line(profile=EAGER), "",
           f"Device time in one eager FP8-all step, the {len(rows)} largest rows the profiler "
           "reported (operators and the kernels they launch, so rows overlap):", "",
           "| op / kernel | ms |", "|---|---|"]
    out += [f"| `{name[:90]}` | {ms:.1f} |" for name, ms in rows]
    return out


def render_memory(runs: Runs) -> list[str]:
    memory = part(runs, PART1, "memory")
    out = [source_line(memory=PART1), "",
           "| configuration | analytic bytes | tensors held | torch.cuda.memory_allocated | analytic / allocated |",
           "|---|---|---|---|---|"]
    for label, m in memory["configs"].items():
        alloc = m["cuda_allocated"]
        out.append(f"| {label} | {m['analytic']:,} | {m['tensors_held']:,} | "
                   f"{alloc:,} | {m['analytic'] / alloc:.4f} |")
    out += ["", "Switching in place (seconds):", "", "| switch | s |", "|---|---|"]
    out += [f"| {k} | {v:.4f} |" for k, v in memory["switch_s"].items()]
    return out


def render_reload(runs: Runs) -> list[str]:
    out = ["Save with `save_pretrained`, reload to the GPU with `from_pretrained` (files still in "
           "the page cache: a lower bound), switch BF16 → FP8 keep img_mlp in place:", "",
           "| run | blocks | safetensors GB | save s | reload s | switch ms | reload / switch |",
           "|---|---|---|---|---|---|---|"]
    for name in RELOAD_RUNS:
        rl = part(runs, name, "reload")
        out.append(f"| `{name}` | {rl['layers']} | {rl['bytes_on_disk'] / 1e9:.2f} | "
                   f"{rl['save_s']:.1f} | {rl['reload_s']:.2f} | {rl['switch_s'] * 1e3:.2f} | "
                   f"**{rl['ratio']:.0f}x** |")
    return out


def render_overhead(runs: Runs) -> list[str]:
    o = part(runs, PART1, "overhead")
    calls = o["transformer_calls_per_image"]
    return [source_line(overhead=PART1), "",
            f"SSIM+PSNR on a {o['image_side']}² image {o['score_ssim_psnr_s']:.3f} s, trial "
            f"record {o['record_s'] * 1e3:.2f} ms, against {calls} BF16 DiT steps "
            f"({o['generation_s']:.1f} s: {calls} × the same run's BF16 eager step of "
            f"{o['generation_s'] / calls * 1e3:.1f} ms; VAE and text encoder not counted): "
            f"**{100 * o['overhead_share']:.1f} %** of generation."]


def render_runs(runs: Runs) -> list[str]:
    fields = ("date", "device", "torch", "cuda")
    envs = [part(runs, name, "env") for name in RUNS]
    common = [k for k in fields if len({e.get(k) for e in envs}) == 1]
    varying = [k for k in fields if k not in common]
    out = []
    if common:
        out += ["All runs: " + ", ".join(f"{k} {envs[0].get(k)}" for k in common) + ".", ""]
    out += ["| file | command | blocks | parameters | rendered (in) | not rendered |"
            + "".join(f" {k} |" for k in varying),
            "|---|---|---|---|---|---|" + "---|" * len(varying)]
    for name, env in zip(RUNS, envs):
        model = runs[name].get("model")
        size = f"{model['layers']} | {model['params'] / 1e9:.2f} B" if model else "— | —"
        rendered, unused = [], []
        for key in runs[name]["measured"]:
            titles = [b.title for b in BLOCKS if (name, key) in b.reads]
            if titles:
                rendered.append(f"{key} ({', '.join(titles)})")
            else:
                unused.append(key)
        out.append(f"| `{name}` | `{env['command']}` | {size} | {'; '.join(rendered) or '—'} | "
                   f"{', '.join(unused) or '—'} |" + "".join(f" {env.get(k)} |" for k in varying))
    return out


@dataclass(frozen=True)
class Block:
    name: str
    title: str
    reads: tuple[tuple[str, str], ...]  # (file in results/, top-level key): all the block sees
    render: Callable[[Runs], list[str]]


def reads(files, *keys: str) -> tuple[tuple[str, str], ...]:
    return tuple((f, k) for f in ((files,) if isinstance(files, str) else files) for k in keys)


BLOCKS = (
    Block("gemm", "GEMM table and ceilings", reads(GEMM, "gemm"), render_gemm),
    Block("step_eager", "eager step", reads(EAGER, "eager", "model") + reads(GEMM, "gemm"),
          lambda r: step_table(r, EAGER, "eager")),
    Block("step_compiled", "compiled step", reads(COMPILED, "compiled", "model") + reads(GEMM, "gemm"),
          lambda r: step_table(r, COMPILED, "compiled")),
    Block("eager_runs", "eager runs compared", reads(EAGER_RUNS, "eager", "kernels_fp8_step"),
          render_eager_runs),
    Block("kernels", "FP8 step profile", reads(EAGER, "kernels_fp8_step"), render_kernels),
    Block("memory", "memory and switching", reads(PART1, "memory"), render_memory),
    Block("reload", "reload vs switch", reads(RELOAD_RUNS, "reload"), render_reload),
    Block("overhead", "overhead", reads(PART1, "overhead"), render_overhead),
)
# The runs block reads every declared file's env and model, and lists what the blocks above read.
RUNS_BLOCK = Block("runs", "runs", reads(RUNS, "env", "model"), render_runs)


# --- RESULTS.md ----------------------------------------------------------------------------------

# A marker is a line of its own; the same text inside a line (as in prose about it) is no marker.
MARKER = re.compile(r"^<!-- (/?)render_gpu:([A-Za-z0-9_]+) -->$", re.M)


def load(results_dir: Path) -> Runs:
    return {p.name: json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))}


def view(runs: Runs, block: Block) -> Runs:
    """The part of ``runs`` that ``block`` declares, and nothing else: no block can merge."""
    out: Runs = {}
    for name, key in block.reads:
        if name not in runs:
            raise SystemExit(f"render_gpu: results/{name} is missing")
        if key in runs[name]:
            out.setdefault(name, {})[key] = runs[name][key]
        elif not (block is RUNS_BLOCK and key == "model"):  # the runs table shows "—" for it
            raise SystemExit(f"render_gpu: results/{name} has no {key!r} "
                             f"(it has: {', '.join(runs[name])})")
    if block is RUNS_BLOCK:  # the names of every file's parts, for "rendered"/"not rendered"
        for name in RUNS:
            out.setdefault(name, {})["measured"] = [k for k in runs[name] if k not in ("env", "model")]
    return out


def render(results_dir: Path = RESULTS_DIR) -> dict[str, str]:
    """Block name -> the text between its markers (no markers, no surrounding blank lines)."""
    runs = load(results_dir)
    # Only the files in RUNS are rendered; an undeclared one in results/ fails check().
    return {b.name: "\n".join(b.render(view(runs, b))) for b in (RUNS_BLOCK, *BLOCKS)}


def body(text: str) -> str:
    """What RESULTS.md holds between a block's markers: the text with a blank line either side."""
    return f"\n\n{text}\n\n"


def blocks_in(doc: str, marker: re.Pattern = MARKER) -> tuple[dict[str, str], list[str]]:
    """The text between each pair of markers in ``doc``, and the problems with the markers."""
    found: dict[str, str] = {}
    problems: list[str] = []
    open_name, open_end = None, 0
    for m in marker.finditer(doc):
        closing, name = m.group(1) == "/", m.group(2)
        if not closing:
            if open_name is not None:
                problems.append(f"block {open_name!r} is not closed before {name!r} opens")
            open_name, open_end = name, m.end()
        elif name != open_name:
            problems.append(f"closing marker of {name!r} without its opening marker")
        else:
            if name in found:
                problems.append(f"block {name!r} appears twice")
            found[name] = doc[open_end:m.start()]
            open_name = None
    if open_name is not None:
        problems.append(f"block {open_name!r} is never closed")
    return found, problems


def block_problems(found: dict[str, str], rendered: dict[str, str], tool: str) -> list[str]:
    """How the blocks ``found`` in RESULTS.md differ from what ``tool`` renders."""
    problems = [f"RESULTS.md has a block {name!r} that {tool} does not render"
                for name in sorted(found.keys() - rendered.keys())]
    for name, text in rendered.items():
        if name not in found:
            problems.append(f"RESULTS.md lacks the block {name!r}")
        elif found[name] != body(text):
            diff = difflib.unified_diff(found[name].splitlines(), body(text).splitlines(),
                                        f"RESULTS.md:{name}", f"rendered:{name}", lineterm="")
            problems.append(f"block {name!r} differs from the JSON:\n" + "\n".join(diff))
    return problems


def replace_blocks(doc: str, rendered: dict[str, str], tool: str) -> str:
    """``doc`` with the text between each of ``tool``'s marker pairs replaced by its rendering."""
    for name, text in rendered.items():
        pattern = re.compile(rf"^(<!-- {tool}:{name} -->)$.*?^(<!-- /{tool}:{name} -->)$",
                             re.S | re.M)
        doc = pattern.sub(lambda m: m.group(1) + body(text) + m.group(2), doc)
    return doc


def check(doc_path: Path = DOC, results_dir: Path = RESULTS_DIR) -> list[str]:
    """Every way RESULTS.md disagrees with what the JSON renders; empty when they agree."""
    problems = [f"results/{p.name} is not declared in render_gpu.RUNS"
                for p in sorted(results_dir.glob("*.json")) if p.name not in RUNS]
    found, marker_problems = blocks_in(doc_path.read_text())
    return problems + marker_problems + block_problems(found, render(results_dir), "render_gpu")


def write(doc_path: Path = DOC, results_dir: Path = RESULTS_DIR) -> None:
    """Replace the text between each pair of markers with what the JSON renders."""
    doc = doc_path.read_text()
    found, problems = blocks_in(doc)
    rendered = render(results_dir)
    problems += [f"RESULTS.md lacks the block {n!r}" for n in rendered.keys() - found.keys()]
    if problems:
        raise SystemExit("render_gpu: " + "; ".join(problems))
    doc_path.write_text(replace_blocks(doc, rendered, "render_gpu"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="exit 1 if RESULTS.md's blocks differ from what the JSON renders")
    mode.add_argument("--write", action="store_true", help="rewrite RESULTS.md's blocks in place")
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.check:
        problems = check(args.doc, args.results)
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("render_gpu: fix the JSON or run `python benchmarks/render_gpu.py --write`",
                  file=sys.stderr)
        return 1 if problems else 0
    if args.write:
        write(args.doc, args.results)
        return 0
    for name, text in render(args.results).items():
        print(f"<!-- render_gpu:{name} -->{body(text)}<!-- /render_gpu:{name} -->\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
