"""Many workers on one Optuna study: shared spec, no configuration twice, dead workers retried.

The PostgreSQL tests need a server: .ci/run starts one and sets LAYERSCAN_TEST_POSTGRES to a
SQLAlchemy URL (e.g. postgresql+psycopg2://user:password@127.0.0.1:5432/db).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
import warnings
from collections import Counter
from pathlib import Path

import optuna
import pytest
import torch
from sqlalchemy.engine import make_url

from layerscan.cli import main
from layerscan.evaluate import TrialRecord
from layerscan.layers import Group
from layerscan.search.base import SearchContext
from layerscan.search.minimal import proof_reserve
from layerscan.search.optuna_search import (
    CONFIG_ATTR, DUPLICATE_ATTR, PARAM_PREFIX, RECORD_ATTR, WORKER_ATTR, OptunaStrategy, config_key,
    Sharing, open_storage, progress, record_of, trial_key,
)
from layerscan.study import build_study, load_study
from layerscan.workers import SPEC_ATTR, pool_for_run, redact_url, study_values

POSTGRES = os.environ.get("LAYERSCAN_TEST_POSTGRES")
needs_postgres = pytest.mark.skipif(
    not POSTGRES, reason="set LAYERSCAN_TEST_POSTGRES to a PostgreSQL SQLAlchemy URL "
                         "(.ci/run starts a server and sets it)")
CRITERION = ["--criterion-metric", "psnr", "--criterion-mean", "37", "--criterion-worst", "35"]
PLANTED_ANSWER = ["img_mlp"]




def _run_argv(model, out: Path, prompts: Path, *extra: str) -> list[str]:
    return ["run", "--model", str(model), "--study", "tiny-qwen-image", "--prompts", str(prompts),
            "--out", str(out), "--strategy", "optuna", *CRITERION, *extra]


def _spawn(argv: list[str], logs: Path) -> subprocess.Popen:
    """``layerscan`` in a process of its own; every worker of it runs torch on one thread.

    Output goes to files (``logs``.out/.err): a full pipe would stall the process.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LAYERSCAN_HEARTBEAT": "1",
           "OMP_NUM_THREADS": "1"}
    with open(f"{logs}.out", "w") as out, open(f"{logs}.err", "w") as err:
        return subprocess.Popen([sys.executable, "-m", "layerscan.cli", *argv], env=env,
                                stdout=out, stderr=err, text=True)


def _finish(proc: subprocess.Popen, logs: Path, timeout: float = 600) -> tuple[str, str]:
    proc.wait(timeout=timeout)
    return Path(f"{logs}.out").read_text(), Path(f"{logs}.err").read_text()


def _configs(path: Path) -> list[str]:
    """The FP8 configurations a process evaluated, from its own trials.jsonl."""
    if not path.exists():
        return []
    records = [json.loads(line)["record"] for line in path.read_text().splitlines()]
    return [config_key(r["config"]) for r in records if r["config"] is not None]


def _study(url: str, slug: str) -> optuna.Study:
    storage = open_storage(url, None)
    names = [n for n in optuna.get_all_study_names(storage) if f"-{slug}-" in n]
    assert len(names) == 1, names
    return optuna.load_study(study_name=names[0], storage=storage)


def test_storage_urls_are_redacted():
    assert redact_url("postgresql+psycopg2://me:pw@db/x") == "postgresql+psycopg2://me:***@db/x"
    assert redact_url("postgresql://me@db/x") == "postgresql://me@db/x"
    assert redact_url("sqlite:////tmp/a@b/study.db") == "sqlite:////tmp/a@b/study.db"
    assert redact_url(None) is None


def test_study_spec_round_trips_through_json(two_prompts):
    values = load_study("tiny-qwen-image")
    values.update(model="tiny-qwen-image", prompts=str(two_prompts), criterion_metric="psnr",
                  criterion_mean=37.0, criterion_worst=35.0, storage="postgresql://u:pw@h/db")
    study = build_study(values)
    spec = study_values(study)
    assert "storage" not in spec and "pw" not in json.dumps(spec)
    rebuilt = build_study(json.loads(json.dumps(spec)))
    assert rebuilt.criterion == study.criterion and rebuilt.seeds == study.seeds
    for name in ("model", "steps", "metrics", "granularity", "max_trials"):
        assert getattr(rebuilt, name) == getattr(study, name)
    assert rebuilt.strategy == "optuna" and Path(rebuilt.prompts) == two_prompts.resolve()


def test_claim_lets_the_lower_trial_number_win(tmp_path):
    """The rule that keeps two workers off one configuration, on a real (SQLite) storage."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}",
                                directions=["minimize", "minimize"])
    storage = study._storage
    strategy = OptunaStrategy()
    key = config_key(["img_mlp"])
    low, high = study.ask(), study.ask()
    for trial in (low, high):
        storage.set_trial_system_attr(trial._trial_id, CONFIG_ATTR, key)
    assert strategy._claim(study, low.number, key) == ("evaluate", None)
    verdict, owner = strategy._claim(study, high.number, key)
    assert verdict == "owned" and owner.number == low.number
    # Once the owner has its record, every later proposal of the configuration reuses it.
    storage.set_trial_system_attr(low._trial_id, RECORD_ATTR, {"config": ["img_mlp"]})
    later = study.ask()
    storage.set_trial_system_attr(later._trial_id, CONFIG_ATTR, key)
    verdict, owner = strategy._claim(study, later.number, key)
    assert verdict == "recorded" and owner.number == low.number
    # A queued (WAITING) lower trial with the same parameters owns its configuration too.
    other = config_key(["to_qkv"])
    study.enqueue_trial({PARAM_PREFIX + "img_mlp": False, PARAM_PREFIX + "to_qkv": True})
    fresh = storage.get_trial(storage.create_new_trial(study._study_id))  # running, behind it
    storage.set_trial_system_attr(fresh._trial_id, CONFIG_ATTR, other)
    verdict, owner = strategy._claim(study, fresh.number, other)
    assert verdict == "owned" and owner.state == optuna.trial.TrialState.WAITING


def test_last_budget_slot_goes_to_the_lower_trial(tmp_path):
    """Two trials that each see the other in flight with one slot left: exactly one gives way."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}",
                                directions=["minimize", "minimize"])
    storage, patterns = study._storage, ["img_mlp", "to_qkv"]
    done, low, high = study.ask(), study.ask(), study.ask()
    storage.set_trial_system_attr(done._trial_id, CONFIG_ATTR, config_key([]))
    storage.set_trial_system_attr(done._trial_id, RECORD_ATTR, {"config": []})
    for trial, kept in ((low, ["img_mlp"]), (high, ["to_qkv"])):
        storage.set_trial_system_attr(trial._trial_id, CONFIG_ATTR, config_key(kept))
    budget = 2  # one evaluation made, one slot left, two claimants
    seen_by_low = progress(study, patterns, before=low.number).taken - {config_key(["img_mlp"])}
    seen_by_high = progress(study, patterns, before=high.number).taken - {config_key(["to_qkv"])}
    assert len(seen_by_low) < budget <= len(seen_by_high)


def test_a_queued_retry_holds_its_budget_slot(tmp_path):
    """A retry evaluates without a budget check, so lower trials must count it as in flight."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}",
                                directions=["minimize", "minimize"])
    storage, patterns = study._storage, ["img_mlp", "to_qkv"]
    low = study.ask()
    storage.set_trial_system_attr(low._trial_id, CONFIG_ATTR, config_key(["img_mlp"]))
    study.add_trial(optuna.trial.create_trial(  # queued after `low`, as Optuna queues retries
        state=optuna.trial.TrialState.WAITING,
        system_attrs={"failed_trial": 0, CONFIG_ATTR: config_key(["to_qkv"])}))
    assert progress(study, patterns, before=low.number).taken == {config_key(["to_qkv"])}


def test_retry_reuses_the_record_its_dead_worker_stored(planted_dir, two_prompts, tmp_path):
    """A worker that died between storing its record and finishing the trial: the retry
    inherits the record, must not evaluate again, and must not count as a second record."""
    from layerscan.search.ledger import TrialLedger
    from layerscan.session import open_session

    values = load_study("tiny-qwen-image")
    values.update(model=str(planted_dir), prompts=str(two_prompts), components=["transformer"],
                  criterion_metric="psnr", criterion_mean=37.0, criterion_worst=35.0)
    session = open_session(build_study(values), "cpu", warn=lambda m: None)
    groups = [Group(p, "family", (f"transformer_blocks.0.{p}",), 10) for p in ("img_mlp", "to_qkv")]
    url, name = f"sqlite:///{tmp_path / 's.db'}", "retry"
    study = optuna.create_study(study_name=name, storage=url, directions=["minimize", "minimize"])
    dead = study.ask({PARAM_PREFIX + g.pattern: optuna.distributions.CategoricalDistribution(
        [False, True]) for g in groups})
    dead_key = trial_key(study._storage.get_trial(dead._trial_id), [g.pattern for g in groups])
    kept = sorted(json.loads(dead_key))
    for attr, value in ((CONFIG_ATTR, dead_key), (WORKER_ATTR, {"worker": "w1", "pid": 0}),
                        (RECORD_ATTR, TrialRecord(tuple(kept), "complete", mean={"psnr": 40.0},
                                                  worst={"psnr": 39.0}).to_dict())):
        study._storage.set_trial_system_attr(dead._trial_id, attr, value)
    study._storage.set_trial_state_values(dead._trial_id, optuna.trial.TrialState.FAIL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry_callback = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
    retry_callback(study, study.trials[dead.number])  # what the heartbeat check does

    ledger = TrialLedger(session, tmp_path / "out", "optuna")
    ctx = SearchContext(ledger, groups, session.criterion, storage=url, study_name=name,
                        max_trials=4)
    OptunaStrategy(sharing=Sharing(heartbeat_s=0)).run(ctx)
    trials = optuna.load_study(study_name=name, storage=url).trials
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == dead.number)
    assert retry.state == optuna.trial.TrialState.COMPLETE and record_of(retry) is None
    asked = [config_key(c) for c in ledger.asked if c is not None]
    assert dead_key not in asked and sorted(asked) == sorted(set(asked))
    assert ledger.new_evaluations == 3  # the other three configurations, each once
    recorded = [t.system_attrs[CONFIG_ATTR] for t in trials if record_of(t) is not None]
    assert sorted(recorded) == sorted(set(recorded)) and len(recorded) == 4


def test_a_shared_study_starts_with_what_the_run_measured_before_it(planted_dir, two_prompts, tmp_path):
    """The attribution's records enter the study as finished trials, with the attributes the
    dashboard shows; the search reuses them (a stopped one while it still proves failure), the
    whole-component one the groups cannot express is left out and counted against the budget."""
    from layerscan.search.ledger import TrialLedger
    from layerscan.search.optuna_search import BUDGET_ATTR
    from layerscan.session import open_session

    values = load_study("tiny-qwen-image")
    values.update(model=str(planted_dir), prompts=str(two_prompts), components=["transformer"],
                  criterion_metric="psnr", criterion_mean=45.0, criterion_worst=40.0)
    session = open_session(build_study(values), "cpu", warn=lambda m: None)
    ledger = TrialLedger(session, tmp_path / "out", "optuna")
    fp8_all = ledger.evaluate([], early_stop=True)  # what the attribution does
    assert fp8_all.status == "stopped"
    ledger.evaluate(["transformer:"])  # the whole DiT in BF16: no group expresses it
    groups = [Group(p, "family", (f"transformer_blocks.0.{p}",), 10) for p in ("img_mlp", "to_qkv")]
    url, name = f"sqlite:///{tmp_path / 's.db'}", "known"
    ctx = SearchContext(ledger, groups, session.criterion, storage=url, study_name=name, max_trials=4)
    OptunaStrategy(sharing=Sharing(heartbeat_s=0)).run(ctx)
    study = optuna.load_study(study_name=name, storage=url)
    assert study.user_attrs[BUDGET_ATTR] == 3  # four on record at most, one outside the study
    known = [t for t in study.trials if t.user_attrs.get("known_before_search")]
    assert [t.system_attrs[CONFIG_ATTR] for t in known] == ["[]"]
    assert known[0].user_attrs["status"] == "stopped" and known[0].user_attrs["passes"] is False
    assert "psnr_mean" in known[0].user_attrs
    recorded = [t.system_attrs[CONFIG_ATTR] for t in study.trials if record_of(t) is not None]
    assert sorted(recorded) == sorted(set(recorded)) and len(recorded) == 3
    assert ledger.new_evaluations == 2 + 2  # the two before the search, two by it
    assert ledger.fp8_on_record() == 4


def test_baseline_is_built_once_by_concurrent_processes(planted_dir, two_prompts, tmp_path):
    script = textwrap.dedent(f"""
        import torch; torch.set_num_threads(1)
        from layerscan.session import open_session
        from layerscan.study import Criterion, build_study, load_study
        values = load_study("tiny-qwen-image")
        values.update(model={str(planted_dir)!r}, prompts={str(two_prompts)!r})
        session = open_session(build_study(values), "cpu")
        print("cached" if session.baseline.cached else "built")
    """)
    env = {**os.environ, "LAYERSCAN_CACHE": str(tmp_path / "fresh-cache")}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    assert sorted(out.split()[-1] for out, _ in outs) == ["built", "cached"]


def test_each_strategy_gets_the_pool_it_spreads_over(tmp_path, monkeypatch):
    from layerscan.batch import EvaluationPool

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # this process keeps its own
    args = argparse.Namespace(gpus=None, workers=2, device="cpu", trust_remote_code=False,
                              allow_missing_lpips=False, cache_dir=None)
    values = load_study("tiny-qwen-image")
    values.update(model="tiny-qwen-image")
    for strategy in ("greedy", "exhaustive", "auto"):
        study = build_study({**values, "strategy": strategy})
        pool = pool_for_run(args, study, tmp_path)
        assert isinstance(pool, EvaluationPool) and [s.label for s in pool.slots] == ["w1"]
        assert pool.study_values["strategy"] == strategy and not pool.started
    pool = pool_for_run(args, argparse.Namespace(strategy="optuna"), tmp_path)
    assert [s.label for s in pool.slots] == ["w1"] and pool.parent_label == "w0"
    gpus = argparse.Namespace(**{**vars(args), "gpus": [2, 3], "workers": None, "device": None})
    pool = pool_for_run(gpus, argparse.Namespace(strategy="optuna"), tmp_path)
    assert gpus.device == "cuda:2" and pool.slots[0].env == {"CUDA_VISIBLE_DEVICES": "3"}


def test_worker_needs_an_existing_study(tmp_path, capsys):
    assert main(["worker", "--study", "nope", "--storage", f"sqlite:///{tmp_path / 'x.db'}"]) == 2
    assert "no study 'nope'" in capsys.readouterr().err


@needs_postgres
def test_two_workers_evaluate_every_configuration_once(planted_dir, two_prompts, tmp_path):
    slug = f"two-{uuid.uuid4().hex[:8]}"
    url, budget = POSTGRES, 40
    out = tmp_path / "run"
    proc = _spawn(_run_argv(planted_dir, out, two_prompts, "--storage", url, "--workers", "2",
                            "--max-trials", str(budget), "--name", slug), tmp_path / "run")
    stdout, stderr = _finish(proc, tmp_path / "run")
    assert proc.returncode == 0, stderr[-3000:]
    password = make_url(url).password
    log = (out / "workers" / "w1" / "worker.log").read_text()
    assert password and f":{password}@" not in stdout + stderr + log  # URLs are shown redacted
    mine, helper = _configs(out / "trials.jsonl"), _configs(out / "workers" / "w1" / "trials.jsonl")
    evaluated = mine + helper
    assert helper, "the second worker evaluated nothing"
    assert [c for c, n in Counter(evaluated).items() if n > 1] == []  # nobody evaluated twice
    study = _study(url, slug)
    recorded = [t.system_attrs[CONFIG_ATTR] for t in study.trials if record_of(t) is not None]
    # Optuna's trials spend the budget less the proof's reserve; everything else this process
    # evaluated proves the answer minimal: each a configuration with one kept group returned to
    # FP8.  (Under vllm-omni==0.30.0 the planted Qwen-Image quantizes its DiT alone, so the
    # attribution's one configuration, all FP8, is in the study too.)
    assert len(recorded) == budget - proof_reserve(budget, 6)
    rec = json.loads((out / "recommendation.json").read_text())
    assert rec["minimality"]["unproven"] == [] and rec["final"] is True
    records = [json.loads(line)["record"] for path in (out / "trials.jsonl", out / "workers" / "w1" / "trials.jsonl")
               for line in path.read_text().splitlines()]
    passing = [set(r["config"]) for r in records if r["passes"] and r["config"] is not None]
    proving = [c for c in mine if c not in recorded]  # each a passing configuration less one group
    assert all(any(set(json.loads(c)) < p and len(p) == len(json.loads(c)) + 1 for p in passing)
               for c in proving)
    assert sorted(recorded + proving) == sorted(evaluated)
    assert len(evaluated) <= budget
    for t in study.trials:  # proposals of a known configuration were answered without evaluating
        if record_of(t) is None and t.state == optuna.trial.TrialState.COMPLETE:
            assert "duplicate_of" in t.user_attrs
    assert set(study.user_attrs) >= {SPEC_ATTR, "eval_key", "prompts", "groups", "heartbeat_s"}
    assert rec["evaluated_configurations"] == len(evaluated)
    assert f"{len(evaluated)} FP8 configurations on record" in stdout


@needs_postgres
def test_killed_worker_is_retried_and_the_answer_is_unchanged(planted_dir, two_prompts, tmp_path):
    # Every one of the 2^6 configurations of the DiT's families, so the answer does not depend
    # on sampling order (70 trials: 64 for Optuna, 6 left for proving the answer minimal).  The
    # single-worker run goes on beside the two-worker one (they share nothing).
    dit_only = ("--components", "transformer")
    reference = _spawn(_run_argv(planted_dir, tmp_path / "single", two_prompts,
                                 "--max-trials", "70", *dit_only), tmp_path / "single")
    slug = f"kill-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "two"
    proc = _spawn(_run_argv(planted_dir, out, two_prompts, "--storage", POSTGRES, "--workers", "2",
                            "--max-trials", "70", "--name", slug, *dit_only), tmp_path / "two")
    killed = None
    storage = open_storage(POSTGRES, None)  # one connection pool for all the looking below
    deadline = time.monotonic() + 300
    while killed is None and time.monotonic() < deadline and proc.poll() is None:
        names = [n for n in optuna.get_all_study_names(storage) if f"-{slug}-" in n]
        study = optuna.load_study(study_name=names[0], storage=storage) if names else None
        trials = study.get_trials(deepcopy=False) if study else []
        recorded = {t.system_attrs.get(CONFIG_ATTR) for t in trials
                    if record_of(t) is not None}
        helper_done = [t for t in trials if record_of(t) is not None
                       and t.system_attrs.get(WORKER_ATTR, {}).get("worker") == "w1"]
        for t in trials:  # the helper's trial, past its claim, on a configuration nobody has
            who = t.system_attrs.get(WORKER_ATTR, {})
            if (helper_done and len(recorded) >= 24
                    and t.state == optuna.trial.TrialState.RUNNING
                    and who.get("worker") == "w1" and CONFIG_ATTR in t.system_attrs
                    and not t.system_attrs.get(DUPLICATE_ATTR)
                    and t.system_attrs[CONFIG_ATTR] not in recorded):
                os.kill(who["pid"], signal.SIGKILL)
                killed = t.number
                break
        time.sleep(0.02)
    stdout, stderr = _finish(proc, tmp_path / "two")
    assert killed is not None, "never caught the helper worker mid-trial"
    assert proc.returncode == 0, stderr[-3000:]
    assert "worker w1 was killed by signal 9" in stderr
    assert _configs(out / "workers" / "w1" / "trials.jsonl")  # it had contributed before
    _, reference_err = _finish(reference, tmp_path / "single")
    assert reference.returncode == 0, reference_err[-3000:]
    single = json.loads((tmp_path / "single" / "recommendation.json").read_text())
    assert single["ignored_layers_patterns"] == PLANTED_ANSWER

    study = _study(POSTGRES, slug)
    trials = {t.number: t for t in study.trials}
    assert trials[killed].state == optuna.trial.TrialState.FAIL  # found stale by its heartbeat
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1 and retries[0].state == optuna.trial.TrialState.COMPLETE
    assert retries[0].system_attrs[CONFIG_ATTR] == trials[killed].system_attrs[CONFIG_ATTR]
    assert not any(t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
                   for t in study.trials)
    recorded = [t.system_attrs[CONFIG_ATTR] for t in study.trials if record_of(t) is not None]
    assert len(recorded) == len(set(recorded)) == 64
    assert json.loads((out / "recommendation.json").read_text())["minimality"]["necessary"] == {"img_mlp": []}
    two = json.loads((out / "recommendation.json").read_text())
    assert two["quantization_config"] == single["quantization_config"]


@pytest.mark.parametrize("strategy", ["greedy", "auto"])
def test_a_batch_strategy_on_two_workers_gives_the_one_worker_answer(planted_dir, two_prompts, tmp_path, strategy):
    """Greedy's groups alone and the minimality proof's removals are batches: a helper process
    evaluates some, this process the others; nothing is evaluated twice and the answer is the
    one worker's (the planted img_mlp)."""
    argv = ["run", "--model", str(planted_dir), "--study", "tiny-qwen-image", "--prompts",
            str(two_prompts), *CRITERION, "--strategy", strategy, "--components", "transformer"]
    single = _spawn([*argv, "--out", str(tmp_path / "one")], tmp_path / "one")
    two = _spawn([*argv, "--out", str(tmp_path / "two"), "--workers", "2"], tmp_path / "two")
    for proc, name in ((single, "one"), (two, "two")):
        _, err = _finish(proc, tmp_path / name)
        assert proc.returncode == 0, err[-3000:]
    one_rec = json.loads((tmp_path / "one" / "recommendation.json").read_text())
    two_rec = json.loads((tmp_path / "two" / "recommendation.json").read_text())
    assert two_rec["ignored_layers_patterns"] == one_rec["ignored_layers_patterns"] == PLANTED_ANSWER
    assert two_rec["final"] and two_rec["minimality"]["necessary"] == {"img_mlp": []}
    evaluated = _configs(tmp_path / "two" / "trials.jsonl")
    records = [json.loads(line)["record"] for line in (tmp_path / "two" / "trials.jsonl").read_text().splitlines()]
    complete = [config_key(r["config"]) for r in records if r["status"] != "stopped"]
    assert len(complete) == len(set(complete))  # nobody evaluated a configuration twice
    assert set(evaluated) == set(_configs(tmp_path / "one" / "trials.jsonl"))


def test_a_helper_evaluates_a_batch_exactly_as_this_process_would(planted_dir, two_prompts, tmp_path):
    """The pool on a real helper process, waited for until it has loaded: it takes part of the
    batch, and every record it returns has the scores this process computes for the same
    configuration (CPU arithmetic is deterministic), judged and stored by this run's ledger."""
    from layerscan.batch import EvaluationPool
    from layerscan.search.ledger import TrialLedger
    from layerscan.session import open_session
    from layerscan.workers import plan_slots, study_values

    values = load_study("tiny-qwen-image")
    values.update(model=str(planted_dir), prompts=str(two_prompts), criterion_metric="psnr",
                  criterion_mean=37.0, criterion_worst=35.0)
    session = open_session(build_study(values), "cpu")
    ledger = TrialLedger(session, tmp_path / "run", "greedy")
    pool = EvaluationPool(plan_slots(None, 2, "cpu")[1:], tmp_path / "run" / "workers", [],
                          dict(study_values(session.study), strategy="greedy"))
    pool.start(session.eval_key)
    assert pool.helpers[0].loaded.wait(300) and pool.helpers[0].is_ready
    ledger.pool = pool
    batch = [("img_mlp",), ("to_out",), ("txt_mlp",), ("to_qkv",), ("add_kv_proj",), ("to_add_out",)]
    try:
        records = ledger.evaluate_many([(config, False) for config in batch])
    finally:
        pool.close()
    log = (tmp_path / "run" / "workers" / "w1.log").read_text()
    by_helper = [json.loads(line.split("evaluated ", 1)[1].rsplit(":", 1)[0])
                 for line in log.splitlines() if line.startswith("evaluated [")]
    assert by_helper and len(by_helper) < len(batch)  # shared: some there, some here
    assert [r.config for r in records] == batch and ledger.new_evaluations == len(batch)
    assert [r.config for r in ledger.store.records()] and all(r.passes is not None for r in records)
    for config in by_helper:  # the helper's record equals this process's own evaluation
        mine = ledger.evaluate(tuple(config))  # known: answered from the ledger
        from layerscan.evaluate import evaluate

        here = evaluate(session.engine, tuple(config), session.spec, session.baseline,
                        session.scorer, session.criterion)
        assert here.per_prompt == mine.per_prompt and here.passes == mine.passes
