"""Search strategies behind one interface (see ``base.Strategy``)."""

from __future__ import annotations

from layerscan.errors import UserError
from layerscan.evaluate import TrialRecord
from layerscan.search.base import SearchContext, Strategy
from layerscan.search.exhaustive import ExhaustiveStrategy
from layerscan.search.greedy import GreedyStrategy
from layerscan.search.optuna_search import OptunaStrategy

STRATEGIES = ("greedy", "optuna", "exhaustive")


def make_strategy(name: str, ctx: SearchContext, records: list[TrialRecord]) -> Strategy:
    if name == "greedy":
        return GreedyStrategy()
    if name == "exhaustive":
        return ExhaustiveStrategy()
    if name == "optuna":
        # Seed Optuna with an earlier greedy answer for these settings, when there is one.
        greedy = [r for r in records if r.strategy == "greedy" and r.passes and r.config is not None]
        best = min(greedy, key=lambda r: r.bf16_kept_bytes, default=None)
        return OptunaStrategy(list(best.config) if best else None)
    raise UserError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
