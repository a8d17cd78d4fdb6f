"""Greedy: the manual ablation, automated.

FP8 everywhere first; if that already meets the criterion nothing is kept.  Otherwise each group
is tried alone in BF16, groups are added in order of how much that helped until the criterion
holds, and each added group is then tried out again so the answer is minimal.
"""

from __future__ import annotations

from layerscan.search.base import SearchContext, Strategy
from layerscan.search.refine import add_then_minimise


class GreedyStrategy(Strategy):
    name = "greedy"

    def run(self, ctx: SearchContext) -> None:
        if ctx.passes(ctx.evaluate([])):
            return
        alone = ctx.evaluate_many([[g] for g in ctx.groups])  # independent: one batch
        loss = {g.pattern: ctx.loss(r) for g, r in zip(ctx.groups, alone)}
        order = sorted(ctx.groups, key=lambda g: loss[g.pattern])
        add_then_minimise(ctx.evaluate, ctx.passes, order)
