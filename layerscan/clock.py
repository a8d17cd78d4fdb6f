"""Where a run's time goes: wall seconds per phase, each second counted once.

Phases nest (a precision switch inside the proxies' replay, a generated output inside the
baseline build); a phase is charged only the time not spent in the phases inside it, so the
seconds of all phases add up to the time spent inside any of them.  GPU work is asynchronous:
``phase`` synchronizes the device at its edges when given one, so a kernel launched in one
phase is not charged to the next.

One clock per process (``CLOCK``): a run takes a ``snapshot`` when it starts and reports
``timing_since`` it; helper processes keep their own.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import torch

# The phases a run reports, in the order it shows them.
LOAD = "loading the pipeline"
PREPARE = "preparing FP8 layers"  # conversion, scales, the CPU master copies (requantize)
GENERATE = "generating outputs"
COMPILE = "generating outputs that compiled graphs"  # graph building included
SWITCH = "switching precision"
SCORE = "scoring"
SAVE = "saving outputs"
PROXIES = "proxies"
CHECK = "checking against the target's code"  # vLLM-Omni's own classes, in their environment
REPORT = "writing the report"
OTHER = "everything else"
PHASES = (LOAD, PREPARE, GENERATE, COMPILE, SWITCH, SCORE, SAVE, PROXIES, CHECK, REPORT)
GENERATION = (GENERATE, COMPILE)  # what making outputs costs, compilation included


class _Frame:
    __slots__ = ("name", "inner")

    def __init__(self, name: str) -> None:
        self.name = name
        self.inner = 0.0  # seconds spent in phases inside this one


class PhaseClock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)  # times each phase ran (outputs generated)
        self._stack: list[_Frame] = []

    @contextlib.contextmanager
    def phase(self, name: str, device: "torch.device | None" = None) -> Iterator[_Frame]:
        """Charge the block's time to ``name`` (less the phases inside it); the block may
        rename its frame (``frame.name = ...``) once it knows what it was."""
        frame = _Frame(name)
        synchronize(device)
        began = time.perf_counter()
        self._stack.append(frame)
        try:
            yield frame
        finally:
            try:
                synchronize(device)
            finally:  # charged and unwound even when the device reports an error here
                elapsed = time.perf_counter() - began
                self._stack.pop()
                self.seconds[frame.name] += elapsed - frame.inner
                self.counts[frame.name] += 1
                if self._stack:
                    self._stack[-1].inner += elapsed

    def snapshot(self) -> "Snapshot":
        return Snapshot(time.perf_counter(), dict(self.seconds), dict(self.counts))


class Snapshot:
    """The clock at one moment; ``timing_since`` turns two into a run's breakdown."""

    def __init__(self, at: float, seconds: dict[str, float], counts: dict[str, int]) -> None:
        self.at, self.seconds, self.counts = at, seconds, counts


def timing_since(before: Snapshot, after: Snapshot | None = None) -> dict:
    """What happened between two snapshots (``after``: now): ``wall`` seconds, ``phases`` in the
    report's order (seconds and how many times each ran, phases that did not run left out) with
    the wall time no phase claimed as ``OTHER`` (imports, the search's own bookkeeping), and
    ``generation_share``: the part of the wall time spent making outputs."""
    after = after or CLOCK.snapshot()
    wall = after.at - before.at
    seconds = {n: after.seconds[n] - before.seconds.get(n, 0.0) for n in after.seconds}
    counts = {n: after.counts[n] - before.counts.get(n, 0) for n in after.counts}
    names = [n for n in PHASES if counts.get(n)] + [n for n in seconds if n not in PHASES and counts[n]]
    phases = {n: {"seconds": round(seconds[n], 2), "count": counts[n]} for n in names}
    phases[OTHER] = {"seconds": round(max(0.0, wall - sum(seconds[n] for n in names)), 2), "count": None}
    generated = sum(seconds.get(n, 0.0) for n in GENERATION)
    return {"wall": round(wall, 2), "phases": phases,
            "outputs_generated": sum(counts.get(n, 0) for n in GENERATION),
            "generation_share": round(generated / wall, 4) if wall > 0 else None}


def timing_line(timing: dict) -> str:
    """One line for the terminal: the wall time and its largest parts."""
    wall = timing["wall"]
    parts = sorted(timing["phases"].items(), key=lambda item: -item[1]["seconds"])
    shares = ", ".join(f"{name} {100 * p['seconds'] / wall:.0f} %" for name, p in parts[:4]
                       if wall > 0 and p["seconds"] > 0)
    made = timing["outputs_generated"]
    return f"time: {wall:.1f} s ({shares}); {made} output{'' if made == 1 else 's'} generated"


def synchronize(device: "torch.device | None") -> None:
    """Wait for the device's queued work (GPU work is asynchronous; a timer must not stop
    before it ends)."""
    if device is not None and device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


CLOCK = PhaseClock()
