"""``layerscan run``: drive one strategy over a session, record everything, pick the answer."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from layerscan.engine import describe
from layerscan.evaluate import TrialRecord, evaluate, judge, still_decides, stop_when_failure_proven
from layerscan.layers import Group
from layerscan.proxy import capture_trajectory
from layerscan.search import STRATEGIES, make_strategy
from layerscan.search.base import BudgetExhausted, SearchContext
from layerscan.session import Session
from layerscan.store import TrialStore
from layerscan.workers import WorkerPool, shared_records, sharing_for


@dataclass
class RunOutcome:
    records: list[TrialRecord]  # every configuration known for these settings, BF16 first
    groups: list[Group]
    recommended: TrialRecord | None  # None: no configuration met the criterion
    pareto: list[TrialRecord]
    new_evaluations: int
    stop_reason: str  # "done", "budget", "timeout" or "interrupted"
    storage: str | None
    notes: dict = field(default_factory=dict)  # the strategy's own report (auto: proxy ranks, costs)


def recommend(records: list[TrialRecord], session: Session) -> TrialRecord | None:
    """The passing FP8 configuration that keeps the fewest BF16 bytes, then the best quality."""
    crit = session.study.criterion
    passing = [r for r in records if r.config is not None and r.passes and r.status != "failed"]
    return min(passing, key=lambda r: (r.bf16_kept_bytes, crit.loss(r.mean[crit.metric]),
                                       len(r.config)), default=None)


def pareto_front(records: list[TrialRecord], session: Session) -> list[TrialRecord]:
    """FP8 configurations no other configuration beats on both quality loss and BF16 bytes."""
    crit = session.study.criterion
    points = [(crit.loss(r.mean[crit.metric]), r.bf16_kept_bytes, r) for r in records
              if r.config is not None and r.status == "complete" and crit.metric in r.mean]
    front = [p for p in points if not any(
        (q[0] <= p[0] and q[1] <= p[1]) and (q[0] < p[0] or q[1] < p[1]) for q in points)]
    return [p[2] for p in sorted(front, key=lambda p: p[1])]


def run_study(session: Session, out_dir: Path, strategy: str | None = None,
              pool: WorkerPool | None = None) -> RunOutcome:
    study = session.study
    out_dir.mkdir(parents=True, exist_ok=True)
    store = TrialStore(out_dir / "trials.jsonl", session.eval_key)
    for record in store.records():  # measurements are reused; the verdict follows today's criterion
        judge(record, study.criterion)
    groups = session.loaded.index.groups(study.granularity)
    strategy_name = strategy or study.strategy
    storage = study.storage or f"sqlite:///{(out_dir / 'study.db').resolve()}"
    deadline = time.monotonic() + study.timeout_s if study.timeout_s else None
    crit = study.criterion
    new = 0
    bar = tqdm(desc=strategy_name, unit="cfg", leave=True)

    def best_label() -> str:
        best = recommend(store.records(), session)
        return describe(best.config) if best else "none passing yet"

    images = len(session.spec.items())

    def evaluate_patterns(patterns: tuple[str, ...] | None, early_stop: bool = False) -> TrialRecord:
        nonlocal new
        cached = store.get(patterns)
        # A stopped record answers again only a caller that stops early itself, and only while
        # its prompts still prove a failure under today's criterion; else it is measured again.
        if cached is not None and (cached.status != "stopped"
                                   or (early_stop and still_decides(cached, images, crit))):
            return cached
        # The budget covers every search trial recorded for these settings, so a resumed run
        # continues the same budget rather than starting a fresh one.
        if sum(r.config is not None for r in store.records()) >= study.max_trials:
            raise BudgetExhausted("budget")
        if deadline is not None and time.monotonic() > deadline:
            raise BudgetExhausted("timeout")
        bar.set_postfix_str(f"now: {describe(patterns)[:40]}")
        record = evaluate(session.engine, patterns, session.spec, session.baseline,
                          session.scorer, crit,
                          stop_rule=stop_when_failure_proven(crit, images) if early_stop else None)
        record.strategy = strategy_name
        store.add(record)
        new += 1
        bar.update(1)
        bar.set_postfix_str(f"best: {best_label()[:60]}")
        return record

    # Strategies that use proxies get the BF16 denoising trajectory recorded on the way.
    with capture_trajectory(session, enabled=strategy_name == "auto"):
        if store.get(None) is None:  # the BF16 reference row: timing and memory of the baseline
            evaluate_patterns(None)
    ctx = SearchContext(groups, crit, evaluate_patterns, seed=study.seed, storage=storage,
                        study_name=f"layerscan-{study.slug}-{session.eval_key[:8]}-{study.granularity}",
                        max_trials=study.max_trials, session=session,
                        refine=getattr(study, "refine", False))
    stop_reason = "done"
    try:
        chosen = make_strategy(strategy_name, ctx, store.records())
        if strategy_name == "optuna":  # a study other processes can join (layerscan.workers)
            chosen.sharing = sharing_for(session, pool)
        chosen.run(ctx)
    except BudgetExhausted as exc:
        stop_reason = str(exc)
    except KeyboardInterrupt:
        stop_reason = "interrupted"
    finally:
        bar.close()
        if pool is not None:  # the helper workers started for --gpus/--workers
            pool.wait(interrupted=stop_reason == "interrupted")
    records = store.records()
    if strategy_name == "optuna":  # with what other workers recorded in the shared study
        records = shared_records(records, storage, ctx.study_name, crit)
    records = sorted(records, key=lambda r: (r.config is not None, r.finished_at))
    return RunOutcome(records, groups, recommend(records, session), pareto_front(records, session),
                      new, stop_reason, storage if strategy_name == "optuna" else None, ctx.notes)
