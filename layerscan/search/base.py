"""The interface every search strategy implements, and what it is handed.

Lifecycle: the runner builds a ``SearchContext`` (groups, criterion, an ``evaluate`` that
answers from the trial store when it can) and calls ``Strategy.run(ctx)`` once.  A strategy
only decides *which* configurations to ask for; recording, deduplication, budgets, progress
and the final recommendation are the runner's.  ``evaluate`` raises ``BudgetExhausted`` when no
new evaluation may start; strategies let it propagate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

from layerscan.evaluate import TrialRecord
from layerscan.layers import Group
from layerscan.study import Criterion


class BudgetExhausted(Exception):
    """The trial or time budget is spent; the search ends with what it has."""


@dataclass
class SearchContext:
    groups: list[Group]
    criterion: Criterion
    evaluate_patterns: Callable[[tuple[str, ...]], TrialRecord]
    seed: int = 0
    storage: str | None = None  # for strategies that persist state of their own (Optuna)
    study_name: str = ""
    max_trials: int = 200
    session: Any = None  # the loaded pipeline, for strategies that measure proxies (auto)
    refine: bool = False  # refine the answer inside its groups, one level finer (--refine)
    notes: dict = field(default_factory=dict)  # what a strategy reports (proxy ranks, costs)

    def evaluate(self, kept: Iterable[Group], early_stop: bool = False) -> TrialRecord:
        """Evaluate FP8 with ``kept`` groups left in BF16.

        ``early_stop``: stop after the prompt that proves the configuration fails (the record
        is then "stopped", judged failing, and its scores cover only the prompts generated).
        """
        patterns = tuple(sorted({g.pattern for g in kept}))
        if early_stop:
            return self.evaluate_patterns(patterns, early_stop=True)
        return self.evaluate_patterns(patterns)

    def passes(self, record: TrialRecord) -> bool:
        return record.status != "failed" and bool(record.passes)

    def loss(self, record: TrialRecord) -> float:
        """Quality loss used for ranking; failed configurations rank last."""
        if record.status == "failed" or self.criterion.metric not in record.mean:
            return float("inf")
        return self.criterion.loss(record.mean[self.criterion.metric])


class Strategy(Protocol):
    name: str

    def run(self, ctx: SearchContext) -> None:
        """Ask ``ctx.evaluate`` for the configurations this strategy wants judged."""
