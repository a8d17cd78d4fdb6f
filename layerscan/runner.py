"""``layerscan run``: attribution first, then one strategy over the run's trial ledger."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from layerscan.configs import describe
from layerscan.evaluate import TrialRecord
from layerscan.layers import Group, qualify
from layerscan.search import make_strategy
from layerscan.search.base import SearchContext
from layerscan.search.ledger import BudgetExhausted, TrialLedger
from layerscan.search.minimal import MinimalityProof, proof_reserve, prove_minimal
from layerscan.session import Session


# Why a search ended, when it did not end by finishing: each makes the answer provisional, and
# every output that carries the answer says so with this explanation.
NOT_FINAL = {
    "budget": "the trial budget ran out before the search finished; rerun with a larger "
              "--max-trials to finish it",
    "timeout": "the time limit ended the search before it finished; rerun the same command to "
               "continue it",
    "interrupted": "the run was interrupted before the search finished; rerun the same command "
                   "to resume it",
    "unproven": "the trial budget or the time limit ran out before every kept group was shown "
                "needed; rerun with a larger --max-trials (or --timeout) to prove or drop them",
}


@dataclass
class RunOutcome:
    ledger: TrialLedger
    records: list[TrialRecord]  # every configuration known for these settings, BF16 first
    groups: list[Group]
    recommended: TrialRecord | None  # None: no configuration met the criterion
    pareto: list[TrialRecord]
    stop_reason: str  # "done", or a key of NOT_FINAL
    storage: str | None
    attribution: dict[str, tuple[str, ...]]  # component -> the configuration with it alone in FP8
    notes: dict = field(default_factory=dict)  # the strategy's own report (auto: proxy ranks, costs)
    # What the target release's own code said of the recommendation (layerscan.target_check).
    target_check: dict | None = None
    # Each kept group of the recommendation shown necessary (None: not attempted, interrupted).
    minimality: MinimalityProof | None = None
    # Where this invocation's time went up to its report (layerscan.clock.timing_since).
    timing: dict | None = None

    @property
    def final(self) -> bool:
        """The strategy finished: its answer is the study's, not the best one so far."""
        return self.stop_reason == "done"

    @property
    def why_not_final(self) -> str | None:
        return None if self.final else NOT_FINAL.get(self.stop_reason, self.stop_reason)

    @property
    def new_evaluations(self) -> int:
        return self.ledger.new_evaluations

    def evaluated_now_text(self) -> str:
        """What this invocation evaluated, e.g. "16 evaluated now, one continued from an early stop"."""
        text = f"{self.new_evaluations} evaluated now"
        continued = self.ledger.continued
        if continued:
            text += f", {'one' if continued == 1 else continued} continued from an early stop"
        return text


def attribution_configs(session: Session) -> dict[str, tuple[str, ...]]:
    """Each quantized component alone in FP8 (every other component kept whole in BF16).

    With one component that is FP8 everywhere itself.  Every run measures these first and the
    report leads with them: they say which component sets the floor of what FP8 can reach.
    """
    components = session.loaded.index.components
    return {c: tuple(sorted(qualify(o, "") for o in components if o != c)) for c in components}


def run_study(session: Session, out_dir: Path, strategy: str | None = None, pool=None) -> RunOutcome:
    study = session.study
    out_dir.mkdir(parents=True, exist_ok=True)
    strategy_name = strategy or study.strategy
    deadline = time.monotonic() + study.timeout_s if study.timeout_s else None

    def started(config) -> None:
        bar.set_postfix_str(f"now: {describe(config)[:40]}")

    def recorded(record: TrialRecord) -> None:
        bar.update(1)
        bar.set_postfix_str(f"best: {ledger.best_label()[:60]}")

    # The ledger first: what it says on opening the records (a torn line set aside) gets a line
    # of its own, not the progress bar's.
    ledger = TrialLedger(session, out_dir, strategy_name, deadline, on_record=recorded, on_start=started)
    bar = tqdm(desc=strategy_name, unit="cfg", leave=True)
    groups = session.loaded.index.groups(study.granularity, study.text_encoder_granularity)
    storage = study.storage or f"sqlite:///{(out_dir / 'study.db').resolve()}"
    ctx = SearchContext(ledger, groups, session.criterion, seed=study.seed, storage=storage,
                        study_name=f"layerscan-{study.slug}-{session.eval_key[:8]}-{study.granularity}",
                        max_trials=study.max_trials - proof_reserve(study.max_trials, len(groups)),
                        index=session.loaded.index, refine=study.refine)
    attribution = attribution_configs(session)
    ctx.notes["attribution"] = {c: list(config) for c, config in attribution.items()}
    chosen = make_strategy(strategy_name, ctx, ledger.records())
    if pool is not None and not chosen.shares_study:  # its batches spread over the workers
        ledger.pool = pool
        pool.start(session.eval_key)  # they load while the attribution is measured
    if chosen.needs_proxies:  # declared need: built here, from the pipeline the strategy never sees
        from layerscan.proxy.scores import Proxies

        ctx.proxies = lambda: Proxies(session)
    if chosen.shares_study:  # a study other processes can join (layerscan.workers)
        from layerscan.workers import sharing_for

        chosen.share(sharing_for(session, pool))
    stop_reason = "done"
    try:
        # Early stopping keeps a failing component cheap to attribute; a strategy that needs
        # more of one of these evaluations continues it rather than starting again.
        ledger.evaluate((), early_stop=True)
        for config in attribution.values():
            ledger.evaluate(config, early_stop=True)
        chosen.run(ctx)
    except BudgetExhausted as exc:
        stop_reason = str(exc)
    except KeyboardInterrupt:
        stop_reason = "interrupted"
    finally:
        if pool is not None and chosen.shares_study:  # Optuna's helpers, joined to its study
            pool.wait(interrupted=stop_reason == "interrupted")
    ledger.add_elsewhere(chosen.records_elsewhere(ctx))
    proof = None
    try:
        if stop_reason != "interrupted":  # Ctrl-C means now, not after more evaluations
            proof = prove_minimal(ledger)
            if stop_reason == "done" and proof.stop_reason:
                stop_reason = "unproven"  # the answer may keep a group it does not need
    except KeyboardInterrupt:
        stop_reason = "interrupted"
    finally:
        bar.close()
        if ledger.pool is not None:  # the batch helpers: done, or killed on Ctrl-C
            ledger.pool.close(interrupted=stop_reason == "interrupted")
    return RunOutcome(ledger, ledger.records(), groups, ledger.recommend(), ledger.pareto(),
                      stop_reason, storage if chosen.shares_study else None, attribution, ctx.notes,
                      minimality=proof)
