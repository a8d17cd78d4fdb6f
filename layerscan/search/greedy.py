"""Greedy: the manual ablation, automated.

FP8 everywhere first; if that already meets the criterion nothing is kept.  Otherwise each group
is tried alone in BF16, groups are added in order of how much that helped until the criterion
holds, and each added group is then tried out again so the answer is minimal.
"""

from __future__ import annotations

from layerscan.layers import Group
from layerscan.search.base import SearchContext


class GreedyStrategy:
    name = "greedy"

    def __init__(self, order: list[Group] | None = None) -> None:
        # A precomputed ranking (from a proxy) replaces the one-group-at-a-time evaluations.
        self.order = order

    def run(self, ctx: SearchContext) -> None:
        if ctx.passes(ctx.evaluate([])):
            return
        order = self.order or sorted(ctx.groups, key=lambda g: ctx.loss(ctx.evaluate([g])))
        kept: list[Group] = []
        for group in order:
            kept.append(group)
            if ctx.passes(ctx.evaluate(kept)):
                break
        else:
            return  # even every group in BF16 misses the criterion: nothing to minimise
        for group in list(reversed(kept)):
            trial = [g for g in kept if g is not group]
            if trial and ctx.passes(ctx.evaluate(trial)):
                kept = trial
