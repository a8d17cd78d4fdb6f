"""Search strategies behind one interface (``base.Strategy``), over one ``ledger.TrialLedger``."""

from __future__ import annotations

from layerscan.errors import UserError
from layerscan.evaluate import TrialRecord
from layerscan.search.auto import AutoStrategy
from layerscan.search.base import SearchContext, Strategy
from layerscan.search.exhaustive import ExhaustiveStrategy
from layerscan.search.greedy import GreedyStrategy
from layerscan.search.optuna_search import OptunaStrategy
from layerscan.search.refine import RefinedStrategy

STRATEGIES = {"auto": AutoStrategy, "greedy": GreedyStrategy, "optuna": OptunaStrategy,
              "exhaustive": ExhaustiveStrategy}


def make_strategy(name: str, ctx: SearchContext, records: list[TrialRecord]) -> Strategy:
    if name not in STRATEGIES:
        raise UserError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    if name == "auto":
        return AutoStrategy(refine=ctx.refine)  # refines with its proxies itself
    if name == "optuna":
        # Seed Optuna with an earlier greedy (or auto) answer for these settings, if there is one.
        greedy = [r for r in records if r.strategy in ("greedy", "auto") and r.passes
                  and r.config is not None]
        best = min(greedy, key=lambda r: r.bf16_kept_bytes, default=None)
        strategy: Strategy = OptunaStrategy(list(best.config) if best else None)
    else:
        strategy = STRATEGIES[name]()
    # --refine for the others: their answer is refined by brute force (greedy over the cells).
    return RefinedStrategy(strategy) if ctx.refine else strategy
