"""The noise floor: how far BF16 lands from itself under numerically equivalent changes.

Diffusion sampling amplifies tiny differences: moving the initial latents by one BF16 ULP, or
running attention through another (equally correct) kernel, changes the pictures measurably.
That distance is not FP8's fault, and a criterion stricter than it rejects configurations for
noise.  The variants (``layerscan.generate.FLOOR_VARIANTS``) are generated with the baseline,
on the same prompts and seeds; each is scored against the baseline with the run's metrics, and
the floor of a metric is the worse of the variants, for the mean and for the worst image.

A variant that leaves every output bit-identical to the baseline measured nothing (compiled
graphs, for one, may pick the same attention kernel whatever the backend asks): it is flagged
and not counted.  When no variant changed anything, the floor is that of identical outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from layerscan.metrics import Scorer, summarize, worst_value


@dataclass
class NoiseFloor:
    variants: dict[str, dict]  # variant -> {"mean": {...}, "worst": {...}, "per_prompt": [...]}
    mean: dict[str, float]  # per metric: the worse of the counted variants' means
    worst: dict[str, float]  # per metric: the worse of the counted variants' worst images
    identical: tuple[str, ...] = ()  # variants whose outputs equal the baseline's bit for bit
    # A settings matrix's floor under each setting on its own: {"mean": {...}, "worst": {...}}
    # (empty without a matrix); each setting's relative thresholds resolve against its own.
    settings: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        data = {"mean": self.mean, "worst": self.worst, "identical_variants": list(self.identical),
                "variants": {v: {"mean": d["mean"], "worst": d["worst"],
                                 "counted": v not in self.identical}
                             for v, d in self.variants.items()}}
        if self.settings:
            data["settings"] = self.settings
        return data


def measure_floor(scorer: Scorer, baseline, prompts: list[str]) -> NoiseFloor:
    """Score every variant of ``baseline`` against the baseline itself.

    A settings matrix's baseline is scored setting by setting (``baseline.parts``): a variant
    counts the settings where it changed something, and is identical only where it changed
    nothing under any setting.
    """
    parts = baseline.parts or [baseline]
    starts = np.cumsum([0] + [len(part.images) for part in parts])
    variants, identical = {}, []
    by_setting: list[dict[str, tuple[list, bool]]] = [{} for _ in parts]  # variant -> (scores, same)
    for name in parts[0].floor_images:
        changed, unchanged = [], []
        for number, (part, start) in enumerate(zip(parts, starts)):
            images = part.floor_images[name]
            scores = [scorer.score_output(image, reference, prompt) for image, reference, prompt
                      in zip(images, part.images, prompts[start:start + len(part.images)])]
            same = all(np.array_equal(a, b) for a, b in zip(images, part.images))
            (unchanged if same else changed).extend(scores)
            by_setting[number][name] = (scores, same)
        per_prompt = changed or unchanged
        summary = summarize(per_prompt)
        variants[name] = {"mean": summary.mean, "worst": summary.worst, "per_prompt": per_prompt}
        if not changed:
            identical.append(name)
    metrics = list(scorer.metrics)
    counted = [v for name, v in variants.items() if name not in identical] or list(variants.values())
    mean, worst = _worst_of(counted, metrics)
    settings = []
    if len(parts) > 1:
        for scored in by_setting:  # the variants that changed something under this setting
            summaries = [summarize(scores) for scores, same in scored.values() if not same] or \
                [summarize(scores) for scores, _ in scored.values()]
            setting_mean, setting_worst = _worst_of(
                [{"mean": s.mean, "worst": s.worst} for s in summaries], metrics)
            settings.append({"mean": setting_mean, "worst": setting_worst})
    return NoiseFloor(variants, mean, worst, tuple(identical), settings)


def _worst_of(variants: list[dict], metrics: list[str]) -> tuple[dict, dict]:
    """Per metric, the worse of the variants' means and of their worst outputs."""
    if not variants:
        return {}, {}
    return ({m: worst_value(m, [v["mean"][m] for v in variants]) for m in metrics},
            {m: worst_value(m, [v["worst"][m] for v in variants]) for m in metrics})
