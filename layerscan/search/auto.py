"""Auto: greedy's answer from a few full evaluations.

Greedy pays one full evaluation per group just to rank the groups.  Auto ranks them with the
proxies instead (``layerscan.proxy``: layer-local FP8 error of every layer from one replay, then
the end-to-end DiT error for the top candidates when the first proxy does not separate them),
and stops every evaluation as soon as its prompts prove a failure.  The search itself is
greedy's: keep groups in proxy order until the criterion holds, then try each kept group out
again, so the answer is minimal in greedy's sense; only passing configurations are evaluated in
full, and every answer is one that was evaluated in full.

Steps:

1. FP8 everywhere (stopped early when it fails).  If it passes nothing is kept.
2. Proxies: layer-local scores of every group; end-to-end error for the contenders (groups
   within ``CONTENTION`` of the top score, at most ``E2E_TOP``) when there are several.
3. Greedy in proxy order, starting from every group within ``JUMP`` of the top layer-local
   score (a family sensitive in every block is kept at once rather than block by block), then
   minimised.  With several groups to start from, the first removal test runs before the start
   set itself: when it passes, the larger set is not evaluated (more BF16 is taken to pass).
4. With ``--refine``: the same, one level finer inside each kept group (cells
   ``transformer_blocks.N.family``), the rest of the answer kept.  When the proxy points at a
   single group, its cells are searched directly: a single sensitive block is found without
   evaluating its whole family first.
"""

from __future__ import annotations

import math

from layerscan.configs import describe
from layerscan.layers import Group
from layerscan.search.base import SearchContext, Strategy
from layerscan.search.greedy import GreedyStrategy
from layerscan.search.refine import (
    FINER, LayerSetEvaluator, RefinedStrategy, add_then_minimise, index_of,
)

E2E_TOP = 3  # at most this many contenders get an end-to-end proxy
CONTENTION = 4.0  # contenders: layer-local score within this factor of the top score
JUMP = 0.5  # start from every group scoring at least this fraction of the top score


class AutoStrategy(Strategy):
    name = "auto"
    needs_proxies = True

    def __init__(self, refine: bool = False) -> None:
        self.refine = refine

    def run(self, ctx: SearchContext) -> None:
        self.ctx = ctx
        self.log: list[str] = []
        self.notes = ctx.notes.setdefault("proxy", {})
        self.notes["log"] = self.log
        fp8_all = ctx.evaluate([], early_stop=True)
        self._note(fp8_all)
        if ctx.passes(fp8_all) or not ctx.groups:
            return
        index = index_of(ctx)
        try:
            self.proxies = ctx.proxies()
            self.proxies.layer_local()
        except (RuntimeError, TypeError, ValueError, KeyError) as exc:
            # A DiT whose calls cannot be recorded or replayed: greedy's own ranking instead.
            self.log.append(f"proxies unavailable ({type(exc).__name__}: {exc}); ran greedy")
            fallback = GreedyStrategy()
            (RefinedStrategy(fallback) if self.refine else fallback).run(ctx)
            return
        self.evaluate = LayerSetEvaluator(ctx, index)
        try:
            order, first = self._order(ctx.groups, [], "groups")
            refine = self.refine and any(g.granularity in FINER for g in ctx.groups)
            if self.refine and not refine:
                self.log.append("module granularity has nothing finer: not refined")
            if refine and first == 1:
                pieces = index.cells(order[0])
                if len(pieces) > 1:
                    self.log.append(f"the proxy points at `{order[0].pattern}` alone: searching "
                                    "its cells directly")
                    chosen = self._search(pieces, [], "cells")
                    if chosen is not None:
                        return
            kept = self._search(order, [], None, first)
            if kept is None or not refine:
                return
            for group in list(kept):
                pieces = index.cells(group)
                if len(pieces) < 2:
                    continue
                rest = [p for p in kept if p is not group]
                chosen = self._search(pieces, rest, "cells")
                if chosen is not None:
                    kept = rest + chosen
        finally:
            self.notes["cost"] = self.proxies.describe_cost()

    def _note(self, record) -> None:
        images = self.ctx.ledger.image_count
        if record.status == "stopped":
            verdict = f"stopped after {len(record.per_prompt)}/{images} prompts: fails"
        elif record.status == "failed":
            verdict = f"failed ({record.error})"
        else:
            verdict = "passes" if self.ctx.passes(record) else "fails"
        self.log.append(f"{describe(record.config)}: {verdict}")

    def _component_rank(self) -> dict[str, float]:
        """Components by how much their FP8 alone hurts (the run's attribution), worst first;
        a component without a measurement ranks by its proxy alone."""
        rank = {}
        for component, config in self.ctx.notes.get("attribution", {}).items():
            record = self.ctx.ledger.recorded(config)
            if record is not None:
                rank[component] = -self.ctx.loss(record) if not self.ctx.passes(record) else math.inf
        return rank

    def _order(self, parts: list[Group], rest: list[Group], key: str | None) -> tuple[list[Group], int]:
        """Parts in proxy order (most helpful to keep first) and how many to start with.

        Parts of different components are ordered component by component, the component whose
        FP8 alone hurts most first: layer-local errors of a DiT layer and a text-encoder layer
        are not on one scale.  A component quantized as a whole has no proxy: it comes in its
        component's place.
        """
        scores = {p.pattern: self.proxies.score(p.layers) for p in parts}
        components = list(dict.fromkeys(p.component for p in parts))
        rank = self._component_rank()
        position_in_profile = {c: i for i, c in enumerate(components)}
        components.sort(key=lambda c: (rank.get(c, 0.0), position_in_profile[c]))
        order: list[Group] = []
        first = 0
        e2e: dict[str, float] = {}
        dits = self.proxies.dit_components()  # DiTs with recorded calls: both Wan experts
        for position, component in enumerate(components):
            mine = sorted((p for p in parts if p.component == component), key=lambda p: -scores[p.pattern])
            top = scores[mine[0].pattern]
            if component in dits:
                contenders = [p for p in mine[:E2E_TOP] if top > 0 and scores[p.pattern] * CONTENTION >= top]
                if len(contenders) > 1:
                    for part in contenders:
                        e2e[part.pattern] = self.proxies.end_to_end(self.evaluate.patterns(
                            {n for p in rest + [part] for n in p.layers}), [component])
                    ranked = sorted(contenders, key=lambda p: e2e[p.pattern])
                    mine = ranked + [p for p in mine if p not in contenders]
                    self.log.append("end-to-end proxy ranked the contenders: " + ", ".join(
                        f"`{p.pattern}` {e2e[p.pattern]:.3g}" for p in ranked))
                elif len(mine) > 1 and scores[mine[1].pattern] > 0:
                    self.log.append(f"layer-local proxy is decisive: `{mine[0].pattern}` "
                                    f"scores {top / scores[mine[1].pattern]:.3g}× the next")
            if position == 0:
                first = sum(1 for p in mine if top > 0 and scores[p.pattern] >= JUMP * top) or 1
            order += mine
        if len(components) > 1:
            self.log.append("components in order of what their FP8 alone costs: " + ", ".join(components))
        if key is not None:
            entries = self.notes.setdefault(key, [])
            entries.extend(dict(pattern=p.pattern, layer_local=scores[p.pattern],
                                e2e=e2e.get(p.pattern)) for p in parts
                           if not any(e["pattern"] == p.pattern for e in entries))
        return order, first

    def _search(self, parts: list[Group], rest: list[Group], key: str | None,
                first: int | None = None) -> list[Group] | None:
        if first is None or key is not None:
            order, first = self._order(parts, rest, key)
        else:
            order = parts

        def evaluate(chosen: list[Group]):
            if not rest and all(p in self.ctx.groups for p in chosen):
                record = self.ctx.evaluate(chosen, early_stop=True)
            else:
                record = self.evaluate(rest + chosen, early_stop=True)
            self._note(record)
            return record

        return add_then_minimise(evaluate, self.ctx.passes, order, first, bool(rest), lazy=True)
