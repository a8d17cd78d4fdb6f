"""The trial ledger: the one owner of a run's trials.

Every question about a configuration goes through here: is it known (and does its record still
answer under today's criterion)?  may a new evaluation start (trial budget, deadline)?  record
it (one fsynced JSON line, so Ctrl-C loses nothing and a rerun resumes), keep its images (the
report's grid draws on them), and what is the answer (the recommendation and the Pareto
front)?  The files themselves are :mod:`layerscan.search.store`'s.  ``layerscan run`` and ``layerscan worker`` both build one; strategies receive it through
their ``SearchContext`` and only decide which configurations to ask for.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from layerscan.configs import Ignored, describe, normalize
from layerscan.evaluate import (
    TrialRecord, evaluate, execution_mode, judge, reference_record, still_decides,
    stop_when_failure_proven,
)
from layerscan.search.answer import pareto_front, recommend, resolve_preference, speed_is_served
from layerscan.search.store import TrialImages, TrialStore


class BudgetExhausted(Exception):
    """The trial or time budget is spent; the search ends with what it has."""


def evaluate_configuration(session, images: TrialImages, config: Ignored, early_stop: bool,
                           resume: TrialRecord | None) -> TrialRecord:
    """One evaluation of ``config`` on ``session``, its images kept in ``images``: what this run
    does for itself and what a pool helper (``layerscan serve``) does for it."""
    return evaluate(session.engine, config, session.spec, session.baseline, session.scorer,
                    session.criterion, image_dir=images.directory(config),
                    stop_rule=stop_when_failure_proven(session.criterion, len(session.spec.items()))
                    if early_stop else None, resume=resume)


class TrialLedger:
    """What a run knows, may still do, and concludes.

    ``evaluate`` is the only way a configuration gets evaluated.  ``max_trials`` counts every FP8
    configuration on record for these settings, so a resumed run continues the same budget;
    ``deadline`` (``time.monotonic()`` seconds) stops new evaluations after it.
    """

    def __init__(self, session, out_dir: Path, strategy: str, deadline: float | None = None,
                 on_record: Callable[[TrialRecord], None] | None = None,
                 on_start: Callable[[Ignored], None] | None = None) -> None:
        self.session = session
        self.criterion = session.criterion  # thresholds resolved against the noise floor
        self.strategy = strategy
        self.max_trials = session.study.max_trials
        loaded = session.loaded
        self.speed_served = speed_is_served(loaded.device.type, execution_mode(loaded))
        # What the answer optimises among passing configurations, and why not the one asked for.
        self.prefer, self.preference_note = resolve_preference(
            session.study.prefer, loaded.device.type, execution_mode(loaded))
        self.deadline = deadline
        self.store = TrialStore(out_dir / "trials.jsonl", session.eval_key)
        self.images = TrialImages(session.eval_key, session.cache_root)
        self.on_record = on_record
        self.on_start = on_start
        self.pool = None  # layerscan.batch.EvaluationPool: where a batch's evaluations are spread
        self._lock = threading.Lock()  # a pool's results are taken from its threads
        self._evaluated_now: set[Ignored] = set()  # configurations evaluated in this process
        self.continued = 0  # of those, evaluations that continued an early-stopped record
        self.asked: list[Ignored] = []  # every configuration asked for, in order (refinement reads it)
        self._elsewhere: dict[Ignored, TrialRecord] = {}  # recorded by other workers of a shared study
        for record in self.store.records():  # measurements are reused; verdicts follow today's criterion
            self.judge(record)
        self.reference = reference_record(session)

    # --- knowing and judging ------------------------------------------------------------------

    @property
    def image_count(self) -> int:
        return len(self.session.spec.items())

    def judge(self, record: TrialRecord) -> TrialRecord:
        return judge(record, self.criterion)

    def known(self, config: Ignored, early_stop: bool = False) -> TrialRecord | None:
        """The record that answers ``config`` now, if any.

        A stopped record answers only a caller that stops early itself, and only while its
        prompts still prove a failure under today's criterion; else it is measured again.
        """
        record = self.store.get(config) or self._elsewhere.get(config)
        if record is None:
            return None
        if record.status != "stopped":
            return record
        if early_stop and still_decides(record, self.image_count, self.criterion):
            return record
        return None

    def recorded(self, config: Ignored) -> TrialRecord | None:
        """Whatever is on record for ``config`` (a stopped record included), for reporting."""
        config = normalize(config)
        if config is None:
            return self.reference
        return self.store.get(config) or self._elsewhere.get(config)

    def fp8_on_record(self) -> int:
        """FP8 configurations on record, this process's and other workers' of a shared study
        (the trial budget is the study's, not one worker's)."""
        configs = {r.config for r in self.store.records()} | set(self._elsewhere)
        return len(configs - {None})

    def room(self) -> int:
        """New evaluations the trial budget still allows."""
        return self.max_trials - self.fp8_on_record()

    def past_deadline(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def check_allowed(self) -> None:
        """Raise ``BudgetExhausted`` when no new evaluation may start."""
        if self.room() <= 0:
            raise BudgetExhausted("budget")
        if self.past_deadline():
            raise BudgetExhausted("timeout")

    # --- evaluating -----------------------------------------------------------------------------

    def evaluate(self, patterns: Iterable[str] | None, early_stop: bool = False) -> TrialRecord:
        """The record of FP8 with ``patterns`` kept in BF16: from the ledger, or evaluated now."""
        config = normalize(patterns)
        self.asked.append(config)
        if config is None:
            return self.reference
        cached = self.known(config, early_stop)
        if cached is not None:
            return cached
        stopped = self._stopped(config)
        if stopped is None:
            self.check_allowed()
        return self.evaluate_here(config, early_stop, stopped)

    def evaluate_many(self, requests: list[tuple[Iterable[str], bool]]) -> list[TrialRecord]:
        """Records for a batch of independent ``(patterns, early_stop)`` requests, in order.

        Known configurations are answered from the ledger; the others are evaluated, spread over
        the run's evaluation pool when there is one (``pool``), else one after another here.
        When the trial budget or the deadline allows only some, those are evaluated and recorded
        and then ``BudgetExhausted`` is raised, as ``evaluate`` would have.
        """
        configs = [normalize(patterns) for patterns, _ in requests]
        self.asked.extend(configs)
        todo: dict[Ignored, bool] = {}
        for config, (_, early_stop) in zip(configs, requests):
            if config is not None and self.known(config, early_stop) is None:
                todo[config] = todo.get(config, True) and early_stop  # one asking in full wins
        allowed, exhausted = [], None
        room = self.room()
        for config, early_stop in todo.items():
            stopped = self._stopped(config)
            if stopped is None:
                if room <= 0:
                    exhausted = "budget"
                    break
                room -= 1
            allowed.append((config, early_stop, stopped))
        if allowed and self.past_deadline():
            allowed, exhausted = [], "timeout"
        if self.pool is not None and len(allowed) > 1:
            self.pool.evaluate(self, allowed)
        else:
            for config, early_stop, stopped in allowed:
                self.evaluate_here(config, early_stop, stopped)
        if exhausted:
            raise BudgetExhausted(exhausted)
        return [self.reference if c is None else self.known(c, early_stop) or self.store.get(c)
                for c, (_, early_stop) in zip(configs, requests)]

    def _stopped(self, config: Ignored) -> TrialRecord | None:
        """A stopped evaluation of ``config`` that no longer answers: continued, not repeated."""
        stopped = self.store.get(config)
        return stopped if stopped is not None and stopped.status == "stopped" else None

    def evaluate_here(self, config: Ignored, early_stop: bool, stopped: TrialRecord | None) -> TrialRecord:
        """Evaluate ``config`` in this process, continuing ``stopped`` when given, and record it."""
        if self.on_start:
            self.on_start(config)
        record = evaluate_configuration(self.session, self.images, config, early_stop, stopped)
        return self.take(record, continued=stopped is not None)

    def take(self, record: TrialRecord, continued: bool) -> TrialRecord:
        """Record an evaluation made here or by a pool worker for this run (thread-safe)."""
        with self._lock:
            record.strategy = self.strategy
            self.judge(record)
            self.store.add(record)
            self._evaluated_now.add(record.config)
            self.continued += continued
            if self.on_record:
                self.on_record(record)
        return record

    @property
    def new_evaluations(self) -> int:
        """Configurations evaluated in this process, each counted once (a continued one too)."""
        return len(self._evaluated_now)

    def add_elsewhere(self, records: Iterable[TrialRecord]) -> None:
        """Records other workers of a shared study made (local records win)."""
        for record in records:
            if self.store.get(record.config) is None:
                self._elsewhere[record.config] = self.judge(record)

    # --- the answer -----------------------------------------------------------------------------

    def records(self) -> list[TrialRecord]:
        """The BF16 reference first, then every FP8 configuration known, in the order finished."""
        fp8 = {**self._elsewhere, **{r.config: r for r in self.store.records()}}
        fp8.pop(None, None)
        return [self.reference] + sorted(fp8.values(), key=lambda r: r.finished_at)

    def recommend(self, records: Iterable[TrialRecord] | None = None) -> TrialRecord | None:
        return recommend(self.records() if records is None else records, self.criterion, self.prefer)

    def pareto(self) -> list[TrialRecord]:
        return pareto_front(self.records(), self.criterion, with_speed=self.speed_served)

    def best_label(self) -> str:
        best = self.recommend()
        return describe(best.config) if best else "none passing yet"

    def cost(self) -> dict:
        """FP8 configurations on record and their cost in full evaluations (a stopped one counts
        the prompts it generated, a failed one the prompt it failed on too)."""
        fp8 = [r for r in self.records() if r.config is not None]
        total = self.image_count
        generated = sum(min(total, len(r.per_prompt) + (r.status == "failed")) for r in fp8)
        return dict(configurations=len(fp8), stopped=sum(r.status == "stopped" for r in fp8),
                    full_evaluations=generated / total if total else 0.0)

    # --- images ---------------------------------------------------------------------------------

    def outputs_on_disk(self, config: Ignored) -> set[int]:
        """Indices of the outputs of ``config`` this run can show: every one for BF16, else those
        its evaluation saved in this cache (another worker's are in that worker's cache)."""
        count = self.image_count
        if config is None:
            return set(range(count))
        return self.images.present(config, [self.session.spec.image_name(i) for i in range(count)])

    def images_of(self, config: Ignored, indices: list[int]) -> dict[int, np.ndarray]:
        """The outputs of ``config`` at ``indices`` that exist: the baseline's for BF16, else
        those its evaluation kept.  Nothing is generated here: a stopped evaluation shows the
        outputs that proved its failure, and the report spends no GPU time of its own."""
        if config is None:
            return {i: self.session.baseline.images[i] for i in indices}
        spec = self.session.spec
        found = self.images.load(config, [spec.image_name(i) for i in indices])
        return {indices[k]: image for k, image in found.items()}

    # --- another worker's records ---------------------------------------------------------------

    def answers(self, record: TrialRecord) -> TrialRecord | None:
        """``record`` (another worker's, read from a shared study) judged under today's criterion,
        if it answers its configuration without rerunning, else None; nothing is recorded.

        Complete and failed records always answer; a stopped one only while its prompts still
        prove a failure under this criterion (``still_decides``).
        """
        self.judge(record)
        return record if still_decides(record, self.image_count, self.criterion) else None
