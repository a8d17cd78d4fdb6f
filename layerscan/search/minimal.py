"""Proof that an answer keeps nothing it does not need.

A search may end on a passing configuration that keeps a group in BF16 for no reason (an Optuna
sample that happened to include it, a greedy step taken before a finer one made it redundant).
Before a recommendation is reported, each kept group is returned to FP8 on its own: the
configuration without it must be on record and fail.  One that passes instead and is the better
answer on the run's objective (fewer BF16 bytes, or faster, or better quality: ``prefer``)
becomes the recommendation and is proven in turn; one that passes but is worse on the objective
(slower, say: FP8 does not speed every layer up) leaves the group kept, for that measured reason.  The
evaluations go through the ledger like any other (known ones cost nothing, a failure stops
early, the trial budget counts them); when the budget ends first, the groups not yet proven
are named.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from layerscan.configs import Ignored
from layerscan.search.ledger import BudgetExhausted, TrialLedger


@dataclass
class MinimalityProof:
    """Per kept group of the recommendation, the configuration without it and its verdict."""

    config: Ignored | None  # the recommendation the proof is about (None: nothing passed)
    necessary: dict[str, tuple[str, ...]] = field(default_factory=dict)  # group -> without it
    # group -> without it: passes, but the answer with the group is better on the objective
    kept_for_objective: dict[str, tuple[str, ...]] = field(default_factory=dict)
    unproven: list[str] = field(default_factory=list)  # the budget ended before these were tried
    dropped: list[str] = field(default_factory=list)  # groups the search kept that were not needed
    stop_reason: str | None = None  # why the proof ended early ("budget", "timeout"), if it did

    @property
    def complete(self) -> bool:
        return self.config is not None and not self.unproven

    def as_dict(self) -> dict:
        return {"ignored_layers_patterns": list(self.config or ()),
                "necessary": {g: list(without) for g, without in self.necessary.items()},
                "kept_for_objective": {g: list(w) for g, w in self.kept_for_objective.items()},
                "unproven": self.unproven, "dropped": self.dropped}


def proof_reserve(max_trials: int, groups: int) -> int:
    """Trials a strategy that spends its whole budget (Optuna) leaves for the proof: one per
    group at most (returning each kept group to FP8 once), never more than a quarter of it."""
    return min(groups, max_trials // 4)


def prove_minimal(ledger: TrialLedger) -> MinimalityProof:
    """Prove every kept group of the ledger's recommendation necessary, dropping any that is not.

    Raises nothing the budget causes: an exhausted budget or deadline ends the proof with the
    groups still unproven listed (``stop_reason`` says which).
    """
    dropped: list[str] = []
    proofs: dict = {}  # by recommendation
    while True:
        rec = ledger.recommend()
        if rec is None:
            return MinimalityProof(None, dropped=dropped)
        if rec.config in proofs:  # back to an answer already proven (overlapping groups tie)
            return proofs[rec.config]
        proof = proofs[rec.config] = MinimalityProof(rec.config, dropped=dropped)
        kept = list(rec.config)
        withouts = [tuple(g for g in kept if g != group) for group in kept]
        try:  # independent of each other: one batch, spread over the run's workers
            records = ledger.evaluate_many([(without, True) for without in withouts])
        except BudgetExhausted as exc:
            records = [ledger.known(without, early_stop=True) for without in withouts]
            proof.stop_reason = str(exc)
        # Judged in the answer's order, as one at a time would: the first group found not needed
        # changes the answer, and the new answer is proven from the start.
        for group, without, record in zip(kept, withouts, records):
            if record is None:
                proof.unproven.append(group)
            elif record.status != "failed" and record.passes:
                if ledger.recommend().config != rec.config:
                    # A passing configuration better on the objective: the answer; prove that one.
                    dropped.append(group)
                    break
                proof.kept_for_objective[group] = without
            else:
                proof.necessary[group] = without
        else:
            return proof
