"""Optuna: one boolean per group, two objectives (quality loss, BF16-kept weight bytes).

The study lives in Optuna's own storage (SQLite under the output directory unless a URL is
given) and is resumed by name, so a rerun continues rather than restarts.  It is seeded with
FP8 everywhere, every group in BF16 and, when a greedy answer is known, that answer.
Configurations already evaluated (by this or any strategy) are answered from the trial store.
"""

from __future__ import annotations

import logging

import optuna

from layerscan.search.base import SearchContext

PARAM_PREFIX = "bf16:"  # parameter names read "bf16:img_mlp" in optuna-dashboard


class TrialFailed(Exception):
    """The configuration crashed or produced NaN; Optuna records the trial as FAIL."""


class OptunaStrategy:
    name = "optuna"

    def __init__(self, greedy_answer: list[str] | None = None) -> None:
        self.greedy_answer = greedy_answer

    def run(self, ctx: SearchContext) -> None:
        optuna.logging.set_verbosity(logging.WARNING)
        sampler = optuna.samplers.TPESampler(seed=ctx.seed, multivariate=True)
        study = optuna.create_study(
            study_name=ctx.study_name, storage=ctx.storage, load_if_exists=True,
            directions=["minimize", "minimize"], sampler=sampler,
        )
        study.set_metric_names(["quality_loss", "bf16_kept_bytes"])
        self._enqueue_seeds(study, ctx)
        total = 2 ** len(ctx.groups)
        seen = {tuple(sorted(t.params.items())) for t in study.trials}

        def objective(trial: optuna.Trial) -> tuple[float, float]:
            kept = [g for g in ctx.groups
                    if trial.suggest_categorical(PARAM_PREFIX + g.pattern, [False, True])]
            seen.add(tuple(sorted(trial.params.items())))
            record = ctx.evaluate(kept)
            trial.set_user_attr("ignored_layers", [g.pattern for g in kept])
            trial.set_user_attr("status", record.status)
            for metric, value in record.mean.items():
                trial.set_user_attr(f"{metric}_mean", value)
                trial.set_user_attr(f"{metric}_worst", record.worst[metric])
            trial.set_user_attr("passes", bool(record.passes))
            if record.status == "failed":
                raise TrialFailed(record.error or "failed")
            return ctx.loss(record), float(record.bf16_kept_bytes)

        def stop_when_space_covered(study: optuna.Study, _trial) -> None:
            if len(seen) >= total:
                study.stop()

        remaining = max(0, ctx.max_trials - len(study.trials))
        if remaining and len(seen) < total:
            study.optimize(objective, n_trials=remaining, catch=(TrialFailed,),
                           callbacks=[stop_when_space_covered])

    def _enqueue_seeds(self, study: optuna.Study, ctx: SearchContext) -> None:
        patterns = [g.pattern for g in ctx.groups]
        seeds = [set(), set(patterns)]
        if self.greedy_answer is not None:
            seeds.insert(1, set(self.greedy_answer))
        done = [t.params for t in study.trials]
        for kept in seeds:
            params = {PARAM_PREFIX + p: p in kept for p in patterns}
            if params not in done:
                study.enqueue_trial(params, skip_if_exists=True)
                done.append(params)
