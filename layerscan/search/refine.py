"""Refinement: from a family (or block) answer to the blocks (or families) inside it that matter.

A *cell* is one family inside one block, ``transformer_blocks.7.img_mlp``: the intersection of
a family group and a block group, so refining a family splits it by block and refining a block
splits it by family.  Configurations made of cells are written back as the shortest list of
vLLM substring patterns that selects exactly the same layers (``compress``): all blocks of a
family become the family again, ``transformer_blocks.1.`` stays a block.

``greedy_refine`` is the brute-force reference (each cell alone, then greedy), used when
``--refine`` is given to any strategy but ``auto``; ``auto`` orders the cells by its proxies.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

from layerscan.errors import UserError
from layerscan.evaluate import TrialRecord
from layerscan.layers import Group, LayerIndex, split_pattern
from layerscan.profiles import split_block
from layerscan.search.base import SearchContext, Strategy

FINER = {"family": "block", "block": "family"}  # what a group of each granularity splits into


def group_for(index: LayerIndex, pattern: str, groups: Sequence[Group]) -> Group:
    """The study's group with this pattern, or the group the pattern selects."""
    return next((g for g in groups if g.pattern == pattern), None) or index.group(pattern, "pattern")


class Compressor:
    """Shortest pattern lists for layer sets, over family, block, cell and module patterns."""

    def __init__(self, index: LayerIndex) -> None:
        self.index = index
        candidates: dict[str, frozenset[str]] = {}
        patterns = [g.pattern for kind in ("family", "block", "module") for g in index.groups(kind)]
        patterns += index.cell_patterns()
        for pattern in patterns:
            candidates.setdefault(pattern, frozenset(l.name for l in index.match(pattern)))
        self.candidates = candidates

    def __call__(self, layers: Iterable[str]) -> tuple[str, ...]:
        target = frozenset(layers)
        if not target:
            return ()
        inside = {p: s for p, s in self.candidates.items() if s <= target}
        best: tuple[str, ...] | None = None
        # Greedy set cover twice, preferring coarse families or blocks on ties; keep the shorter.
        for prefer_blocks in (False, True):
            chosen, covered = [], frozenset()
            while covered != target:
                options = [(len(s - covered), p) for p, s in inside.items() if s - covered]
                if not options:  # no exact pattern: the smallest superset, honestly evaluated
                    rest = target - covered
                    p = min((p for p, s in self.candidates.items() if s & rest),
                            key=lambda p: (len(self.candidates[p]), len(p)))
                    chosen.append(p)
                    covered |= self.candidates[p]
                    break
                gain, p = max(options, key=lambda o: (o[0], self._block_like(o[1]) == prefer_blocks,
                                                      -len(o[1]), o[1]))
                chosen.append(p)
                covered |= inside[p]
            result = tuple(sorted(chosen))
            if best is None or (len(result), sum(map(len, result))) < (len(best), sum(map(len, best))):
                best = result
        return best

    @staticmethod
    def _block_like(pattern: str) -> bool:
        parts = split_block(split_pattern(pattern)[1])
        return parts is not None and parts[1] == ""


class LayerSetEvaluator:
    """Evaluate configurations given as sets of groups or cells (any mix of granularities).

    A set that is exactly a union of the study's groups is asked for under those groups'
    patterns (the key every strategy uses); any other set under its compressed patterns.
    """

    def __init__(self, ctx: SearchContext, index: LayerIndex) -> None:
        self.ctx = ctx
        self.index = index
        self.compress = Compressor(index)

    def patterns(self, layers: set[str]) -> tuple[str, ...]:
        whole = [g for g in self.ctx.groups if set(g.layers) <= layers]
        if {name for g in whole for name in g.layers} == layers:
            return tuple(sorted({g.pattern for g in whole}))
        return self.compress(layers)

    def __call__(self, parts: Iterable[Group], early_stop: bool = False) -> TrialRecord:
        layers = {name for part in parts for name in part.layers}
        return self.ctx.evaluate_patterns(self.patterns(layers), early_stop=early_stop)


def add_then_minimise(
    evaluate: Callable[[list[Group]], TrialRecord],
    passes: Callable[[TrialRecord], bool],
    order: Sequence[Group],
    first: int = 1,
    may_be_empty: bool = False,
    lazy: bool = False,
) -> list[Group] | None:
    """Greedy's core over ``order``: keep the first ``first`` parts, add one at a time until the
    criterion holds, then try each kept part out again (last added first).  None when even
    everything in ``order`` fails.  ``may_be_empty``: whether keeping none is worth a test (it
    is not when that configuration is known to fail).

    ``lazy``: with several parts to start from, try the first removal before the whole start
    set; when it passes, keeping more in BF16 is taken to pass too and the start set is never
    evaluated on its own (the removal test is needed for a minimal answer anyway).
    """
    if not order:
        return None
    kept = list(order[:max(1, first)])
    if lazy and len(kept) > 1 and passes(evaluate(kept[:-1])):
        kept = kept[:-1]
    elif not passes(evaluate(kept)):
        for part in order[len(kept):]:
            kept.append(part)
            if passes(evaluate(kept)):
                break
        else:
            return None
    for part in list(reversed(kept)):
        trial = [p for p in kept if p is not part]
        if (trial or may_be_empty) and passes(evaluate(trial)):
            kept = trial
    return kept


def index_of(ctx: SearchContext) -> LayerIndex:
    if ctx.index is None:
        raise UserError("refinement needs the layer index (SearchContext.index)")
    return ctx.index


def greedy_refine(ctx: SearchContext, answer: Sequence[str]) -> tuple[str, ...]:
    """Refine ``answer`` one group at a time, by brute force: with the rest of the answer kept,
    each cell of the group alone, ranked by quality, added until the criterion holds, then each
    tried out again.  Returns the refined configuration's patterns."""
    index = index_of(ctx)
    evaluate = LayerSetEvaluator(ctx, index)
    parts = [group_for(index, p, ctx.groups) for p in answer]
    kept_parts: list[Group] = list(parts)
    for group in parts:
        pieces = index.cells(group)
        if len(pieces) < 2:
            continue
        rest = [p for p in kept_parts if p is not group]

        def with_rest(chosen: list[Group]) -> TrialRecord:
            return evaluate(rest + chosen)

        if rest and ctx.passes(with_rest([])):
            kept_parts = rest  # the group was not needed at all
            continue
        order = sorted(pieces, key=lambda c: ctx.loss(with_rest([c])))
        chosen = add_then_minimise(with_rest, ctx.passes, order, 1, bool(rest))
        if chosen is not None:
            kept_parts = rest + chosen
    return evaluate.patterns({name for p in kept_parts for name in p.layers})


class RefinedStrategy(Strategy):
    """Any strategy, then ``greedy_refine`` on the answer it found (``--refine``).

    The hooks are the inner strategy's: refinement adds evaluations, not needs.
    """

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner
        self.name = inner.name
        self.shares_study = inner.shares_study
        self.needs_proxies = inner.needs_proxies

    def share(self, sharing) -> None:
        self.inner.share(sharing)

    def records_elsewhere(self, ctx: SearchContext) -> list[TrialRecord]:
        return self.inner.records_elsewhere(ctx)

    def run(self, ctx: SearchContext) -> None:
        if ctx.groups and all(g.granularity not in FINER for g in ctx.groups):
            ctx.notes.setdefault("refine", "module granularity has nothing finer; not refined")
            self.inner.run(ctx)
            return
        mark = len(ctx.ledger.asked)
        self.inner.run(ctx)
        seen = {c for c in ctx.ledger.asked[mark:]}
        answer = ctx.ledger.recommend([r for r in ctx.ledger.records() if r.config in seen])
        if answer is not None and answer.config:
            refined = greedy_refine(ctx, answer.config)
            ctx.notes["refine"] = f"{', '.join(answer.config)} refined to {', '.join(refined)}"
