"""Optuna: one boolean per group, two objectives (quality loss, BF16-kept weight bytes).

The study lives in Optuna's own storage (SQLite under the output directory unless a URL is
given) and is resumed by name, so a rerun continues rather than restarts.  It is seeded with
FP8 everywhere, every group in BF16 and, when a greedy answer is known, that answer.
Configurations already evaluated (by this or any strategy) are answered from the trial store.

Many processes may work on one study at once (``layerscan worker``, ``--gpus``, ``--workers``);
the storage is then the only shared truth:

- Every trial declares its configuration (system attribute ``layerscan:config``) before it
  evaluates anything, and ``_claim`` decides from the storage alone whether it evaluates:
  a configuration already recorded by another trial is reused, one that a lower-numbered trial
  owns (running or queued) makes this trial a pruned duplicate, and a queued replacement (the
  nearest configuration nobody has) takes its place.  The lower trial number always wins, so
  two processes never evaluate the same configuration.
- Each evaluation's full record is stored on its trial (``layerscan:record``) so any process
  can rebuild the report from the study.
- Storages are opened with Optuna's heartbeat: a worker that dies mid-trial leaves a trial
  whose heartbeat stops; the next process to start a trial fails it and queues one retry
  (``RetryHeartbeatStaleTrialCallback(max_retry=1)``), and nobody finishes before every
  running trial has been resolved.
- The trial budget (``max_trials``) counts configurations evaluated in the whole study, and
  what the run measured before the search (the attribution) that the groups cannot express.
"""

from __future__ import annotations

import datetime as _dt
import functools
import itertools
import json
import logging
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from layerscan.evaluate import TrialRecord
from layerscan.search.base import BudgetExhausted, SearchContext, Strategy

PARAM_PREFIX = "bf16:"  # parameter names read "bf16:img_mlp" in optuna-dashboard
METRIC_NAMES = ["quality_loss", "bf16_kept_bytes"]

# Trial system attributes: machine-readable, shared by every process on the study.
CONFIG_ATTR = "layerscan:config"  # canonical configuration key, declared before evaluating
RECORD_ATTR = "layerscan:record"  # the TrialRecord of an evaluation made by this trial (or None)
WORKER_ATTR = "layerscan:worker"  # {"worker": label, "host": ..., "pid": ...}
DUPLICATE_ATTR = "layerscan:duplicate"  # pruned because another trial owns the configuration
# Study user attribute: the evaluations the search itself may make, set by the study's creator
# (the run's budget less what it measured before the search that the groups cannot express).
BUDGET_ATTR = "layerscan:search_budget"

DEFAULT_HEARTBEAT_S = 30
GRACE_FACTOR = 4  # a trial is stale after GRACE_FACTOR heartbeats without a beat
CLAIM_RECENT_S = 300  # running trials older than this that never declared a config are ignored
POLL_S = 0.2


class TrialFailed(Exception):
    """The configuration crashed or produced NaN; Optuna records the trial as FAIL."""


def config_key(patterns) -> str:
    """One string per configuration, whatever the order of its patterns."""
    return json.dumps(sorted(set(patterns)))


def open_storage(url: str | None, heartbeat_s: int | None = DEFAULT_HEARTBEAT_S):
    """An RDB storage for ``url`` with Optuna's heartbeat and one retry of stale trials.

    ``None`` stays Optuna's in-memory storage (no heartbeat).  SQLite waits for its lock
    instead of failing when several processes write at once.  One storage per server URL and
    heartbeat in a process: each storage holds its own connection pool, and a server's
    connection slots run out when every look at the study opens another.  SQLite files are
    opened afresh (no server to exhaust, and a pooled connection would outlive a deleted file).
    """
    if url is None:
        return None
    if url.startswith("sqlite"):
        return _storage.__wrapped__(url, int(heartbeat_s or 0))
    return _storage(url, int(heartbeat_s or 0))


@functools.lru_cache(maxsize=None)
def _storage(url: str, heartbeat_s: int):
    engine_kwargs: dict = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 120}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        kwargs: dict = {}
        if heartbeat_s:
            kwargs = dict(heartbeat_interval=int(heartbeat_s),
                          grace_period=GRACE_FACTOR * int(heartbeat_s),
                          heartbeat_stale_trial_callback=optuna.storages.
                          RetryHeartbeatStaleTrialCallback(max_retry=1))
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)


@dataclass
class Sharing:
    """How this process takes part in a study that other processes may share."""

    worker: str = "main"  # label recorded on every trial this process runs
    host: str = ""
    device: str = ""  # e.g. "cuda (NVIDIA H200)", recorded on each trial
    pid: int = 0
    seed_offset: int = 0  # distinct sampler seeds, so workers do not all propose the same thing
    heartbeat_s: int = DEFAULT_HEARTBEAT_S
    study_attrs: dict = field(default_factory=dict)  # the creator writes them (layerscan.workers)
    join_only: bool = False  # `layerscan worker`: the study must exist; never created nor seeded
    on_ready: Callable[[str, str], None] | None = None  # (name, URL) once the study exists

    @property
    def identity(self) -> dict:
        """What every trial this process runs records of it (``WORKER_ATTR``)."""
        return {"worker": self.worker, "host": self.host, "pid": self.pid}


def bf16_params(patterns: list[str], kept) -> dict[str, bool]:
    """The trial parameters of the configuration that keeps ``kept`` of ``patterns`` in BF16."""
    return {PARAM_PREFIX + p: p in kept for p in patterns}


# Optuna 5.0 has no public way to read or write a running trial's system attributes: ``Trial``
# no longer has ``system_attrs``/``set_system_attr``, and the storage's public methods take the
# trial's storage id, which ``Trial`` keeps only as the private ``_trial_id`` (its ``number`` is
# not that id, and mapping one to the other needs the study's private ``_study_id``).  These two
# are the only places that read it.
def _system_attrs(trial: optuna.Trial) -> dict:
    """The running trial's system attributes, as stored now."""
    return trial.storage.get_trial_system_attrs(trial._trial_id)


def _set_system_attr(trial: optuna.Trial, name: str, value) -> None:
    trial.storage.set_trial_system_attr(trial._trial_id, name, value)


def record_of(trial: FrozenTrial) -> dict | None:
    """The evaluation this trial made, if it made one.

    A retry inherits every system attribute of the trial it replaces; when the dead worker had
    stored its record before dying, the retry overwrites its copy with None once it runs
    (system attributes cannot be deleted).  Until then both trials carry the record, which is
    harmless: every reader counts configurations, not trials.
    """
    return trial.system_attrs.get(RECORD_ATTR)


def trial_key(trial: FrozenTrial, patterns: list[str]) -> str | None:
    """The configuration a trial declared, or the one its (fixed) parameters spell."""
    if CONFIG_ATTR in trial.system_attrs:
        return trial.system_attrs[CONFIG_ATTR]
    params = trial.system_attrs.get("fixed_params") or trial.params
    names = [PARAM_PREFIX + p for p in patterns]
    if not all(n in params for n in names):
        return None
    return config_key(p for p, n in zip(patterns, names) if params[n])


@dataclass
class Progress:
    """What the study holds, as every worker sees it."""

    evaluated: set[str]  # configurations with a record
    in_flight: set[str]  # configurations an unfinished, non-duplicate trial owns
    taken: set[str]  # evaluated, in flight or queued: nothing to gain from sampling these
    trials: int


def progress(study: optuna.Study, patterns: list[str], before: int | None = None) -> Progress:
    """The study's state; with ``before``, as trial number ``before`` sees it when it claims.

    Then only lower-numbered trials count as in flight: they have priority, so of two trials
    that both see the other in flight when one budget slot is left, the lower one evaluates
    (counting both, each would give way and the slot would stay unused).  A retry counts
    whatever its number: it evaluates without checking the budget (its slot is the one the dead
    trial held), so a lower trial must not take that slot too.
    """
    evaluated, in_flight, taken, count = set(), set(), set(), 0
    for t in study.get_trials(deepcopy=False):
        count += 1
        if t.number == before:
            continue
        key = trial_key(t, patterns)
        if key is None:
            continue
        if record_of(t) is not None:
            evaluated.add(key)
        elif (t.state in (TrialState.RUNNING, TrialState.WAITING)
              and not t.system_attrs.get(DUPLICATE_ATTR)
              and (before is None or t.number < before or "failed_trial" in t.system_attrs)):
            in_flight.add(key)
    taken = evaluated | in_flight
    return Progress(evaluated, in_flight, taken, count)


class OptunaStrategy(Strategy):
    name = "optuna"
    shares_study = True

    def __init__(self, greedy_answer: list[str] | None = None,
                 sharing: Sharing | None = None) -> None:
        self.greedy_answer = greedy_answer
        self.sharing = sharing
        self.evaluated_here = 0
        self._stop_reason: str | None = None

    def share(self, sharing: Sharing) -> None:
        self.sharing = sharing

    def records_elsewhere(self, ctx: SearchContext) -> list[TrialRecord]:
        """Every evaluation stored in the study, whichever process made it."""
        try:
            study = optuna.load_study(study_name=ctx.study_name, storage=open_storage(ctx.storage, None))
        except KeyError:  # no such study (the search stopped before creating it)
            return []
        return [TrialRecord.from_dict(data) for t in study.get_trials(deepcopy=False)
                if (data := record_of(t)) is not None]

    # --- the study ------------------------------------------------------------------------

    def open_study(self, ctx: SearchContext) -> optuna.Study:
        share = self.sharing or Sharing()
        storage = open_storage(ctx.storage, share.heartbeat_s)
        sampler = optuna.samplers.TPESampler(seed=ctx.seed + share.seed_offset, multivariate=True)
        if share.join_only:
            return optuna.load_study(study_name=ctx.study_name, storage=storage, sampler=sampler)
        study = optuna.create_study(
            study_name=ctx.study_name, storage=storage, load_if_exists=True,
            directions=["minimize", "minimize"], sampler=sampler,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(METRIC_NAMES)
        for key, value in share.study_attrs.items():
            study.set_user_attr(key, value)
        outside = self._publish_known(study, ctx)
        study.set_user_attr(BUDGET_ATTR, max(0, ctx.max_trials - outside))
        self._enqueue_seeds(study, ctx)
        return study

    def run(self, ctx: SearchContext) -> None:
        optuna.logging.set_verbosity(logging.WARNING)
        share = self.sharing or Sharing()
        study = self.open_study(ctx)
        if share.on_ready is not None:
            share.on_ready(ctx.study_name, ctx.storage)
        patterns = [g.pattern for g in ctx.groups]
        total = 2 ** len(patterns)
        budget = study.user_attrs.get(BUDGET_ATTR, ctx.max_trials)
        cap = max(3 * budget, budget + 50)  # trials, duplicates included
        rng = random.Random(f"{ctx.seed}-{share.seed_offset}-{share.pid}")
        self._stop_reason = None

        def done() -> bool:
            state = progress(study, patterns)
            return (len(state.evaluated) >= min(budget, total) or len(state.taken) >= total
                    or state.trials >= cap)

        def objective(trial: optuna.Trial) -> tuple[float, float]:
            attrs = _system_attrs(trial)
            # A stale trial's retry: every other trial counted it in flight since the dead one
            # started, so its budget slot is held for it (see progress).
            retry = "failed_trial" in attrs
            if retry:
                # It inherited the dead attempt's system attributes.  A record stored just before
                # the worker died stays on the failed trial, and this retry reuses it below; a
                # duplicate mark was that attempt's verdict, not this one's.
                _set_system_attr(trial, RECORD_ATTR, None)
                _set_system_attr(trial, DUPLICATE_ATTR, False)
            kept = [g for g in ctx.groups
                    if trial.suggest_categorical(PARAM_PREFIX + g.pattern, [False, True])]
            key = config_key(g.pattern for g in kept)
            set_sys = functools.partial(_set_system_attr, trial)
            set_sys(WORKER_ATTR, share.identity)
            set_sys(CONFIG_ATTR, key)
            trial.set_user_attr("worker", share.worker)
            trial.set_user_attr("device", share.device or "")
            trial.set_user_attr("ignored_layers", sorted(g.pattern for g in kept))
            verdict, other = self._claim(study, trial.number, key)
            if verdict == "recorded":
                record = ctx.ledger.answers(TrialRecord.from_dict(record_of(other)))
                if record is not None:
                    trial.set_user_attr("duplicate_of", other.number)
                    self._enqueue_neighbour(study, patterns, key, rng, budget)
                    return self._values(trial, record, ctx)
                # Stopped early under another criterion, it proves nothing under this one: this
                # trial measures it in full (the ledger continues it where it is this process's).
            if verdict == "owned":
                set_sys(DUPLICATE_ATTR, True)
                trial.set_user_attr("duplicate_of", other.number)
                self._enqueue_neighbour(study, patterns, key, rng, budget)
                raise optuna.TrialPruned(f"trial {other.number} evaluates this configuration")
            if not retry and len(progress(study, patterns, before=trial.number).taken
                                 - {key}) >= budget:
                set_sys(DUPLICATE_ATTR, True)  # not evaluated: the budget is spent
                trial.set_user_attr("skipped", "budget")
                study.stop()
                raise optuna.TrialPruned("trial budget spent")
            try:
                record = ctx.evaluate(kept)
            except BudgetExhausted as exc:
                self._stop_reason = str(exc)
                set_sys(DUPLICATE_ATTR, True)
                trial.set_user_attr("skipped", str(exc))
                study.stop()
                raise optuna.TrialPruned(str(exc))
            set_sys(RECORD_ATTR, record.to_dict())
            self.evaluated_here += 1
            return self._values(trial, record, ctx)

        def stop_when_done(study: optuna.Study, _trial) -> None:
            if self._stop_reason or done():
                study.stop()

        if not done():
            study.optimize(objective, catch=(TrialFailed,), callbacks=[stop_when_done])
        if self._stop_reason is None:
            self._drain(study, objective)
        if self._stop_reason:
            raise BudgetExhausted(self._stop_reason)

    # --- sharing the study ---------------------------------------------------------------

    def _claim(self, study: optuna.Study, number: int, key: str) -> tuple[str, FrozenTrial | None]:
        """Decide from the storage whether trial ``number`` evaluates configuration ``key``.

        "recorded": another trial has the record; "owned": a lower-numbered trial owns it
        (running, or queued with it); "evaluate": this trial does.  Trial numbers are handed
        out in creation order under a lock, so a lower-numbered trial exists whenever a higher
        one looks; while a lower one has not declared its configuration yet (microseconds
        after sampling) this trial waits.  Of two trials on one configuration, the higher one
        therefore always sees the lower and defers to it.
        """
        share = self.sharing or Sharing()
        deadline = time.monotonic() + GRACE_FACTOR * share.heartbeat_s + CLAIM_RECENT_S / 10
        while True:
            undeclared = False
            now = _dt.datetime.now()
            trials = study.get_trials(deepcopy=False)
            # A complete record answers before a stopped one (one continued later may exist).
            recorded = sorted((t for t in trials if t.number != number and record_of(t) is not None
                               and t.system_attrs.get(CONFIG_ATTR) == key),
                              key=lambda t: record_of(t).get("status") == "stopped")
            if recorded:
                return "recorded", recorded[0]
            for t in trials:
                same = t.system_attrs.get(CONFIG_ATTR) == key
                if t.number >= number:
                    continue
                if t.state == TrialState.WAITING and trial_key(t, _patterns_of(t)) == key:
                    return "owned", t
                if t.state == TrialState.RUNNING:
                    if CONFIG_ATTR not in t.system_attrs:
                        started = t.datetime_start or now
                        undeclared |= (now - started).total_seconds() < CLAIM_RECENT_S
                    elif same and not t.system_attrs.get(DUPLICATE_ATTR):
                        return "owned", t
            if not undeclared or time.monotonic() > deadline:
                return "evaluate", None
            time.sleep(POLL_S)

    def _enqueue_neighbour(self, study: optuna.Study, patterns: list[str], key: str,
                           rng: random.Random, budget: int) -> None:
        """Queue the nearest configuration nobody has evaluated, owns or queued yet.

        A duplicate proposal means the sampler wants to be near ``key``; the replacement
        keeps that intent without spending a trial on a configuration already known.
        """
        taken = progress(study, patterns).taken
        if len(taken) >= budget:
            return
        here = set(json.loads(key))
        n = len(patterns)
        for distance in range(1, n + 1):
            if math.comb(n, distance) > 4096:
                flips = [tuple(rng.sample(patterns, distance)) for _ in range(256)]
            else:
                flips = list(itertools.combinations(patterns, distance))
            candidates = sorted({config_key(here ^ set(f)) for f in flips} - taken)
            if candidates:
                kept = set(json.loads(rng.choice(candidates)))
                study.enqueue_trial(bf16_params(patterns, kept))
                return

    def _drain(self, study: optuna.Study, objective) -> None:
        """Before finishing: run queued trials (retries first) and wait for everyone's trials.

        A running trial whose worker died is failed by ``fail_stale_trials`` once its heartbeat
        is older than the grace period, and its retry is queued and run here or elsewhere.
        """
        while True:
            with warnings.catch_warnings():  # a no-op without heartbeat (in-memory storage)
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
            open_trials = study.get_trials(deepcopy=False,
                                           states=(TrialState.WAITING, TrialState.RUNNING))
            if any(t.state == TrialState.WAITING for t in open_trials):
                study.optimize(objective, n_trials=1, catch=(TrialFailed,))
                if self._stop_reason:
                    return
                continue
            # Only trials a layerscan worker declared are waited for: a RUNNING trial from some
            # other program (or an old version without heartbeats) would never resolve.
            if not any(WORKER_ATTR in t.system_attrs for t in open_trials):
                return
            time.sleep(POLL_S * 5)

    # --- one trial's answer --------------------------------------------------------------

    @staticmethod
    def _record_attrs(record: TrialRecord) -> dict:
        """The user attributes a trial shows for its record (optuna-dashboard reads them)."""
        attrs: dict = {"status": record.status}
        for metric, value in record.mean.items():
            attrs[f"{metric}_mean"] = value
            attrs[f"{metric}_worst"] = record.worst[metric]
        attrs["passes"] = bool(record.passes)
        attrs["weight_bytes_total"] = record.total_weight_bytes
        if record.seconds_per_image is not None:
            attrs["seconds_per_image"] = record.seconds_per_image
        if record.status == "failed":
            attrs["error"] = (record.error or "failed")[:200]
        return attrs

    @classmethod
    def _values(cls, trial: optuna.Trial, record: TrialRecord,
                ctx: SearchContext) -> tuple[float, float]:
        for name, value in cls._record_attrs(record).items():
            trial.set_user_attr(name, value)
        if record.status == "failed":
            raise TrialFailed(record.error or "failed")
        return ctx.loss(record), float(record.bf16_kept_bytes)

    def _publish_known(self, study: optuna.Study, ctx: SearchContext) -> int:
        """Put what the run measured before the search (the attribution, an earlier strategy's
        records) into the study as finished trials, so no worker of a shared study evaluates a
        configuration this process already has; the budget counts them, as the ledger does."""
        patterns = [g.pattern for g in ctx.groups]
        recorded = {t.system_attrs.get(CONFIG_ATTR) for t in study.get_trials(deepcopy=False)
                    if record_of(t) is not None}
        distributions = {PARAM_PREFIX + p: optuna.distributions.CategoricalDistribution([False, True])
                         for p in patterns}
        share = self.sharing or Sharing()
        outside = 0
        for record in ctx.ledger.records():
            if record.config is None:
                continue
            if not set(record.config) <= set(patterns):
                outside += 1  # e.g. a whole component in BF16 where the groups are its families
                continue
            key = config_key(record.config)
            if key in recorded:
                continue
            failed = record.status == "failed"
            study.add_trial(optuna.trial.create_trial(
                params=bf16_params(patterns, record.config),
                distributions=distributions,
                values=None if failed else [ctx.loss(record), float(record.bf16_kept_bytes)],
                state=TrialState.FAIL if failed else TrialState.COMPLETE,
                system_attrs={CONFIG_ATTR: key, RECORD_ATTR: record.to_dict(),
                              WORKER_ATTR: share.identity},
                user_attrs={"worker": share.worker, "known_before_search": True,
                            "ignored_layers": sorted(record.config),
                            **self._record_attrs(record)}))
            recorded.add(key)
        return outside

    def _enqueue_seeds(self, study: optuna.Study, ctx: SearchContext) -> None:
        patterns = [g.pattern for g in ctx.groups]
        seeds = [set(), set(patterns)]
        if self.greedy_answer is not None:
            seeds.insert(1, set(self.greedy_answer))
        done = [t.params for t in study.trials]
        for kept in seeds:
            params = bf16_params(patterns, kept)
            if params not in done:
                study.enqueue_trial(params, skip_if_exists=True)
                done.append(params)


def _patterns_of(trial: FrozenTrial) -> list[str]:
    """Group patterns named by a queued trial's fixed parameters (or its parameters)."""
    params = trial.system_attrs.get("fixed_params") or trial.params
    return [name[len(PARAM_PREFIX):] for name in params if name.startswith(PARAM_PREFIX)]
