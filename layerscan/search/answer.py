"""Which passing configuration is the answer: the rule, and the front of the alternatives.

Among the configurations that pass the criterion, what to optimise is the user's to say
(``prefer``): ``speed`` (fewest seconds per image, as served), ``memory`` (fewest BF16-kept
weight bytes) or ``quality`` (smallest quality loss).  Speed counts only where it is measured as
served: compiled, on a GPU.  Elsewhere (an eager CPU run has no FP8 kernels; its FP8 is slower
than BF16 by construction) a speed preference falls back to bytes, and says so.
"""

from __future__ import annotations

from typing import Iterable

from layerscan.evaluate import TrialRecord
from layerscan.study import Criterion

# Seconds per image within this fraction of the fastest count as equally fast: medians of a few
# images move by about this much between identical runs, and a difference inside it is not a
# reason to keep more layers in BF16.
SPEED_TIE = 0.02


def speed_is_served(device_type: str, execution_mode: str) -> bool:
    """Seconds per image mean what serving would see: compiled graphs on a GPU."""
    return device_type == "cuda" and execution_mode == "compiled"


def resolve_preference(prefer: str | None, device_type: str, execution_mode: str) -> tuple[str, str | None]:
    """The objective actually used, and a note when it is not the one asked for (or defaulted)."""
    served = speed_is_served(device_type, execution_mode)
    if prefer is None:
        return ("speed", None) if served else ("memory", None)
    if prefer == "speed" and not served:
        return "memory", (f"speed is not measured as served here ({device_type}, {execution_mode}: "
                          "no FP8 kernels run as they would in serving), so the answer keeps the "
                          "fewest BF16 bytes instead")
    return prefer, None


def _passing(records: Iterable[TrialRecord]) -> list[TrialRecord]:
    return [r for r in records if r.config is not None and r.passes and r.status == "complete"]


def _seconds(record: TrialRecord) -> float:
    return record.seconds_per_image if record.seconds_per_image is not None else float("inf")


def recommend(records: Iterable[TrialRecord], criterion: Criterion, prefer: str = "memory") -> TrialRecord | None:
    """The passing FP8 configuration best on ``prefer``, ties broken by the other two and then
    by the shortest pattern list (for speed: within ``SPEED_TIE`` of the fastest is a tie)."""
    def loss(r: TrialRecord) -> float:
        return criterion.loss(r.mean[criterion.metric])

    passing = _passing(records)
    if prefer == "quality":
        return min(passing, key=lambda r: (loss(r), r.bf16_kept_bytes, _seconds(r), len(r.config)),
                   default=None)
    if prefer == "speed" and passing:
        # As fast as the fastest, within timing noise; among those, as for memory.
        fastest = min(_seconds(r) for r in passing)
        passing = [r for r in passing if _seconds(r) <= fastest * (1 + SPEED_TIE)]
    return min(passing, key=lambda r: (r.bf16_kept_bytes, loss(r), _seconds(r), len(r.config)),
               default=None)


def pareto_front(records: Iterable[TrialRecord], criterion: Criterion, with_speed: bool = False) -> list[TrialRecord]:
    """FP8 configurations no other beats on every objective at once: quality loss and BF16 bytes,
    and seconds per image where speed is measured as served."""
    def point(r: TrialRecord) -> tuple[float, ...]:
        base = (criterion.loss(r.mean[criterion.metric]), float(r.bf16_kept_bytes))
        return base + ((_seconds(r),) if with_speed else ())

    points = [(point(r), r) for r in records
              if r.config is not None and r.status == "complete" and criterion.metric in r.mean]

    def dominates(q, p) -> bool:
        return all(a <= b for a, b in zip(q, p)) and any(a < b for a, b in zip(q, p))

    front = [(p, r) for p, r in points if not any(dominates(q, p) for q, _ in points)]
    return [r for _, r in sorted(front, key=lambda item: item[0][1])]
