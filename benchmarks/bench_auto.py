"""Few full runs: ``auto`` against ``greedy`` on tiny Qwen-Image models with planted sensitivity.

For every planted model and every search setting (family granularity, block granularity,
family with ``--refine``) both strategies run from an empty output directory (and ``auto``
from an empty proxy cache), on 2 prompts x 4 steps at 32x32 with the test criterion
(PSNR mean >= 37 dB, worst >= 35 dB).  Recorded per run: the answer, FP8 configurations
evaluated, full-evaluation equivalents (a stopped evaluation counts the prompts it generated),
proxy cost in full-evaluation equivalents, wall time of the search (BF16 reference row
included, pipeline loading and baseline not), and whether auto's answer equals greedy's.

A second table measures the proxies themselves: layer-local and end-to-end scores for every
group, against the ranking of greedy's full single-group evaluations (Spearman).

    python benchmarks/bench_auto.py                  # everything, ~30-60 min on 2 CPU cores
    python benchmarks/bench_auto.py --models block1  # one model
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

MODELS = {
    # name: (family, blocks, plant options, seed)
    "family": ("img_mlp", None, {}, 0),
    "family-seed1": ("img_mlp", None, {}, 1),
    "block1": ("img_mlp", [1], {"branch_gain": 32.0}, 0),
    "block3-seed2": ("img_mlp", [3], {"branch_gain": 32.0}, 2),
}
SETTINGS = {  # name: (granularity, refine)
    "family": ("family", False),
    "block": ("block", False),
    "family+refine": ("family", True),
}
PROMPTS = "a red circle on a white background\na blue square in the top left corner\n"


def _session(model_dir: Path, prompts: Path):
    from layerscan.session import open_session
    from layerscan.study import build_study, load_study

    values = load_study("tiny-qwen-image")
    values.update(model=str(model_dir), prompts=str(prompts), criterion_metric="psnr",
                  criterion_mean=37.0, criterion_worst=35.0)
    return open_session(build_study(values), "cpu", warn=lambda m: None)


def _clear_proxy_cache() -> None:
    from layerscan import proxy
    from layerscan.cache import default_cache_root

    proxy._MEMORY.clear()
    shutil.rmtree(default_cache_root() / "proxy", ignore_errors=True)


def run_one(session, work: Path, granularity: str, refine: bool, strategy: str) -> dict:
    from layerscan.proxy import evaluation_cost
    from layerscan.runner import run_study

    study = dataclasses.replace(session.study, granularity=granularity, refine=refine,
                                strategy=strategy)
    sess = dataclasses.replace(session, study=study)
    out = Path(tempfile.mkdtemp(prefix=f"{strategy}-{granularity}-", dir=work))
    if strategy == "auto":
        _clear_proxy_cache()
    start = time.perf_counter()
    outcome = run_study(sess, out, strategy)
    wall = time.perf_counter() - start
    cost = evaluation_cost(outcome.records, len(session.spec.items()))
    proxy = outcome.notes.get("proxy", {}).get("cost", {})
    rec = outcome.recommended
    return dict(strategy=strategy, granularity=granularity, refine=refine,
                answer=None if rec is None else list(rec.config),
                configurations=cost["configurations"], stopped=cost["stopped"],
                full_evaluations=round(cost["full_evaluations"], 3),
                proxy_full_evaluations=round(proxy.get("full_evaluations", 0.0), 4),
                proxy_calls=proxy.get("calls", 0.0), wall_s=round(wall, 1),
                records=outcome.records)


def proxy_quality(session, greedy_records, granularity: str) -> dict:
    """Both proxies for every group (measured here for the comparison only, not by auto)."""
    from layerscan.proxy import Proxies, correlations, ranking_rows

    _clear_proxy_cache()
    proxies = Proxies(session)
    proxies.layer_local()
    groups = session.loaded.index.groups(granularity)
    entries = [dict(pattern=g.pattern, layer_local=proxies.score(g.layers),
                    e2e=proxies.end_to_end([g.pattern])) for g in groups]
    rows = ranking_rows(entries, greedy_records, session.study.criterion)
    rho = correlations(rows)
    top = {attr: min((r for r in rows if attr in r.ranks), key=lambda r: r.ranks[attr]).pattern
           for attr in ("layer_local", "e2e", "full")}
    return dict(granularity=granularity, groups=len(groups), spearman_layer_local=rho["layer_local"],
                spearman_e2e=rho["e2e"], top=top,
                cost_full_evaluations=round(proxies.cost.calls / proxies.full_evaluation_calls, 4))


def markdown(results: list[dict], quality: list[dict], meta: dict) -> str:
    out = ["## Few full runs: auto vs greedy", "",
           f"`python benchmarks/bench_auto.py` on {meta['machine']}, {meta['date']}: tiny "
           "Qwen-Image pipelines (`layerscan.tiny.save_planted`, massive activation planted in "
           "`img_mlp` of every block, or of one block with `branch_gain=32` so that the block "
           "alone fails the criterion), 2 prompts × 4 steps, 32×32, true CFG (8 DiT calls per "
           "image, 16 per full evaluation), criterion PSNR mean ≥ 37 dB and worst ≥ 35 dB. Each run "
           "starts from an empty output directory; auto also from an empty proxy cache. "
           "*configs*: FP8 configurations evaluated; *full evals*: full-evaluation equivalents "
           "(an evaluation stopped early counts the prompts it generated); *proxy*: proxy cost in "
           "full-evaluation equivalents (DiT calls / 16); *auto/greedy*: (auto full evals + proxy) "
           "/ greedy full evals. Wall time: the search including the BF16 reference row (not "
           "loading or the cached baseline), on a 2-core CPU shared with other jobs: indicative only.", "",
           "| model | setting | strategy | answer | configs | full evals | proxy | wall s | "
           "same answer | auto/greedy |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        answer = ", ".join(f"`{p}`" for p in r["answer"]) if r["answer"] else "None"
        same = "" if r["strategy"] == "greedy" else ("yes" if r["match"] else "**NO**")
        ratio = "" if r["strategy"] == "greedy" else f"{r['ratio']:.2f}"
        out.append(f"| {r['model']} | {r['setting']} | {r['strategy']} | {answer} | "
                   f"{r['configurations']} ({r['stopped']} stopped) | {r['full_evaluations']:.2f} | "
                   f"{r['proxy_full_evaluations']:.3f} | {r['wall_s']:.1f} | {same} | {ratio} |")
    auto = [r for r in results if r["strategy"] == "auto"]
    if auto:
        out += ["", f"Auto matched greedy in {sum(r['match'] for r in auto)} of {len(auto)} runs; "
                f"its full evaluations plus proxy cost were at most "
                f"{max(r['ratio'] for r in auto):.2f} of greedy's (mean "
                f"{sum(r['ratio'] for r in auto) / len(auto):.2f})."]
    if quality:
        out += ["", "Proxy quality: both proxies measured for every group (for this table only; "
                "auto runs the end-to-end proxy only when the layer-local one does not separate "
                "its top candidates), against the ranking of greedy's full evaluations with each "
                "group alone in BF16.", "",
                "| model | granularity | groups | Spearman layer-local | Spearman end-to-end | "
                "top: layer-local / end-to-end / full | cost of both for all groups |",
                "|---|---|---|---|---|---|---|"]
        fmt = lambda v: "n/a" if v is None else f"{v:+.2f}"
        for q in quality:
            top = q["top"]
            out.append(f"| {q['model']} | {q['granularity']} | {q['groups']} | "
                       f"{fmt(q['spearman_layer_local'])} | {fmt(q['spearman_e2e'])} | "
                       f"`{top['layer_local']}` / `{top['e2e']}` / `{top['full']}` | "
                       f"{q['cost_full_evaluations']:.3f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--work", type=Path, help="work directory (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--markdown", type=Path, help="also write the markdown section here")
    args = parser.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-auto-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("LAYERSCAN_CACHE", str(work / "cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from layerscan.tiny import save_planted

    prompts = work / "prompts.txt"
    prompts.write_text(PROMPTS)
    results, quality = [], []
    for name in args.models:
        family, blocks, options, seed = MODELS[name]
        model_dir = work / "models" / name
        if not (model_dir / "model_index.json").is_file():
            save_planted("tiny-qwen-image", family, blocks, model_dir, seed=seed, **options)
        session = _session(model_dir, prompts)
        for setting in args.settings:
            granularity, refine = SETTINGS[setting]
            runs = {}
            for strategy in ("greedy", "auto"):
                r = run_one(session, work, granularity, refine, strategy)
                r.update(model=name, setting=setting)
                runs[strategy] = r
                print(f"{name:14} {setting:14} {strategy:6} answer={r['answer']} configs={r['configurations']} "
                      f"full={r['full_evaluations']:.2f} proxy={r['proxy_full_evaluations']:.3f} "
                      f"wall={r['wall_s']:.0f}s", flush=True)
            greedy, auto = runs["greedy"], runs["auto"]
            auto["match"] = auto["answer"] == greedy["answer"]
            auto["ratio"] = (auto["full_evaluations"] + auto["proxy_full_evaluations"]) / greedy["full_evaluations"]
            if not refine:
                q = proxy_quality(session, greedy["records"], granularity)
                q["model"] = name
                quality.append(q)
            for r in runs.values():
                r.pop("records")
                results.append(r)
    import platform

    import torch

    meta = dict(machine=f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}",
                date=time.strftime("%Y-%m-%d"))
    if args.json:
        args.json.write_text(json.dumps(dict(meta=meta, runs=results, proxy_quality=quality), indent=1))
    text = markdown(results, quality, meta)
    if args.markdown:
        args.markdown.write_text(text)
    print(text)
    return 0 if all(r.get("match", True) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
