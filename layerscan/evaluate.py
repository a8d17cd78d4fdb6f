"""Evaluate one configuration: switch the engine, generate every prompt, score, measure.

A configuration that crashes, runs out of memory or produces NaN comes back as a failed
``TrialRecord`` rather than an exception, so a search can go on.
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from layerscan.configs import Ignored, describe, normalize
from layerscan.engine import Fp8Engine
from layerscan.errors import NonFiniteOutput
from layerscan.generate import (
    Baseline, GenerationSpec, compile_free_seconds, iter_images, save_png, seconds_per_output,
    typical_seconds,
)
from layerscan.metrics import METRICS, Scorer, summarize, worst_value
from layerscan.stats import bootstrap_ci, one_sided_bound
from layerscan.study import Criterion

# Called after each prompt with the per-prompt scores so far; returning True stops the
# evaluation early (the record is then marked "stopped").
StopRule = Callable[[list[dict[str, float]]], bool]


@dataclass
class TrialRecord:
    """One evaluated configuration; what trials.csv and the report are made of."""

    config: Ignored
    status: str  # "complete", "failed" or "stopped"
    mean: dict[str, float] = field(default_factory=dict)
    worst: dict[str, float] = field(default_factory=dict)
    per_prompt: list[dict[str, float]] = field(default_factory=list)  # one entry per image
    ci: dict[str, list[float]] = field(default_factory=dict)  # 95 % bootstrap interval of each mean
    passes: bool | None = None
    weight_bytes: dict[str, int] = field(default_factory=dict)
    bf16_kept_bytes: int = 0
    peak_memory_bytes: int | None = None
    # Median of image_seconds (when any); under a settings matrix the mean of each setting's
    # median, so outputs of different sizes are never pooled into one median.
    seconds_per_image: float | None = None
    image_seconds: list[float] = field(default_factory=list)  # each image that compiled nothing
    image_settings: list[int] = field(default_factory=list)  # the setting of each (empty: all the first)
    execution_mode: str = "eager"
    residency: str = "both"  # DiT weights on the device: "both" copies or "requantize" on switch
    device: str = "cpu"
    error: str | None = None
    strategy: str = ""
    finished_at: str = ""

    @property
    def label(self) -> str:
        return describe(self.config)

    def seconds_by_setting(self) -> dict[int, list[float]]:
        """The timed images' seconds, setting by setting."""
        settings = self.image_settings or [0] * len(self.image_seconds)
        out: dict[int, list[float]] = {}
        for setting, seconds in zip(settings, self.image_seconds):
            out.setdefault(setting, []).append(seconds)
        return out

    @property
    def total_weight_bytes(self) -> int:
        return sum(self.weight_bytes.values())

    def to_dict(self) -> dict:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["config"] = None if self.config is None else list(self.config)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "TrialRecord":
        data = dict(data)
        data["config"] = normalize(data["config"])
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def judge(record: TrialRecord, criterion: Criterion) -> TrialRecord:
    """Set ``passes`` under ``criterion``; records are re-judged when a rerun changes it.

    The mean is judged by the pessimistic end of its one-sided 95 % bootstrap interval
    (``Criterion``'s pass rule), which is never better than the mean itself, so a failure the
    mean proves early (``failure_proven``) is a failure under the interval too.  A stopped
    record never passes: its prompts were cut short, and only a proven failure stops.
    """
    metric = criterion.metric
    if record.status != "complete" or metric not in record.mean:
        record.passes = False
        return record
    if not record.per_prompt:  # a summary without its images' scores: judged as one setting
        record.passes = bool(criterion.passes(record.mean[metric], record.worst[metric]))
        return record
    record.passes = all(verdict["passes"] for verdict in setting_verdicts(record, criterion))
    return record


def setting_verdicts(record: TrialRecord, criterion: Criterion,
                     names: list[str] | None = None) -> list[dict]:
    """The pass rule under each setting of a matrix (one entry without one): the setting's name
    (from ``names``), the mean, its pessimistic bound, the worst output and whether it passes."""
    metric, verdicts = criterion.metric, []
    values = [p.get(metric, math.nan) for p in record.per_prompt]
    for number, part in enumerate(criterion.slices(len(values))):
        chosen, mine = [values[i] for i in part], criterion.for_setting(number)
        bound, worst, passes = _pass_rule(chosen, mine)
        verdicts.append(dict(setting=names[number] if names else "", mean=float(np.mean(chosen)),
                             bound=bound, worst=worst, outputs=len(chosen),
                             mean_limit=mine.mean_limit, worst_limit=mine.worst_limit, passes=passes))
    return verdicts


def _pass_rule(values: list[float], criterion: Criterion) -> tuple[float, float, bool]:
    """The pass rule on one setting's scores: the mean's pessimistic bound, the worst output, and
    whether both meet ``criterion``'s limits."""
    bound = one_sided_bound(values, criterion.lower_is_better)
    worst = worst_value(criterion.metric, values)
    return bound, worst, bool(criterion.passes(bound, worst))


def worst_setting(record: TrialRecord, criterion: Criterion, names: list[str]) -> str | None:
    """The setting under which ``record`` does worst: a failing one before a passing one, then
    the largest loss of the mean.  None without a matrix or without scores."""
    if len(names) < 2 or not record.per_prompt or criterion.metric not in record.per_prompt[0]:
        return None
    return worst_of(setting_verdicts(record, criterion, names), criterion)


def worst_of(verdicts: list[dict], criterion: Criterion) -> str:
    """The worst setting among ``setting_verdicts``: a failing one first, then the largest loss."""
    return max(verdicts, key=lambda v: (not v["passes"], criterion.loss(v["mean"])))["setting"]


def summarize_record(record: TrialRecord) -> None:
    """Mean, worst and the 95 % interval of each mean, from the per-image scores."""
    summary = summarize(record.per_prompt)
    record.mean, record.worst = summary.mean, summary.worst
    record.ci = {m: list(bootstrap_ci([p[m] for p in record.per_prompt])) for m in summary.mean}


def reference_record(session) -> TrialRecord:
    """The BF16 row: the baseline scored against itself (accuracy against its prompts), with the
    time and peak memory measured while the baseline was generated."""
    baseline, spec = session.baseline, session.spec
    prompts = [prompt for _, prompt, _ in spec.items()]
    record = TrialRecord(None, "complete", device=str(session.loaded.device),
                         weight_bytes=session.engine.weight_bytes(None),
                         residency=session.engine.residency, execution_mode=execution_mode(session.loaded),
                         peak_memory_bytes=baseline.peak_memory_bytes,
                         seconds_per_image=baseline.seconds_per_image,
                         image_seconds=list(baseline.image_seconds),
                         image_settings=list(baseline.image_settings), strategy="reference")
    record.per_prompt = [session.scorer.score_output(image, image, prompt)
                         for image, prompt in zip(baseline.images, prompts)]
    summarize_record(record)
    record.finished_at = baseline.created_at
    return judge(record, session.criterion)


def execution_mode(loaded) -> str:
    return "compiled" if getattr(loaded.transformer, "_layerscan_compiled", False) else "eager"



def failure_proven(per_prompt: list[dict[str, float]], total: int, criterion: Criterion) -> bool:
    """True when ``per_prompt`` (the first of ``total`` prompts) already rules out a pass.

    Either one prompt misses the worst-prompt threshold, or the mean misses its threshold even
    if every remaining prompt scored the best possible value (PSNR at its cap, SSIM 1, LPIPS 0).
    A pass is never proven early: one bad remaining prompt could still fail it.
    """
    values = [p.get(criterion.metric, math.nan) for p in per_prompt]
    if not values:
        return False
    size = criterion.per_setting or total
    # Each setting of a matrix must pass on its own, against its own limits.
    chunks = [(criterion.for_setting(start // size), values[start:start + size], min(size, total - start))
              for start in range(0, len(values), size)]
    if any(math.isnan(v) or not mine.meets(v, mine.worst_limit) for mine, chosen, _ in chunks for v in chosen):
        return True
    best = METRICS[criterion.metric].best  # what a prompt not yet generated could still reach
    if len(values) >= total:
        return False
    for mine, chosen, outputs in chunks:
        if len(chosen) == outputs:  # a setting complete: its verdict is judge's, already final
            if not _pass_rule(chosen, mine)[2]:
                return True
            continue
        limit = mine.mean_limit
        margin = 1e-9 * max(1.0, abs(limit))  # never stop on a rounding-level difference
        bound = (math.fsum(chosen) + (outputs - len(chosen)) * best) / outputs
        if bound > limit + margin if criterion.lower_is_better else bound < limit - margin:
            return True
    return False


def stop_when_failure_proven(criterion: Criterion, total: int) -> StopRule:
    """The safe early-stopping rule: stop as soon as ``failure_proven``."""
    return lambda per_prompt: failure_proven(per_prompt, total, criterion)


def still_decides(record: TrialRecord, total: int, criterion: Criterion) -> bool:
    """Whether a stored record answers its configuration under ``criterion`` without rerunning.

    Complete and failed records always do; a stopped one only while its prompts still prove a
    failure under this criterion (a looser criterion may leave the question open).
    """
    return record.status != "stopped" or failure_proven(record.per_prompt, total, criterion)


def failure_message(exc: BaseException) -> str:
    """A failed record's ``error`` for an exception raised while generating: its first line,
    after the exception's full name.

    torch's compiler has its own ``UserError`` (``torch._dynamo.exc.UserError``), unrelated to
    layerscan's; named by its bare class name, an internal compile failure read like a mistake
    of the user's.  Compiler failures say so; anything else carries its module.
    """
    kind = type(exc)
    module = kind.__module__
    name = kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"
    first_line = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    if module.startswith(("torch._dynamo", "torch._inductor")):
        return f"compile error ({name}): {first_line}"
    return f"{name}: {first_line}"


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def evaluate(
    engine: Fp8Engine,
    ignored: Sequence[str] | None,
    spec: GenerationSpec,
    baseline: Baseline,
    scorer: Scorer,
    criterion: Criterion | None = None,
    image_dir: Path | None = None,
    stop_rule: StopRule | None = None,
    resume: TrialRecord | None = None,
) -> TrialRecord:
    """Evaluate one configuration against the baseline.

    ``resume``: a stopped record of this configuration; its images' scores are kept and only
    the images after them are generated, so a stopped evaluation is continued, never repeated.
    Pattern errors and other mistakes of the user's propagate as ``UserError``; what the
    configuration itself causes (NaN output, out of memory, a runtime or compiler error) ends in
    a failed record.
    """
    config = engine.apply(ignored)
    loaded = engine.loaded
    record = TrialRecord(config, "complete", weight_bytes=engine.weight_bytes(config),
                         bf16_kept_bytes=engine.bf16_kept_bytes(config),
                         device=str(loaded.device), residency=engine.residency,
                         execution_mode=execution_mode(loaded))
    if resume is not None:
        record.per_prompt = [dict(p) for p in resume.per_prompt]
    if image_dir is not None:
        image_dir.mkdir(parents=True, exist_ok=True)
    seconds = []
    prompts = [prompt for _, prompt, _ in spec.items()]
    _peak_reset(loaded.device)
    try:
        for index, image, elapsed, compiled in iter_images(loaded, spec, start=len(record.per_prompt)):
            seconds.append((elapsed, compiled, index // spec.per_setting))
            record.per_prompt.append(scorer.score_output(image, baseline.images[index], prompts[index]))
            if image_dir is not None:
                save_png(image, image_dir / spec.image_name(index))
            if stop_rule and index + 1 < len(spec.items()) and stop_rule(record.per_prompt):
                record.status = "stopped"
                break
    except NonFiniteOutput as exc:  # NaN/inf output: this configuration's fault
        record.status, record.error = "failed", str(exc)
    except torch.OutOfMemoryError:
        record.status, record.error = "failed", "out of memory"
        torch.cuda.empty_cache()
    except RuntimeError as exc:
        record.status, record.error = "failed", failure_message(exc)
    peaks = [p for p in (_peak(loaded.device), resume and resume.peak_memory_bytes) if p is not None]
    record.peak_memory_bytes = max(peaks) if peaks else None  # a continued evaluation: both parts'
    # Images that compiled a graph are left out: their seconds are compilation, not FP8.
    timings = [(elapsed, compiled) for elapsed, compiled, _ in seconds]
    earlier = resume.seconds_by_setting() if resume is not None else {}
    record.image_seconds = [s for setting in sorted(earlier) for s in earlier[setting]] + \
        compile_free_seconds(timings)
    record.image_settings = [setting for setting in sorted(earlier) for _ in earlier[setting]] + \
        [setting for _, compiled, setting in seconds if not compiled]
    if record.image_seconds:
        record.seconds_per_image = seconds_per_output(record.seconds_by_setting())
    else:  # every image compiled something: the best there is
        record.seconds_per_image = typical_seconds(timings) if timings else (
            resume.seconds_per_image if resume is not None else None)
    if record.per_prompt and record.status != "failed":
        summarize_record(record)
        if criterion is not None:
            judge(record, criterion)
    record.finished_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return record
