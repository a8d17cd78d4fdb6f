"""The machine-readable outputs: recommendation.json, row.md and trials.csv.

The row format is the one of vLLM-Omni's FP8 supported-models table; ``ROW_HEADER`` and
``format_row`` are the only places that know it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from layerscan.evaluate import TrialRecord
from layerscan.layers import Profile

ROW_HEADER = ("| Model | HF Models | DiT FP8 | Text Encoder FP8 | VAE FP8 | `ignored_layers` |\n"
              "|-------|-----------|:-------:|:----------------:|:-------:|------------------|\n")
YES, NO = "✅", "—"


def quantization_config(record: TrialRecord) -> dict:
    return {"method": "fp8", "ignored_layers": list(record.config or ())}


def cli_flags(record: TrialRecord) -> str:
    flags = "--quantization fp8"
    if record.config:
        flags += f' --ignored-layers "{",".join(record.config)}"'
    return flags


def format_row(display_name: str, model_id: str, profile: Profile, record: TrialRecord | None) -> str:
    """One table row; ``None`` when nothing needs BF16, ``—`` when no configuration passed."""
    if record is None:
        ignored = NO
    elif not record.config:
        ignored = "None"
    else:
        ignored = ", ".join(f"`{p}`" for p in record.config)
    cells = [display_name, f"`{model_id}`", YES if profile.dit_fp8 else NO,
             YES if profile.text_encoder_fp8 else NO, YES if profile.vae_fp8 else NO, ignored]
    return "| " + " | ".join(cells) + " |\n"


def write_recommendation(path: Path, model: str, recommended: TrialRecord | None,
                         baseline: TrialRecord | None, criterion: str, extra: dict) -> dict:
    """recommendation.json: pasteable into ``Omni(model=..., quantization_config=...)``."""
    data: dict = {"model": model, "criterion": criterion}
    if recommended is None:
        data.update(quantization_config=None,
                    note="no FP8 configuration met the criterion; keep this model in BF16 "
                         "or relax the criterion")
    else:
        data.update(
            quantization_config=quantization_config(recommended),
            cli=cli_flags(recommended),
            metrics={"mean": recommended.mean, "worst": recommended.worst},
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


def trials_frame(records: list[TrialRecord], metrics: list[str]) -> pd.DataFrame:
    """One row per evaluated configuration, in evaluation order."""
    rows = []
    for r in records:
        row = {"configuration": r.label,
               "ignored_layers": "" if r.config is None else ",".join(r.config),
               "bf16": r.config is None, "status": r.status, "passes": r.passes}
        for m in metrics:
            row[f"{m}_mean"] = r.mean.get(m)
            row[f"{m}_worst"] = r.worst.get(m)
        row.update({f"weight_bytes_{k}": v for k, v in r.weight_bytes.items()})
        row.update(weight_bytes_total=r.total_weight_bytes, bf16_kept_bytes=r.bf16_kept_bytes,
                   peak_memory_bytes=r.peak_memory_bytes, seconds_per_image=r.seconds_per_image,
                   execution_mode=r.execution_mode, device=r.device, strategy=r.strategy,
                   error=r.error, finished_at=r.finished_at)
        rows.append(row)
    return pd.DataFrame(rows)
