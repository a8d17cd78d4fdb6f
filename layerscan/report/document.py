"""Write a run's full report directory: the outputs, the charts, the image grid (frame strips
for videos) and report.md.

Every number comes from the run's ledger and session; every image from the evaluations
themselves (``TrialLedger.images_of``): writing the report generates nothing.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from layerscan.clock import CLOCK, GENERATION, REPORT
from layerscan.configs import describe
from layerscan.evaluate import TrialRecord, setting_verdicts, worst_of, worst_setting
from layerscan.generate import FLOOR_VARIANTS, save_png
from layerscan.metrics import METRICS
from layerscan.report.ci_entry import UPSTREAM, build_entry, render_entry
from layerscan.report.outputs import quantization_configs, serve_flag, trials_frame, write_recommendation
from layerscan.report.plots import format_bytes, frame_strips, image_grid, pareto_chart, sensitivity_chart, strip_frames
from layerscan.report.proxy_section import report_section as proxy_report_section
from layerscan.report.table import HEADERS, column_keys, render_row, table_row
from layerscan.runner import RunOutcome
from layerscan.session import Session
from layerscan.stats import bootstrap_ci, paired_difference_ci, ratio_of_summed_medians_ci
from layerscan.workers import redact_url as _redact  # storage URLs without passwords

GRID_PROMPTS = 4  # image grid rows: the first few images keep the report readable


def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "—"
    return format(value, METRICS[metric].fmt)


def _with_ci(r: TrialRecord, metric: str) -> str:
    mean = _fmt(r.mean.get(metric), metric)
    ci = r.ci.get(metric)
    if ci is None or r.status != "complete" or ci[0] == ci[1]:
        return mean
    return f"{mean} [{_fmt(ci[0], metric)}, {_fmt(ci[1], metric)}]"


def _status(r: TrialRecord) -> str:
    if r.config is None:
        status = "reference"
    else:
        status = r.status if r.status != "complete" else ("pass" if r.passes else "fail")
    if r.error:
        status += f": {r.error[:60]}"
    return status


def _output_word(session: Session) -> str:
    """What one generation makes, for the report's wording: ``video`` or ``image``."""
    return "video" if session.loaded.video else "image"


def _ablation_table(records: list[TrialRecord], metrics: list[str], recommended, floor,
                    output: str = "image", worst_setting=None) -> str:
    """``worst_setting``: for a settings matrix, the setting each record does worst under."""
    head = ["configuration"] + [f"{m} mean [95 % CI] / worst" for m in metrics] + [
        "weights", "BF16 kept", "s/video" if output == "video" else "s/img", "status"] + \
        (["worst setting"] if worst_setting else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if floor is not None and floor.mean:
        cells = ["*noise floor* (BF16 vs BF16)"] + [
            f"{_fmt(floor.mean.get(m), m)} / {_fmt(floor.worst.get(m), m)}" for m in metrics]
        lines.append("| " + " | ".join(cells + ["", "", "", "floor"] + [""] * bool(worst_setting)) + " |")
    for r in records:
        label = describe(r.config)
        if recommended is not None and r.config == recommended.config:
            label = f"**{label}** (recommended)"
        cells = [label] + [f"{_with_ci(r, m)} / {_fmt(r.worst.get(m), m)}" for m in metrics]
        cells += [format_bytes(r.total_weight_bytes), format_bytes(r.bf16_kept_bytes),
                  f"{r.seconds_per_image:.3f}" if r.seconds_per_image else "—", _status(r)]
        if worst_setting:
            name = worst_setting(r)
            cells.append(f"`{name}`" if name else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _outputs_text(session: Session) -> str:
    """``8 images``, or ``8 videos of 81 frames`` (the count the pipeline returned)."""
    spec = session.spec
    count = len(spec.items())
    if not session.loaded.video:
        return f"{count} images"
    frames = sorted({session.baseline.images[k * spec.per_setting].shape[0]
                     for k in range(len(spec.settings) or 1)})
    return f"{count} videos of {' or '.join(map(str, frames))} frames"


def display_name(session: Session) -> str:
    study, profile = session.study, session.loaded.profile
    if study.name or profile.name == "default":
        return study.name or study.slug
    return profile.display_name or study.slug


def write_report(session: Session, outcome: RunOutcome, out_dir: Path) -> Path:
    with CLOCK.phase(REPORT):
        return _write_report(session, outcome, out_dir)


def _write_report(session: Session, outcome: RunOutcome, out_dir: Path) -> Path:
    study, loaded = session.study, session.loaded
    crit = session.criterion
    display = display_name(session)
    ledger = outcome.ledger
    bf16 = ledger.reference
    fp8_all = next((r for r in outcome.records if r.config == ()), None)
    rec = outcome.recommended

    row = table_row(display, study.model, loaded, rec, crit.describe())
    header = HEADERS[loaded.profile.target.header]
    row_line = render_row(row, column_keys(header.splitlines()[0], "header"))
    row_path = out_dir / "row.md"
    if outcome.final:
        row_path.write_text(row_line + "\n", encoding="utf-8")
    else:  # a provisional answer is never left where a docs table would pick it up
        row_path.unlink(missing_ok=True)
    grid, missing = _images(session, outcome, out_dir, fp8_all, rec)
    cost = _cost(outcome)
    ci_entry = quality_test_entry(session, rec, outcome.final)
    ci_entry["python"] = render_entry(ci_entry)
    speedup = speedup_over_bf16(bf16, rec)
    write_recommendation(out_dir / "recommendation.json", study.model, rec, bf16, loaded, {
        "final": outcome.final, "stop_reason": outcome.stop_reason,
        "not_final_because": outcome.why_not_final,
        "minimality": outcome.minimality.as_dict() if outcome.minimality else None,
        "prefer": ledger.prefer, "preference_note": ledger.preference_note,
        "speedup_vs_bf16": speedup, "ci_entry": ci_entry,
        "criterion": crit.describe(),
        "settings": [dict(name=n, **_setting_json(part)) for n, part
                     in zip(session.spec.setting_names(), session.spec.parts())] if session.spec.settings else None,
        "per_setting": setting_rows(session, [r for r in outcome.records if r.config is not None])
        if session.spec.settings else None,
        "noise_floor": session.floor.as_dict() if session.floor else None,
        "attribution": {c: _summary(ledger.recorded(config)) for c, config in outcome.attribution.items()},
        "strategy": study.strategy, "granularity": study.granularity,
        "evaluated_configurations": cost["configurations"],
        **{k: v for k, v in cost.items() if k != "configurations"},
        "pareto_front": [list(r.config or ()) for r in outcome.pareto],
        "storage": _redact(outcome.storage),
        "display_name": display, "table_row": row,
        "target_check": outcome.target_check,
        "timing": outcome.timing,
    })
    trials_frame(outcome.records, session.metrics, session.floor).to_csv(out_dir / "trials.csv", index=False)

    charts = []
    if sensitivity_chart(outcome.records, outcome.groups, crit, out_dir / "sensitivity.png"):
        charts.append(("Per-group sensitivity", "sensitivity.png"))
    if pareto_chart(outcome.records, outcome.pareto, rec, crit, out_dir / "pareto.png"):
        charts.append(("Quality vs BF16-kept weights", "pareto.png"))

    text = _markdown(session, outcome, display, header + row_line + "\n", fp8_all, charts, grid,
                     _grid_note(session, fp8_all, missing), ci_entry, speedup)
    path = out_dir / "report.md"
    path.write_text(text, encoding="utf-8")
    return path


def _setting_json(part) -> dict:
    return dict(steps=part.steps, height=part.height, width=part.width, guidance=part.guidance,
                image=part.image, pipeline_kwargs=dict(part.extra))


def quality_test_entry(session: Session, rec: TrialRecord | None, final: bool) -> dict:
    """The recommendation as an entry of vLLM-Omni's FP8 quality test (layerscan.report.ci_entry)."""
    loaded, spec, floor = session.loaded, session.spec, session.floor
    paste = quantization_configs(rec, loaded)["paste"] if rec is not None else None
    lpips_ci = rec.ci.get("lpips") if rec is not None else None
    scores = rec.per_prompt if rec is not None else []
    names = spec.setting_names()
    decisive = worst_setting(rec, session.criterion, names) if rec is not None else None
    if decisive is not None:
        # Upstream's entry has one setting: the matrix's worst for this configuration, with the
        # interval of that setting's outputs alone.
        number = names.index(decisive)
        spec = spec.parts()[number]
        scores = scores[number * spec.per_setting:(number + 1) * spec.per_setting]
        lpips = [p["lpips"] for p in scores if "lpips" in p]
        lpips_ci = list(bootstrap_ci(lpips)) if len(lpips) == len(scores) and lpips else None
    elif spec.settings:
        spec = spec.parts()[0]
    # Upstream scores one output, the first prompt with the first seed: index 0 here.
    first = scores[0].get("lpips") if scores else None
    frames = dict(spec.extra).get("num_frames")
    return build_entry(
        model=session.study.model, quantization=paste, video=loaded.video,
        edit=spec.image is not None, prompt=spec.prompts[0], seed=spec.seeds[0],
        steps=spec.steps, height=spec.height, width=spec.width, guidance=spec.guidance,
        num_frames=frames, lpips_ci_high=lpips_ci[1] if lpips_ci else None, lpips_first=first,
        lpips_floor=floor.worst.get("lpips") if floor else None,
        device_name=torch.cuda.get_device_name(loaded.device) if loaded.device.type == "cuda" else None,
        metric=session.criterion.metric, final=final)


def _summary(record: TrialRecord | None) -> dict | None:
    if record is None:
        return None
    return {"ignored_layers": list(record.config or ()), "status": record.status,
            "passes": record.passes, "mean": record.mean, "worst": record.worst, "ci95": record.ci}


def _images(session: Session, outcome: RunOutcome, out_dir: Path, fp8_all,
            rec) -> tuple[str | None, list[str]]:
    """The image grid (BF16, FP8 everywhere, recommended, with difference maps), or for a video
    pipeline the frame strips of the same clips, and the outputs behind it in ``images/`` (a
    video as one PNG of its frames side by side), taken from the evaluations.

    Nothing is generated for it: its rows are the first outputs every column has in this run's
    cache.  A stopped evaluation (FP8 everywhere, typically) made only the outputs that proved
    its failure, so the grid may have fewer rows than ``GRID_PROMPTS``, and a configuration
    another worker of a shared study evaluated has its outputs in that worker's cache, so its
    column is left out.  Returns the grid's file name (None: no grid) and the columns left out
    for that reason, which ``_grid_note`` names."""
    ledger, spec = outcome.ledger, session.spec
    columns = _grid_columns(fp8_all, rec)
    present = {title: ledger.outputs_on_disk(config) for title, config in columns}
    missing = [t for t, _ in columns if not present[t]]  # another worker's, or another cache's
    columns = [(t, c) for t, c in columns if present[t]]
    rows = [i for i in range(len(spec.items())) if all(i in present[t] for t, _ in columns)][:GRID_PROMPTS]
    if not rows or not columns:
        return None, missing
    found = {title: ledger.images_of(config, rows) for title, config in columns}
    image_dir = out_dir / "images"
    image_dir.mkdir(exist_ok=True)
    for title, _ in columns:
        for index in rows:
            save_png(found[title][index], image_dir / f"{title.replace(' ', '-').lower()}_{spec.image_name(index)}")
    items = spec.items()
    grid_rows = [(f"{items[i][1]} (seed {items[i][2]})", [(t, found[t][i]) for t, _ in columns])
                 for i in rows]
    if session.loaded.video:
        frame_strips(grid_rows, out_dir / "frames.png")
        return "frames.png", missing
    image_grid(grid_rows, out_dir / "images.png")
    return "images.png", missing


_TITLES = {"FP8 all": "FP8 everywhere", "recommended": "the recommended configuration"}


def _grid_columns(fp8_all, rec) -> list[tuple[str, tuple | None]]:
    """The grid's columns: BF16, FP8 everywhere (unless it failed to run), the recommendation."""
    columns = [("BF16", None)]
    if fp8_all is not None and fp8_all.status != "failed":
        columns.append(("FP8 all", ()))
    if rec is not None and rec.config:
        columns.append(("recommended", rec.config))
    return columns


def _grid_note(session: Session, fp8_all, missing: list[str]) -> str:
    """Why the grid shows less than it could: FP8 everywhere stopped early, or columns whose
    outputs are not in this run's cache (``missing``, as ``_images`` found them)."""
    output = _output_word(session)
    note = ""
    shown = min(GRID_PROMPTS, len(session.spec.items()))
    if fp8_all is not None and fp8_all.status == "stopped" and len(fp8_all.per_prompt) < shown:
        made = len(fp8_all.per_prompt)
        note += (f" FP8 everywhere was stopped after {made} {output}(s), once they proved its "
                 "failure; the report generates nothing of its own, so the grid shows "
                 f"{'that one' if made == 1 else 'those'}.")
    if missing:
        note += (f" Not shown: {' and '.join(_TITLES[t] for t in missing)}, whose {output}s are not in this run's cache "
                 "(evaluated by another worker of a shared study, or under another cache).")
    return note


def _cost(outcome: RunOutcome) -> dict:
    """Configurations and their cost in full-evaluation equivalents (a stopped one counts its
    prompts), and the proxy cost in the same unit when a strategy used proxies."""
    cost = outcome.ledger.cost()
    data = {"configurations": cost["configurations"],
            "full_evaluation_equivalents": round(cost["full_evaluations"], 4),
            "stopped_early": cost["stopped"]}
    proxy = outcome.notes.get("proxy", {}).get("cost")
    if proxy:
        data["proxy_cost_full_evaluations"] = round(proxy["full_evaluations"], 4)
        data["proxy_cost"] = proxy
    if "refine" in outcome.notes:
        data["refine"] = outcome.notes["refine"]
    return data


def _verdict(session: Session, record: TrialRecord | None) -> str:
    if record is None:
        return "not evaluated"
    if record.status == "failed":
        return f"failed ({record.error})"
    if record.status == "stopped":
        return (f"fails (proven after {len(record.per_prompt)}/{len(session.spec.items())} "
                f"{_output_word(session)}s)")
    return "passes" if record.passes else "fails"


def _attribution(session: Session, outcome: RunOutcome) -> list[str]:
    crit, ledger, metric = session.criterion, outcome.ledger, session.criterion.metric
    index = session.loaded.index
    lines = ["## What FP8 costs, component by component", "",
             f"Each quantized component alone in FP8, every other one in BF16 ({crit.describe()}).", "",
             f"| component | quantized as | {metric} mean [95 % CI] | worst | verdict |", "|---|---|---|---|---|"]
    if session.floor and metric in session.floor.mean:
        lines.append(f"| *BF16 noise floor* | — | {_fmt(session.floor.mean[metric], metric)} | "
                     f"{_fmt(session.floor.worst[metric], metric)} | — |")
    rows = []
    for component, config in outcome.attribution.items():
        record = ledger.recorded(config)
        rows.append((component, record))
        method = "W8A8" if index.method(component) == "w8a8" else "FP8 weight storage"
        title = session.loaded.profile.component(component).title
        lines.append(f"| {title} (`{component}`) | {method} | "
                     f"{_with_ci(record, metric) if record else '—'} | "
                     f"{_fmt(record.worst.get(metric), metric) if record else '—'} | {_verdict(session, record)} |")
    fp8_all = ledger.recorded(())
    if len(rows) > 1 and fp8_all is not None:
        lines.append(f"| all of them | | {_with_ci(fp8_all, metric)} | {_fmt(fp8_all.worst.get(metric), metric)} "
                     f"| {_verdict(session, fp8_all)} |")
    lines.append("")
    if outcome.recommended is None:
        lines += [_floor_message(session, outcome, rows), ""]
    return lines


def _minimality(session: Session, outcome: RunOutcome) -> list[str]:
    """Each group the recommendation keeps in BF16, and the evidence that it must."""
    rec, proof, metric = outcome.recommended, outcome.minimality, session.criterion.metric
    if not rec.config:
        return []
    if proof is None or proof.config != rec.config:
        return ["**Not proven minimal**: the run ended before each kept group was returned to FP8 "
                "on its own; rerun the same command to prove it.", ""]
    lines = []
    if proof.dropped:
        lines += [f"The search's answer also kept {', '.join(f'`{g}`' for g in proof.dropped)}; "
                  "without it the configuration still passes, so it is not kept.", ""]
    ledger = outcome.ledger
    served = "" if ledger.speed_served else f" ({rec.execution_mode} on {rec.device}: not as served)"
    lines += ["Each kept group with it returned to FP8 (everything else as recommended): a group "
              f"is kept because the configuration then fails, or because it is worse on the run's "
              f"objective ({ledger.prefer}). What keeping it costs is the difference to that "
              "configuration.", "",
              f"| kept group | returned to FP8 | {metric} mean [95 % CI] | verdict | keeping it costs: "
              f"BF16 bytes | ms per {_output_word(session)}{served} |", "|---|---|---|---|---|---|"]
    reasons = [(g, w, "necessary") for g, w in proof.necessary.items()] + \
        [(g, w, "objective") for g, w in proof.kept_for_objective.items()]
    for group, without, reason in reasons:
        record = ledger.recorded(without)
        verdict = _verdict(session, record) if reason == "necessary" else \
            f"passes, but worse on {ledger.prefer}: kept for it"
        lines.append(f"| `{group}` | {describe(without)} | {_with_ci(record, metric)} | {verdict} | "
                     f"{format_bytes(rec.bf16_kept_bytes - record.bf16_kept_bytes)} | "
                     f"{_ms_difference(rec, record)} |")
    for group in proof.unproven:
        lines.append(f"| `{group}` | not evaluated: the {proof.stop_reason} ended first | — | "
                     "**not proven necessary** | — | — |")
    return lines + [""]


def _ms_difference(rec: TrialRecord, other: TrialRecord) -> str:
    if rec.seconds_per_image is None or other.seconds_per_image is None:
        return "—"
    return f"{1000 * (rec.seconds_per_image - other.seconds_per_image):+.1f}"


def speedup_over_bf16(reference: TrialRecord, rec: TrialRecord | None) -> dict | None:
    """BF16's median seconds per image over the recommendation's, with a 95 % bootstrap
    interval over the images timed (compilation left out).  Under a settings matrix: the sum of
    each setting's medians (one prompt through every setting), each setting resampled on its own,
    over the settings both have timed."""
    if rec is None or not reference.image_seconds or not rec.image_seconds:
        return None
    bf16, fp8 = reference.seconds_by_setting(), rec.seconds_by_setting()
    settings = sorted(set(bf16) & set(fp8))
    if not settings:
        return None
    ratio, low, high = ratio_of_summed_medians_ci([bf16[k] for k in settings], [fp8[k] for k in settings])
    return {"median_ratio": ratio, "ci95": [low, high],
            "bf16_images": sum(len(bf16[k]) for k in settings),
            "fp8_images": sum(len(fp8[k]) for k in settings), "execution_mode": rec.execution_mode,
            "device": rec.device}


def _floor_message(session: Session, outcome: RunOutcome, rows) -> str:
    """Why nothing passed: the component that sets the floor and what would lift it."""
    crit, metric = session.criterion, session.criterion.metric
    floor = session.floor
    if floor and metric in floor.mean and not crit.meets(floor.mean[metric], crit.mean_limit):
        return (f"**No configuration can pass reliably**: BF16 against itself under numerically "
                f"equivalent changes already reaches {metric} {_fmt(floor.mean[metric], metric)}, "
                f"beyond the threshold {_fmt(crit.mean_limit, metric)}. Relax the criterion to at "
                f"least the floor (e.g. `--criterion-mean \"floor {'+' if crit.lower_is_better else '-'} "
                f"{'0.05' if crit.lower_is_better else '3'}\"`).")
    failing = [(c, r) for c, r in rows if r is not None and not r.passes]
    if failing:
        def loss(item):
            record = item[1]
            return crit.loss(record.mean[metric]) if metric in record.mean else float("inf")

        worst_component, record = max(failing, key=loss)
        if len(rows) == 1:
            return (f"**No configuration met the criterion.** FP8 in the {worst_component} misses it "
                    f"({metric} {_fmt(record.mean.get(metric), metric)}); even the configurations that "
                    "keep the most in BF16 did not reach it (table below). Keep the model in BF16 "
                    "or relax the criterion.")
        return (f"**No configuration met the criterion. The `{worst_component}` sets the floor**: "
                f"FP8 in it alone, everything else in BF16, gives {metric} "
                f"{_fmt(record.mean.get(metric), metric)} against the threshold "
                f"{_fmt(crit.mean_limit, metric)}. Keeping `{worst_component}` layers in BF16 lifts "
                f"it: the search tried its groups (table below); keep `{worst_component}` whole in "
                f"BF16 (`\"{worst_component}\": None` in the per-component config) or relax the criterion.")
    return ("**No configuration met the criterion**, although each component alone in FP8 does: "
            "their errors add up. Keep more in BF16 (a finer --granularity or --refine) or relax "
            "the criterion.")


def _comparisons(session: Session, outcome: RunOutcome) -> list[str]:
    """Which differences on the criterion metric the prompts and seeds can resolve."""
    metric, ledger = session.criterion.metric, outcome.ledger
    rec = outcome.recommended
    pairs = []
    fp8_all = ledger.recorded(())
    if rec is not None and rec.config and fp8_all is not None and fp8_all.status == "complete":
        pairs.append(("the recommendation", rec, "FP8 everywhere", fp8_all))
    floor = session.floor
    if floor is not None and rec is not None:
        for variant, data in floor.variants.items():
            if variant not in floor.identical:  # the first variant that measured something
                pairs.append(("the recommendation", rec, f"BF16 with {variant}", data))
                break
    lines = []
    for name_a, a, name_b, b in pairs:
        va = [p[metric] for p in a.per_prompt]
        vb = [p[metric] for p in (b["per_prompt"] if isinstance(b, dict) else b.per_prompt)]
        if len(va) != len(vb) or len(va) < 2:
            continue
        low, high = paired_difference_ci(va, vb)
        fmt = METRICS[metric].fmt
        if low <= 0 <= high:
            lines.append(f"- {name_a} and {name_b} **cannot be told apart** on {metric}: the 95 % "
                         f"interval of their paired difference is [{low:{fmt}}, {high:{fmt}}].")
        else:
            lines.append(f"- {name_a} differs from {name_b} on {metric} by "
                         f"[{low:{fmt}}, {high:{fmt}}] (95 % interval of the paired difference).")
    return lines


def _settings_text(spec) -> str:
    """Every setting of ``spec`` as the report names them, in order."""
    return "; ".join(_setting_text(part, name) for part, name in zip(spec.parts(), spec.setting_names()))


def _setting_text(part, name: str) -> str:
    """One setting as the report names it, e.g. "`short`: 8 steps, 64x64, 9 frames, guidance 4"."""
    frames = dict(part.extra).get("num_frames")
    return ((f"`{name}`: " if name else "") + f"{part.steps} steps, {part.width}x{part.height}"
            + (f", {frames} frames" if frames else "") + f", guidance {part.guidance:g}")


def setting_rows(session: Session, records: list[TrialRecord]) -> list[dict]:
    """Each record's verdict under each setting of the matrix (recommendation.json's)."""
    crit, names = session.criterion, session.spec.setting_names()
    rows = []
    for r in records:
        if r.per_prompt and crit.metric in r.per_prompt[0]:
            verdicts = setting_verdicts(r, crit, names)
            rows.append({"configuration": describe(r.config), "ignored_layers": list(r.config or ()),
                         "worst_setting": worst_of(verdicts, crit), "settings": verdicts})
    return rows


def _settings_section(session: Session, outcome: RunOutcome) -> list[str]:
    """With a settings matrix: the criterion under each setting, for FP8 everywhere and the
    recommendation, and which setting decides (the worst)."""
    spec, crit = session.spec, session.criterion
    if not spec.settings:
        return []
    metric, names = crit.metric, spec.setting_names()
    shown = [("FP8 everywhere", outcome.ledger.recorded(()))]
    if outcome.recommended is not None and outcome.recommended.config:
        shown.append((f"recommended: {describe(outcome.recommended.config)}", outcome.recommended))
    rows = [(title, r) for title, r in shown
            if r is not None and r.status != "failed" and metric in (r.per_prompt or [{}])[0]]
    out = ["## Under each generation setting", "",
           f"A configuration passes only if it passes under every setting; each setting is judged "
           f"on its own {spec.per_setting} {_output_word(session)}s "
           f"({metric} mean, pessimistic bound / worst). Settings, cheapest first (early "
           "stopping tries the cheapest first): " + _settings_text(spec) + ".", ""]
    if crit.setting_floors and (crit.mean.relative or crit.worst.relative):
        op = "<=" if crit.lower_is_better else ">="
        out += ["Floor-relative thresholds, resolved against each setting's own noise floor: " + "; ".join(
            f"`{name}` mean {op} {_fmt(crit.for_setting(k).mean_limit, metric)}, worst {op} "
            f"{_fmt(crit.for_setting(k).worst_limit, metric)}" for k, name in enumerate(names)) + ".", ""]
    if not rows:
        return out
    out += ["| configuration | " + " | ".join(f"`{n}`" for n in names) + " | worst setting |",
            "|---|" + "---|" * (len(names) + 1)]
    for title, record in rows:
        cells, verdicts = [], setting_verdicts(record, crit, names)
        for v in verdicts:
            verdict = "passes" if v["passes"] else "**fails**"
            if v["outputs"] < spec.per_setting:  # stopped early, within this setting
                verdict = f"**fails** (proven after {v['outputs']}/{spec.per_setting})"
            cells.append(f"{_fmt(v['mean'], metric)} ({_fmt(v['bound'], metric)}) / "
                         f"{_fmt(v['worst'], metric)} {verdict}")
        cells += ["not generated (a failure was proven before it)"] * (len(names) - len(cells))
        out.append(f"| {title} | " + " | ".join(cells) + f" | `{worst_of(verdicts, crit)}` |")
    return out + [""]


def _timing_section(timing: dict | None, output: str) -> list[str]:
    """Where this invocation's time went before the report, phase by phase (layerscan.clock)."""
    if not timing or timing["wall"] <= 0:
        return []
    wall = timing["wall"]
    rows = [f"| {name} | {p['seconds']:.1f} | {100 * p['seconds'] / wall:.0f} % | "
            f"{'' if p['count'] is None else p['count']} |" for name, p in timing["phases"].items()]
    generated = sum(timing["phases"].get(n, {}).get("seconds", 0.0) for n in GENERATION)
    rate = (f", {timing['outputs_generated'] / generated:.3g} {output}s per second of generation"
            if generated > 0 else "")
    return ["## Where the time went", "",
            f"This invocation (this process; the helper processes of `--workers` and `--gpus` "
            f"keep their own clocks), up to writing this report: {wall:.1f} s, {timing['outputs_generated']} "
            f"{output}s generated{rate}; generating them took {100 * timing['generation_share']:.0f} % "
            "of the time. A phase's seconds leave out the phases inside it (a precision switch "
            "during the proxies counts as switching).", "",
            "| phase | s | share | times |", "|---|---|---|---|", *rows, ""]


def _check_line(check: dict | None) -> str:
    """Whether the target release's own code agrees with the recommendation (``layerscan check``)."""
    if check is None:
        return "Not checked against the target's code (run `layerscan check` on this report)."
    return check["line"]


def _markdown(session, outcome, display, row_table, fp8_all, charts, grid, grid_note, ci_entry,
              speedup) -> str:
    study, loaded, crit = session.study, session.loaded, session.criterion
    rec, ledger = outcome.recommended, outcome.ledger
    spec, names = session.spec, session.spec.setting_names()
    bf16 = ledger.reference
    profile = loaded.profile
    device = str(loaded.device)
    if loaded.device.type == "cuda":
        device += f" ({torch.cuda.get_device_name(loaded.device)})"
    cost = _cost(outcome)
    output = _output_word(session)
    index = loaded.index
    components = ", ".join(
        f"{profile.component(c).title} ({len(index.of(c))} layers, "
        f"{'W8A8' if index.method(c) == 'w8a8' else 'weight storage'})" for c in index.components)
    out = [f"# layerscan report: {display} (`{study.model}`)", ""]
    if not outcome.final:
        out += [f"> **Not final:** {outcome.why_not_final}. The recommendation below is the best "
                "on record so far, not the search's answer; no table row was written.", ""]
    out += ["## Summary", "",
            f"- Model: `{study.model}` (content fingerprint `{loaded.fingerprint}`), profile "
            f"`{profile.name}` for `{profile.target.name}`: quantized {components}; "
            f"`ignored_layers` matched {profile.match}ly by the target.",
            f"- Prompts: {len(spec.prompts)} × seeds {list(spec.seeds)}"
            + (f" × {len(spec.settings)} settings" if spec.settings else "")
            + f" = {_outputs_text(session)}; " + _settings_text(spec) + ".",
            f"- Criterion: {crit.describe()} "
            f"{'(each picture against its prompt)' if crit.metric == 'accuracy' else 'against the BF16 baseline'}; "
            "a configuration passes when the pessimistic end of its mean's one-sided 95 % bootstrap "
            f"interval meets the mean threshold. Metrics: {', '.join(session.metrics)}.",
            f"- Search: `{study.strategy}` over {len(outcome.groups)} groups at `{study.granularity}` "
            f"granularity; {cost['configurations']} FP8 configurations on record "
            f"({outcome.evaluated_now_text()} in this invocation), stopped: {outcome.stop_reason}.",
            f"- Device: {device}, torch {torch.__version__}, {platform.machine()}; "
            f"activation scaling per {study.activation_scheme}; times are "
            f"{bf16.execution_mode} mode (median seconds per {output}; BF16's measured while the "
            "baseline was generated); weights "
            f"{'resident in BF16 and FP8' if session.engine.residency == 'both' else 're-quantized on every switch (both copies do not fit)'}.",
            ""]
    out += _attribution(session, outcome)
    out += ["## Recommendation", ""]
    if rec is None:
        out += ["No FP8 configuration met the criterion (see above for which component sets the "
                "floor); the table below shows how close each configuration came.", ""]
    else:
        configs = quantization_configs(rec, loaded)
        direction = "lower" if crit.lower_is_better else "higher"
        out += [f"**{describe(rec.config)}**: {crit.metric} mean {_with_ci(rec, crit.metric)}, "
                f"worst {_fmt(rec.worst[crit.metric], crit.metric)} ({direction} is better).", ""]
        ledger = outcome.ledger
        out += [f"Chosen for {ledger.prefer} among the passing configurations"
                + (f" ({ledger.preference_note})." if ledger.preference_note else ".")]
        if speedup:
            low, high = speedup["ci95"]
            out += [f"Speed-up over BF16: {speedup['median_ratio']:.2f}x [95 % CI {low:.2f}, {high:.2f}] "
                    f"({speedup['execution_mode']}, {device}; median seconds per {output} over "
                    f"{speedup['bf16_images']} BF16 and {speedup['fp8_images']} FP8 {output}s)"
                    + ("" if ledger.speed_served else "; not as served: eager or CPU FP8 runs "
                       "without FP8 kernels") + "."]
        out += [""]
        out += _minimality(session, outcome)
        target = profile.target.name
        if configs["paste"] is None:
            out += [f"No config form that `{target}` loads for this pipeline selects exactly these "
                    "layers, so there is nothing to paste.", ""]
        else:
            out += [f"For `{target}`:", "", "```python", f'Omni(model="{study.model}",',
                    f"     quantization_config={json.dumps(configs['paste'])})", "```", "",
                    f"Serving: `{serve_flag(configs['paste'])}`", ""]
        if configs["per_component"] is not None and configs["paste"] is configs["flat"]:
            out += ["The same per component (this pipeline routes a per-component config by "
                    f"component name): `{json.dumps(configs['per_component'])}`", ""]
        elif configs["per_component"] is None:
            out += [f"Only the flat form is given: `{target}`'s pipeline for this model matches a "
                    "per-component map's keys against layer prefixes, and such a map fails to load.", ""]
        elif configs["flat"] is None:
            out += ["The flat form `{\"method\": \"fp8\", \"ignored_layers\": [...]}` would not select "
                    "the same layers in every component here, so only the per-component form is given.", ""]
        out += [_check_line(outcome.target_check), ""]
        if profile.match == "exact" and rec.config:
            out += [f"The lists name every layer: vLLM matches `ignored_layers` exactly by default, so "
                    f"the compact patterns ({', '.join(f'`{p}`' for p in rec.config)}) would skip "
                    "nothing there; they are what the table row shows.", ""]
        saved = bf16.total_weight_bytes - rec.total_weight_bytes
        out += [f"Weights: {format_bytes(rec.total_weight_bytes)} vs "
                f"{format_bytes(bf16.total_weight_bytes)} in BF16 "
                f"({format_bytes(saved)} saved, {100 * saved / bf16.total_weight_bytes:.1f} %).", ""]
        out += _comparisons(session, outcome) + [""]
    out += _settings_section(session, outcome)
    if outcome.final:
        out += ["Supported-models table row (`row.md`; `layerscan table --update FILE` writes it "
                "into any table with either header):", "", row_table, ""]
    else:
        out += ["Supported-models table row, **not written to `row.md`** (the answer is not "
                "final):", "", row_table, ""]
    out += ["Entry for vLLM-Omni's FP8 quality test (`QUALITY_CONFIGS` in "
            f"[`{UPSTREAM['path']}`](https://github.com/{UPSTREAM['repository']}/blob/{UPSTREAM['commit']}/"
            f"{UPSTREAM['path']}), form read at commit `{UPSTREAM['commit'][:12]}`; `layerscan table "
            "--ci-entries` merges reports from several GPUs into per-GPU thresholds):", "",
            "```python", ci_entry["python"], "```", ""]
    if session.floor and session.floor.variants:
        out += ["## Noise floor", "",
                "BF16 against the BF16 baseline under numerically equivalent changes, same prompts "
                "and seeds. Distances this small are not FP8's doing.", "",
                "| variant | " + " | ".join(f"{m} mean / worst" for m in session.metrics) + " |",
                "|---|" + "---|" * len(session.metrics)]
        identical = session.floor.identical
        for variant, data in session.floor.variants.items():
            flag = " **(bit-identical to the baseline: measured nothing, not counted)**" \
                if variant in identical else ""
            out.append(f"| {variant}: {FLOOR_VARIANTS[variant]}{flag} | " + " | ".join(
                f"{_fmt(data['mean'][m], m)} / {_fmt(data['worst'][m], m)}" for m in session.metrics) + " |")
        out.append("")
        if identical and len(identical) == len(session.floor.variants):
            out += ["**No variant changed any output here**: the floor is that of identical "
                    "outputs, and a floor-relative threshold is as strict as it can be.", ""]
    out += ["## Ablation", "",
            "Every configuration on record, BF16 reference first. Weights are exact analytic "
            "bytes (FP8 weights + float32 scales, the rest BF16) over all components.", "",
            _ablation_table(outcome.records, session.metrics, rec, session.floor, output,
                            (lambda r: r.config is not None and worst_setting(r, crit, names))
                            if spec.settings else None), ""]
    if outcome.pareto:
        out += ["Pareto front (quality loss vs BF16-kept bytes): " +
                "; ".join(describe(r.config) for r in outcome.pareto), ""]
    out += [f"Cost: {cost['configurations']} FP8 configurations, "
            f"{cost['full_evaluation_equivalents']:.2f} full-evaluation equivalents "
            f"({cost['stopped_early']} stopped early once their prompts proved a failure)"
            + (f"; proxies {cost['proxy_cost_full_evaluations']:.3f}" if "proxy_cost_full_evaluations"
               in cost else "") + ".", ""]
    out += proxy_report_section(outcome.notes, outcome.records, crit)
    out += _timing_section(outcome.timing, output)
    for title, name in charts:
        out += [f"## {title}", "", f"![{title}]({name})", ""]
    if grid and loaded.video:
        frames = session.baseline.images[0].shape[0]
        out += ["## Videos", "", "BF16, FP8 everywhere and the recommended configuration as rows of "
                f"frames (frames {', '.join(map(str, strip_frames(frames)))} of {frames}), each "
                "FP8 row followed by its absolute-difference heat maps against BF16. Every frame is "
                "scored: the metrics are means over all frames, and `temporal` is the flicker FP8 "
                "adds from frame to frame." + grid_note, "", f"![frames]({grid})", ""]
    elif grid:
        out += ["## Images", "", "BF16, FP8 everywhere and the recommended configuration, with "
                "absolute-difference heat maps against BF16." + grid_note, "",
                f"![images]({grid})", ""]
    out += ["## Files", "", "- `recommendation.json`: the config to paste, with its numbers",
            "- `row.md`: the supported-models table row", "- `trials.csv`: every configuration",
            "- `trials.jsonl`: the resumable record a rerun continues from",
            "- `images/`: the clips in the figure, each one PNG of all its frames side by side"
            if loaded.video else "- `images/`: the images in the grid"]
    if outcome.storage:
        out += [f"- Optuna study `{_redact(outcome.storage)}` (open with optuna-dashboard)"]
    return "\n".join(out) + "\n"
