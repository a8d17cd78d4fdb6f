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

from dataclasses import dataclass

import numpy as np

from layerscan.metrics import METRICS, Scorer, summarize


@dataclass
class NoiseFloor:
    variants: dict[str, dict]  # variant -> {"mean": {...}, "worst": {...}, "per_prompt": [...]}
    mean: dict[str, float]  # per metric: the worse of the counted variants' means
    worst: dict[str, float]  # per metric: the worse of the counted variants' worst images
    identical: tuple[str, ...] = ()  # variants whose outputs equal the baseline's bit for bit

    def as_dict(self) -> dict:
        return {"mean": self.mean, "worst": self.worst, "identical_variants": list(self.identical),
                "variants": {v: {"mean": d["mean"], "worst": d["worst"],
                                 "counted": v not in self.identical}
                             for v, d in self.variants.items()}}


def _worse(metric: str, values: list[float]) -> float:
    return min(values) if METRICS[metric].higher_is_better else max(values)


def measure_floor(scorer: Scorer, baseline, prompts: list[str]) -> NoiseFloor:
    """Score every variant of ``baseline`` against the baseline itself.

    A settings matrix's baseline is scored setting by setting (``baseline.parts``): a variant
    counts the settings where it changed something, and is identical only where it changed
    nothing under any setting.
    """
    parts = baseline.parts or [baseline]
    starts = np.cumsum([0] + [len(part.images) for part in parts])
    variants, identical = {}, []
    for name in parts[0].floor_images:
        changed, unchanged = [], []
        for part, start in zip(parts, starts):
            images = part.floor_images[name]
            scores = [scorer.score_output(image, reference, prompt) for image, reference, prompt
                      in zip(images, part.images, prompts[start:start + len(part.images)])]
            same = all(np.array_equal(a, b) for a, b in zip(images, part.images))
            (unchanged if same else changed).extend(scores)
        per_prompt = changed or unchanged
        summary = summarize(per_prompt)
        variants[name] = {"mean": summary.mean, "worst": summary.worst, "per_prompt": per_prompt}
        if not changed:
            identical.append(name)
    counted = [v for name, v in variants.items() if name not in identical] or list(variants.values())
    metrics = list(scorer.metrics)
    mean = {m: _worse(m, [v["mean"][m] for v in counted]) for m in metrics} if counted else {}
    worst = {m: _worse(m, [v["worst"][m] for v in counted]) for m in metrics} if counted else {}
    return NoiseFloor(variants, mean, worst, tuple(identical))
