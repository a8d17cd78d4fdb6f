"""The machine-readable outputs: recommendation.json, row.md and trials.csv.

``quantization_config`` is written the way the target takes it, in a form its pipeline loads
(``Profile.forms``).  The flat form ``{"method": "fp8", "ignored_layers": [...]}`` reaches every
quantization-aware component with one list; it is given when it selects exactly the intended
layers in every component.  Per component: the key of each pipeline component, ``None`` for a
component left in BF16 (or never quantized), otherwise ``{"method": "fp8", "ignored_layers":
[...]}``; only for pipelines that route such a map by component name (vLLM-Omni 0.30.0: Wan
2.2; elsewhere the map fails to load).  The lists are spelled for the target's matching
(``Profile.match``): full layer names under vLLM's default exact matching (a family pattern
such as ``img_mlp`` would skip nothing there), the shortest substring patterns under substring
matching.  ``layers`` states the intent layer by layer (every quantized layer's name as the
target builds it, FP8 or BF16), which ``layerscan check`` holds the target's own code to.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from layerscan.evaluate import TrialRecord
from layerscan.layers import LayerIndex, qualify, split_pattern
from layerscan.pipeline import LoadedPipeline
from layerscan.profiles import STORAGE

METHOD = "fp8"


def kept_by_component(config: tuple[str, ...], index: LayerIndex) -> dict[str, list[str] | None]:
    """Per quantized component: ``None`` when kept whole in BF16, else its patterns (unqualified)."""
    out: dict[str, list[str] | None] = {c: [] for c in index.components}
    skipped = index.skipped(config)
    for component in index.components:
        layers = index.of(component)
        if layers and all(l.name in skipped for l in layers):
            out[component] = None
    for pattern in config:
        component, inner = split_pattern(pattern)
        if out.get(component) is not None:
            out[component].append(inner)
    return out


def _selects(name: str, patterns: list[str], match: str) -> bool:
    return name in patterns if match == "exact" else any(p in name for p in patterns)


def ignored_list(component: str, patterns: list[str], index: LayerIndex) -> list[str]:
    """A component's ignored_layers as the target matches them."""
    if index.profile.match == "substring":
        return sorted(patterns)
    skipped = index.skipped([qualify(component, p) for p in patterns])
    return sorted(l.engine_name for l in index.of(component) if l.name in skipped)


def quantization_configs(record: TrialRecord, loaded: LoadedPipeline) -> dict:
    """``flat`` (None when not equivalent), ``per_component`` (None where the pipeline does not
    load that form) and ``paste``: the first form the pipeline loads that says it (None if none
    does)."""
    index = loaded.index
    kept = kept_by_component(record.config or (), index)
    per_component: dict[str, dict | None] | None = None
    if "per_component" in loaded.profile.forms:
        per_component = {}
        for attr in loaded.components:
            if attr not in kept or kept[attr] is None:
                per_component[attr] = None  # not quantized by this profile, or kept whole in BF16
                continue
            per_component[attr] = {"method": METHOD,
                                   "ignored_layers": ignored_list(attr, kept[attr], index)}
    flat = _flat_if_equivalent(kept, index)
    return {"per_component": per_component, "flat": flat,
            "paste": flat if flat is not None else per_component}


def intended_layers(record: TrialRecord | None, index: LayerIndex) -> dict[str, dict[str, list[str]]]:
    """Per W8A8 component, the target's names of the layers meant to run in FP8 and in BF16."""
    skipped = index.skipped(record.config or ()) if record is not None else set()
    out: dict[str, dict[str, list[str]]] = {}
    for component in index.components:
        if index.method(component) == STORAGE:
            continue
        layers = index.of(component)
        out[component] = {
            "fp8": sorted(l.engine_name for l in layers if l.name not in skipped),
            "bf16": sorted(l.engine_name for l in layers if l.name in skipped)}
    return out


def _flat_if_equivalent(kept: dict[str, list[str] | None], index: LayerIndex) -> dict | None:
    """The flat config when one list selects exactly the intended layers in every component.

    A storage component kept in BF16 cannot be expressed by a list (it has no layers to name).
    """
    match = index.profile.match
    union: list[str] = []
    intended: dict[str, set[str]] = {}
    for component, patterns in kept.items():
        layers = index.of(component)
        if patterns is None:  # kept whole: every layer named
            if index.method(component) == STORAGE:
                return None
            chosen = [l.engine_name for l in layers]
            intended[component] = {l.name for l in layers}
        else:
            chosen = ignored_list(component, patterns, index)
            intended[component] = index.skipped([qualify(component, p) for p in patterns])
        union += [n for n in chosen if n not in union]
    for component in kept:
        if index.method(component) == STORAGE:
            continue
        selected = {l.name for l in index.of(component) if _selects(l.engine_name, union, match)}
        if selected != intended[component]:
            return None
    return {"method": METHOD, "ignored_layers": sorted(union)}


def cli_flags(flat: dict | None) -> str | None:
    """Offline example scripts' flags (flat form only)."""
    if flat is None:
        return None
    flags = f"--quantization {METHOD}"
    if flat.get("ignored_layers"):
        flags += f' --ignored-layers "{",".join(flat["ignored_layers"])}"'
    return flags


def serve_flag(config: dict) -> str:
    """``vllm serve``'s flag for a diffusion model's quantization config, as one JSON string."""
    return f"--diffusion-quantization-config '{json.dumps(config, separators=(',', ':'))}'"


def paste_forms(model: str, recommended: TrialRecord | None, loaded: LoadedPipeline) -> dict:
    """What the recommendation says to the target: the release, the config in each form its
    pipeline loads, and the intended precision of every quantized layer (what ``layerscan
    check`` holds the release's code to)."""
    profile = loaded.profile
    data: dict = {"model": model, "target": profile.target.name, "architecture": profile.name,
                  "layer_match": profile.match, "forms": list(profile.forms)}
    if recommended is None:
        data.update(quantization_config=None,
                    note="no FP8 configuration met the criterion; keep this model in BF16 "
                         "or relax the criterion (report.md says which component sets the floor)")
        return data
    configs = quantization_configs(recommended, loaded)
    if configs["paste"] is None:
        data["note"] = (f"no config form that {profile.target.name} loads for this pipeline "
                        "selects exactly these layers")
    data.update(
        quantization_config=configs["paste"],
        quantization_config_per_component=configs["per_component"],
        quantization_config_flat=configs["flat"],
        ignored_layers_patterns=list(recommended.config or ()),
        cli=cli_flags(configs["flat"]),
        serve=serve_flag(configs["paste"]) if configs["paste"] is not None else None,
        layers=intended_layers(recommended, loaded.index),
    )
    return data


def write_recommendation(path: Path, model: str, recommended: TrialRecord | None,
                         baseline: TrialRecord | None, loaded: LoadedPipeline, extra: dict) -> dict:
    """recommendation.json: pasteable into ``Omni(model=..., quantization_config=...)``."""
    data = paste_forms(model, recommended, loaded)
    if recommended is not None:
        data.update(
            metrics={"mean": recommended.mean, "worst": recommended.worst, "ci95": recommended.ci},
            weight_bytes=recommended.weight_bytes,
            total_weight_bytes=recommended.total_weight_bytes,
            peak_memory_bytes=recommended.peak_memory_bytes,
            seconds_per_image=recommended.seconds_per_image,
            execution_mode=recommended.execution_mode,
            device=recommended.device,
        )
        if baseline is not None:
            data["bf16"] = {"total_weight_bytes": baseline.total_weight_bytes,
                            "peak_memory_bytes": baseline.peak_memory_bytes,
                            "seconds_per_image": baseline.seconds_per_image}
    data.update(extra)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return data


def trials_frame(records: list[TrialRecord], metrics: list[str], floor=None) -> pd.DataFrame:
    """One row per configuration, BF16 first, with each metric's 95 % interval and the floor."""
    rows = []
    for r in records:
        row = {"configuration": r.label,
               "ignored_layers": "" if r.config is None else ",".join(r.config),
               "bf16": r.config is None, "status": r.status, "passes": r.passes}
        for m in metrics:
            row[f"{m}_mean"] = r.mean.get(m)
            row[f"{m}_worst"] = r.worst.get(m)
            low, high = r.ci.get(m, (None, None))
            row[f"{m}_ci_low"], row[f"{m}_ci_high"] = low, high
            if floor is not None:
                row[f"{m}_floor_mean"] = floor.mean.get(m)
                row[f"{m}_floor_worst"] = floor.worst.get(m)
        row.update({f"weight_bytes_{k}": v for k, v in r.weight_bytes.items()})
        row.update(weight_bytes_total=r.total_weight_bytes, bf16_kept_bytes=r.bf16_kept_bytes,
                   peak_memory_bytes=r.peak_memory_bytes, seconds_per_image=r.seconds_per_image,
                   execution_mode=r.execution_mode, device=r.device, strategy=r.strategy,
                   error=r.error, finished_at=r.finished_at)
        rows.append(row)
    return pd.DataFrame(rows)
