"""The interface every search strategy implements, and what it is handed.

Lifecycle: the runner builds a ``SearchContext`` around the run's ``TrialLedger`` and calls
``Strategy.run(ctx)`` once.  A strategy only decides *which* configurations to ask for; whether
one is already known, whether the budget allows a new evaluation, recording it, keeping its
images and the final recommendation are the ledger's.  ``ctx.evaluate`` raises
``BudgetExhausted`` when no new evaluation may start; strategies let it propagate.

What a strategy needs from the run beyond that it declares, the way Optuna's samplers declare
theirs: ``needs_proxies`` (the runner then hands it ``ctx.proxies``, built from the loaded
pipeline it never sees), ``shares_study`` (other processes may join its search; the runner
then hands it a ``Sharing`` through ``share``) and ``records_elsewhere`` (evaluations other
processes made, which the report includes).  A strategy never touches the session, the engine
or a cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from layerscan.evaluate import TrialRecord
from layerscan.layers import Group
from layerscan.search.ledger import BudgetExhausted, TrialLedger
from layerscan.study import Criterion

__all__ = ["BudgetExhausted", "SearchContext", "Strategy"]


@dataclass
class SearchContext:
    ledger: TrialLedger
    groups: list[Group]
    criterion: Criterion
    seed: int = 0
    storage: str | None = None  # for strategies that persist state of their own (Optuna)
    study_name: str = ""
    max_trials: int = 200  # what a strategy planning to a budget may spend (the proof's reserve left out)
    index: Any = None  # the layers the groups are made of (layerscan.layers.LayerIndex), for refining
    # For a strategy that declares ``needs_proxies``: builds the proxies (layerscan.proxy.scores).
    proxies: Callable[[], Any] | None = None
    refine: bool = False  # refine the answer inside its groups, one level finer (--refine)
    notes: dict = field(default_factory=dict)  # what a strategy reports (proxy ranks, costs)

    def evaluate_patterns(self, patterns: Iterable[str] | None, early_stop: bool = False) -> TrialRecord:
        return self.ledger.evaluate(patterns, early_stop=early_stop)

    def evaluate(self, kept: Iterable[Group], early_stop: bool = False) -> TrialRecord:
        """Evaluate FP8 with ``kept`` groups left in BF16.

        ``early_stop``: stop after the prompt that proves the configuration fails (the record
        is then "stopped", judged failing, and its scores cover only the prompts generated).
        """
        return self.ledger.evaluate({g.pattern for g in kept}, early_stop=early_stop)

    def evaluate_many(self, batch: Iterable[Iterable[Group]], early_stop: bool = False) -> list[TrialRecord]:
        """Records for configurations that do not depend on each other's verdicts (greedy's
        single groups, one size of exhaustive's subsets), in order: spread over the run's
        workers when it has several (``--workers``/``--gpus``), one after another otherwise."""
        return self.ledger.evaluate_many([({g.pattern for g in kept}, early_stop) for kept in batch])

    def passes(self, record: TrialRecord) -> bool:
        return record.status != "failed" and bool(record.passes)

    def loss(self, record: TrialRecord) -> float:
        """Quality loss used for ranking; failed configurations rank last."""
        if record.status == "failed" or self.criterion.metric not in record.mean:
            return float("inf")
        return self.criterion.loss(record.mean[self.criterion.metric])


class Strategy:
    """Base of every strategy: ``run`` plus the hooks a strategy may override."""

    name = ""
    needs_proxies = False  # whether the runner must hand it ``ctx.proxies``
    shares_study = False  # whether other processes can join this search (--gpus/--workers)

    def share(self, sharing) -> None:
        """Take part in a study other processes share (only when ``shares_study``)."""
        raise NotImplementedError(f"strategy {self.name} runs in one process")

    def records_elsewhere(self, ctx: SearchContext) -> list[TrialRecord]:
        """Evaluations other processes made for this search (none unless the study is shared)."""
        return []

    def run(self, ctx: SearchContext) -> None:
        """Ask ``ctx.evaluate`` for the configurations this strategy wants judged."""
        raise NotImplementedError
