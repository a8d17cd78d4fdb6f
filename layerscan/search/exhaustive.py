"""Exhaustive: every subset of groups, smallest first, for small group counts."""

from __future__ import annotations

from itertools import combinations

from layerscan.errors import UserError
from layerscan.search.base import SearchContext, Strategy

MAX_GROUPS = 12  # 4096 configurations; beyond that use greedy or optuna


class ExhaustiveStrategy(Strategy):
    name = "exhaustive"

    def run(self, ctx: SearchContext) -> None:
        if len(ctx.groups) > MAX_GROUPS:
            raise UserError(f"exhaustive search over {len(ctx.groups)} groups means "
                            f"{2 ** len(ctx.groups)} runs; use --strategy greedy or optuna, "
                            f"or a coarser --granularity / --text-encoder-granularity component "
                            f"(limit {MAX_GROUPS} groups)")
        for size in range(len(ctx.groups) + 1):  # each size one batch, smallest first
            ctx.evaluate_many(list(combinations(ctx.groups, size)))
