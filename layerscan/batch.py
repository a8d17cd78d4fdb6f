"""A batch of evaluations spread over local worker processes (``run --workers N`` / ``--gpus``).

Strategies other than Optuna propose batches of configurations that do not depend on each other
(greedy's groups alone, one size of exhaustive's subsets, the minimality proof's removals).  The
run's ledger hands such a batch to an ``EvaluationPool``: this process evaluates one
configuration after another itself while each helper evaluates others.  A helper is ``layerscan
serve``: it loads the same pipeline and the same cached BF16 baseline, then evaluates the
configurations sent to it, one JSON line each on stdin, and answers each with its record on
stdout.  Records are kept by the run's ledger alone (the one store and judge); a helper writes
only the trial images, into the shared cache.  A helper that dies hands its configuration back
to the others; the run goes on with those left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from layerscan.evaluate import TrialRecord

PROTOCOL = 1


class EvaluationPool:
    """Helper processes for one run, started once the run's baseline is cached (``start``): they
    load while the run measures its attribution, and join the first batch when ready."""

    def __init__(self, slots, log_root: Path, flags: list[str], study_values: dict) -> None:
        self.slots = slots  # layerscan.workers.Slot, one per helper
        self.log_root = log_root
        self.flags = flags
        self.study_values = study_values
        self.helpers: list[_Helper] = []
        self.started = False

    def start(self, eval_key: str) -> None:
        """Start the helpers without waiting for them (each is waited for by its feeder)."""
        self.started = True
        self.log_root.mkdir(parents=True, exist_ok=True)
        spec = self.log_root / "study.json"
        spec.write_text(json.dumps(self.study_values))
        for slot in self.slots:
            self.helpers.append(_Helper(slot, spec, self.log_root, self.flags, eval_key))

    def evaluate(self, ledger, batch: list) -> None:
        """Evaluate ``batch`` [(config, early_stop, stopped record or None)] here and on the
        helpers; every record goes to ``ledger.take``."""
        if not self.started:
            self.start(ledger.session.eval_key)
        pending = list(batch)
        lock = threading.Lock()

        def next_item():
            with lock:
                return pending.pop(0) if pending else None

        def give_back(item) -> None:
            with lock:
                pending.append(item)

        def feed(helper: _Helper) -> None:
            while not helper.loaded.wait(0.2):  # still loading: this process goes on meanwhile
                with lock:
                    if not pending:
                        return
            if not helper.is_ready:
                return
            while helper.alive and (item := next_item()) is not None:
                config, early_stop, stopped = item
                record = helper.evaluate(config, early_stop, stopped)
                if record is None:  # the helper died: another takes its configuration
                    give_back(item)
                    return
                ledger.take(record, continued=stopped is not None)

        threads = [threading.Thread(target=feed, args=(h,), daemon=True) for h in self.helpers if h.alive]
        for thread in threads:
            thread.start()
        while (item := next_item()) is not None:  # this process works through the batch too
            config, early_stop, stopped = item
            ledger.evaluate_here(config, early_stop, stopped)
        for thread in threads:
            thread.join()
        while (item := next_item()) is not None:  # handed back by a helper that died late
            ledger.evaluate_here(*item)

    def close(self, interrupted: bool = False) -> None:
        for helper in self.helpers:
            helper.stop(interrupted)
        self.helpers = []


class _Helper:
    def __init__(self, slot, spec: Path, log_root: Path, flags: list[str], eval_key: str) -> None:
        self.label = slot.label
        self.log = log_root / f"{slot.label}.log"
        cmd = [sys.executable, "-m", "layerscan.cli", "serve", "--spec", str(spec),
               "--threads", str(slot.threads), *flags]
        if slot.device:
            cmd += ["--device", slot.device]
        env = {**os.environ, **slot.env, "PYTHONUNBUFFERED": "1"}
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=log, text=True, env=env)
        self.alive = True
        self.is_ready = False
        self.loaded = threading.Event()  # set once the helper said hello (or failed to)
        threading.Thread(target=self._await_hello, args=(eval_key,), daemon=True).start()

    def _read(self) -> dict | None:
        line = self.proc.stdout.readline()
        if not line:
            self.alive = False
            return None
        return json.loads(line)

    def _await_hello(self, eval_key: str) -> None:
        """The helper's first line: it has loaded the pipeline and the baseline for this run."""
        try:
            hello = self._read()
            if hello is None:
                print(f"helper {self.label} did not start; see {self.log}", file=sys.stderr)
            elif hello.get("protocol") != PROTOCOL or hello.get("eval_key") != eval_key:
                print(f"helper {self.label} loaded other evaluation settings than this run; it "
                      f"is left out (see {self.log})", file=sys.stderr)
                self.stop(interrupted=True)
            else:
                self.is_ready = True
        except (OSError, ValueError):
            self.alive = False
        finally:
            self.loaded.set()

    def evaluate(self, config, early_stop: bool, stopped: TrialRecord | None) -> TrialRecord | None:
        try:
            self.proc.stdin.write(json.dumps({"config": list(config), "early_stop": early_stop,
                                              "resume": stopped.to_dict() if stopped else None}) + "\n")
            self.proc.stdin.flush()
            answer = self._read()
        except (BrokenPipeError, OSError, ValueError):
            answer, self.alive = None, False
        if answer is None:
            print(f"helper {self.label} stopped; its configuration goes to another worker "
                  f"(see {self.log})", file=sys.stderr)
            return None
        return TrialRecord.from_dict(answer["record"])

    def stop(self, interrupted: bool) -> None:
        if self.proc.poll() is None:
            if interrupted:
                self.proc.kill()
            else:
                try:
                    self.proc.stdin.close()
                except OSError:
                    pass
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.alive = False


def serve(args) -> int:
    """``layerscan serve``: a helper of one run's evaluation pool (see the module docstring)."""
    from layerscan.search.ledger import evaluate_configuration
    from layerscan.search.store import TrialImages
    from layerscan.session import open_session
    from layerscan.study import build_study

    answers = os.fdopen(os.dup(1), "w")  # the protocol's channel; library prints go to stderr
    os.dup2(2, 1)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    study = build_study(json.loads(Path(args.spec).read_text()))
    session = open_session(study, args.device, args.cache_dir, args.trust_remote_code,
                           args.allow_missing_lpips, warn=lambda m: print(m, file=sys.stderr))
    images = TrialImages(session.eval_key, session.cache_root)
    answers.write(json.dumps({"protocol": PROTOCOL, "eval_key": session.eval_key}) + "\n")
    answers.flush()
    for line in sys.stdin:
        request = json.loads(line)
        config = tuple(request["config"])
        resume = TrialRecord.from_dict(request["resume"]) if request["resume"] else None
        record = evaluate_configuration(session, images, config, request["early_stop"], resume)
        answers.write(json.dumps({"record": record.to_dict()}) + "\n")
        answers.flush()
        print(f"evaluated {json.dumps(list(config))}: {record.status}", file=sys.stderr, flush=True)
    return 0
