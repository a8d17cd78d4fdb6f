"""Write a run's full report directory: the outputs, the charts, the image grids and report.md."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import torch

from layerscan.engine import describe
from layerscan.errors import UserError
from layerscan.evaluate import TrialRecord
from layerscan.generate import iter_images, save_png
from layerscan.metrics import METRICS
from layerscan.proxy import evaluation_cost, report_section as proxy_report_section
from layerscan.report.outputs import (
    ROW_HEADER, cli_flags, format_row, quantization_config, trials_frame, write_recommendation,
)
from layerscan.report.plots import format_bytes, image_grid, pareto_chart, sensitivity_chart
from layerscan.runner import RunOutcome
from layerscan.session import Session
from layerscan.study import LOWER_IS_BETTER
from layerscan.workers import redact_url as _redact  # storage URLs without passwords

GRID_PROMPTS = 4  # image grids for the first few prompts keep the report readable


def render(session: Session, config) -> list[np.ndarray] | None:
    """Regenerate a configuration's images (deterministic seeds make them the evaluated ones).

    None when the configuration cannot produce images (it failed in the search too).
    """
    session.engine.apply(config)
    try:
        return [image for _, image, _ in iter_images(session.loaded, session.spec)]
    except (UserError, RuntimeError):
        return None


def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "—"
    return format(value, METRICS[metric].fmt)


def _ablation_table(records: list[TrialRecord], metrics: list[str], recommended) -> str:
    head = ["configuration"] + [f"{m} mean / worst" for m in metrics] + [
        "weights", "BF16 kept", "s/img", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        label = describe(r.config)
        if recommended is not None and r.config == recommended.config:
            label = f"**{label}** (recommended)"
        if r.config is None:
            status = "reference"
        else:
            status = r.status if r.status != "complete" else ("pass" if r.passes else "fail")
        if r.error:
            status += f": {r.error[:60]}"
        cells = [label] + [f"{_fmt(r.mean.get(m), m)} / {_fmt(r.worst.get(m), m)}" for m in metrics]
        cells += [format_bytes(r.total_weight_bytes), format_bytes(r.bf16_kept_bytes),
                  f"{r.seconds_per_image:.3f}" if r.seconds_per_image else "—", status]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(session: Session, outcome: RunOutcome, out_dir: Path) -> Path:
    study, loaded = session.study, session.loaded
    crit = study.criterion
    display = loaded.profile.display_name or study.slug
    if loaded.profile.name == "default" or study.name:
        display = study.name or study.slug
    bf16 = next((r for r in outcome.records if r.config is None), None)
    fp8_all = next((r for r in outcome.records if r.config == ()), None)
    rec = outcome.recommended

    row = format_row(display, study.model, loaded.profile, rec)
    (out_dir / "row.md").write_text(row, encoding="utf-8")
    write_recommendation(out_dir / "recommendation.json", study.model, rec, bf16, crit.describe(), {
        "strategy": study.strategy, "granularity": study.granularity,
        "evaluated_configurations": sum(r.config is not None for r in outcome.records),
        **_cost(session, outcome),
        "pareto_front": [quantization_config(r)["ignored_layers"] for r in outcome.pareto],
        "storage": _redact(outcome.storage),
    })
    trials_frame(outcome.records, session.metrics).to_csv(out_dir / "trials.csv", index=False)

    charts = []
    if sensitivity_chart(outcome.records, outcome.groups, crit, out_dir / "sensitivity.png"):
        charts.append(("Per-group sensitivity", "sensitivity.png"))
    if pareto_chart(outcome.records, outcome.pareto, rec, crit, out_dir / "pareto.png"):
        charts.append(("Quality vs BF16-kept weights", "pareto.png"))

    columns = [("BF16", session.baseline.images)]
    if fp8_all is not None and fp8_all.status != "failed":
        columns.append(("FP8 all", render(session, ())))
    if rec is not None and rec.config:
        columns.append(("recommended", render(session, rec.config)))
    columns = [(title, images) for title, images in columns if images is not None]
    session.engine.apply(None)
    grids = []
    for index, prompt, seed in session.spec.items()[:GRID_PROMPTS]:
        name = f"grid_{index:03d}.png"
        image_grid([(prompt, [(title, images[index]) for title, images in columns])],
                   out_dir / name)
        grids.append((prompt, seed, name))
    image_dir = out_dir / "images"
    image_dir.mkdir(exist_ok=True)
    for title, images in columns:
        for index, image in enumerate(images):
            save_png(image, image_dir / f"{title.replace(' ', '-').lower()}_{session.spec.image_name(index)}")

    text = _markdown(session, outcome, display, row, bf16, fp8_all, charts, grids)
    path = out_dir / "report.md"
    path.write_text(text, encoding="utf-8")
    return path


def _cost(session: Session, outcome: RunOutcome) -> dict:
    """Full evaluations in full-evaluation equivalents (a stopped one counts its prompts), and
    the proxy cost in the same unit when a strategy used proxies."""
    cost = evaluation_cost(outcome.records, len(session.spec.items()))
    data = {"full_evaluation_equivalents": round(cost["full_evaluations"], 4),
            "stopped_early": cost["stopped"]}
    proxy = outcome.notes.get("proxy", {}).get("cost")
    if proxy:
        data["proxy_cost_full_evaluations"] = round(proxy["full_evaluations"], 4)
        data["proxy_cost"] = proxy
    if "refine" in outcome.notes:
        data["refine"] = outcome.notes["refine"]
    return data


def _markdown(session, outcome, display, row, bf16, fp8_all, charts, grids) -> str:
    study, loaded, crit = session.study, session.loaded, session.study.criterion
    rec = outcome.recommended
    device = str(loaded.device)
    if loaded.device.type == "cuda":
        device += f" ({torch.cuda.get_device_name(loaded.device)})"
    evaluated = sum(r.config is not None for r in outcome.records)
    out = [f"# layerscan report: {display} (`{study.model}`)", ""]
    out += ["## Summary", "",
            f"- Model: `{study.model}` (content fingerprint `{loaded.fingerprint}`), profile "
            f"`{loaded.profile.name}`: {len(loaded.index.layers)} quantizable DiT layers, "
            f"{loaded.index.quantizable_params:,} of {loaded.index.total_params:,} DiT parameters "
            f"({100 * loaded.index.quantizable_params / loaded.index.total_params:.1f} %).",
            f"- Prompts: {len(session.spec.prompts)} × seeds {list(session.spec.seeds)}; "
            f"{session.spec.steps} steps, {session.spec.width}x{session.spec.height}, "
            f"guidance {session.spec.guidance:g}.",
            f"- Criterion: {crit.describe()} "
            f"{'(each picture against its prompt)' if crit.metric == 'accuracy' else 'against the BF16 baseline'}. Metrics: "
            f"{', '.join(session.metrics)}.",
            f"- Search: `{study.strategy}` over {len(outcome.groups)} groups at `{study.granularity}` "
            f"granularity; {evaluated} FP8 configurations evaluated "
            f"({outcome.new_evaluations} in the last invocation), stopped: {outcome.stop_reason}.",
            f"- Device: {device}, torch {torch.__version__}, {platform.machine()}; "
            f"activation scaling per {study.activation_scheme}; times are "
            f"{bf16.execution_mode if bf16 else 'eager'} mode (median seconds per image); DiT weights "
            f"{'resident in BF16 and FP8' if session.engine.residency == 'both' else 're-quantized on every switch (both copies do not fit)'}.",
            ""]
    out += ["## Recommendation", ""]
    if rec is None:
        out += ["No FP8 configuration met the criterion. Keep the model in BF16 or relax the "
                "criterion; the table below shows how close each configuration came.", ""]
    else:
        direction = "lower" if LOWER_IS_BETTER[crit.metric] else "higher"
        out += [f"**{describe(rec.config)}**: {crit.metric} mean {_fmt(rec.mean[crit.metric], crit.metric)}, "
                f"worst {_fmt(rec.worst[crit.metric], crit.metric)} ({direction} is better).", "",
                "```python", f'Omni(model="{study.model}",',
                f"     quantization_config={json.dumps(quantization_config(rec))})", "```", "",
                f"CLI: `{cli_flags(rec)}`", ""]
        if bf16 is not None:
            saved = bf16.total_weight_bytes - rec.total_weight_bytes
            out += [f"Weights: {format_bytes(rec.total_weight_bytes)} vs "
                    f"{format_bytes(bf16.total_weight_bytes)} in BF16 "
                    f"({format_bytes(saved)} saved, {100 * saved / bf16.total_weight_bytes:.1f} %).", ""]
    out += ["Supported-models table row (`row.md`):", "", ROW_HEADER + row, ""]
    out += ["## Ablation", "",
            "Every configuration evaluated, BF16 reference first. Weights are exact analytic "
            "bytes (FP8 weights + float32 scales, the rest BF16) over all components.", "",
            _ablation_table(outcome.records, session.metrics, rec), ""]
    if outcome.pareto:
        out += ["Pareto front (quality loss vs BF16-kept bytes): " +
                "; ".join(describe(r.config) for r in outcome.pareto), ""]
    cost = _cost(session, outcome)
    out += [f"Cost: {evaluated} FP8 configurations, "
            f"{cost['full_evaluation_equivalents']:.2f} full-evaluation equivalents "
            f"({cost['stopped_early']} stopped early once their prompts proved a failure)"
            + (f"; proxies {cost['proxy_cost_full_evaluations']:.3f}" if "proxy_cost_full_evaluations"
               in cost else "") + ".", ""]
    out += proxy_report_section(outcome.notes, outcome.records, crit)
    for title, name in charts:
        out += [f"## {title}", "", f"![{title}]({name})", ""]
    if grids:
        out += ["## Images", "", "BF16, FP8 everywhere and the recommended configuration, with "
                "absolute-difference heat maps against BF16.", ""]
        for prompt, seed, name in grids:
            out += [f"**{prompt}** (seed {seed})", "", f"![{prompt}]({name})", ""]
    out += ["## Files", "", "- `recommendation.json`: the config to paste, with its numbers",
            "- `row.md`: the supported-models table row", "- `trials.csv`: every configuration",
            "- `trials.jsonl`: the resumable record a rerun continues from",
            "- `images/`: the generated images"]
    if outcome.storage:
        out += [f"- Optuna study `{_redact(outcome.storage)}` (open with optuna-dashboard)"]
    return "\n".join(out) + "\n"
