"""Many workers on one search: an Optuna study shared through its RDB storage.

``layerscan run --strategy optuna`` creates the study and writes into its user attributes
everything a worker needs to rebuild the session: the study spec, the prompts themselves, the
evaluation key and the model's content fingerprint.  ``layerscan worker --study NAME --storage
URL`` reads them back, loads the model, computes (or loads) the BF16 baseline and joins the
optimisation; the rules that keep workers from evaluating a configuration twice and that retry
the trial of a worker that died are in ``layerscan.search.optuna_search``.

``--gpus 0,1`` (or ``--workers N`` on CPU) starts one worker per GPU on this host: under
``layerscan run`` the process itself works on the first and starts ``layerscan worker``
processes for the others, each with ``CUDA_VISIBLE_DEVICES`` set, waits for them, then writes
the report from the whole study.  (The other strategies spread their batches over the same
slots through ``layerscan.batch``; ``pool_for_run`` picks which.)

The BF16 baseline is built once per cache directory: concurrent processes take a file lock next
to the cache entry, so the second waits and then loads what the first wrote.  Hosts that do not
share ``$LAYERSCAN_CACHE`` each build their own, and since the cache key names the GPU model,
workers on different GPU models score against baselines made on their own GPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from layerscan.errors import UserError

SPEC_ATTR = "layerscan_study"  # study user attribute: the Study fields, flat, as build_study takes
HEARTBEAT_ENV = "LAYERSCAN_HEARTBEAT"  # seconds between heartbeats of a running trial
STORAGE_ENV = "LAYERSCAN_STORAGE"  # `layerscan worker` reads the URL here when --storage is absent


def redact_url(url: str | None) -> str | None:
    """Storage URLs are printed and recorded without their passwords."""
    if not url or "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else url


def heartbeat_s() -> int:
    from layerscan.search.optuna_search import DEFAULT_HEARTBEAT_S

    value = os.environ.get(HEARTBEAT_ENV, "")
    try:
        return max(1, int(value)) if value else DEFAULT_HEARTBEAT_S
    except ValueError:
        raise UserError(f"{HEARTBEAT_ENV} must be whole seconds, got {value!r}") from None


# --- the study spec, stored in the study -------------------------------------------------------

def study_values(study) -> dict:
    """A Study as the flat dict ``build_study`` takes, JSON-safe, without the storage URL."""
    values = {f.name: getattr(study, f.name) for f in dataclasses.fields(study)
              if f.name not in ("criterion", "storage")}
    values.update(criterion_metric=study.criterion.metric, criterion_mean=str(study.criterion.mean),
                  criterion_worst=str(study.criterion.worst), strategy="optuna",
                  prompts=str(Path(study.prompts).resolve()))
    return json.loads(json.dumps(values))


def study_attrs(session, heartbeat: int) -> dict:
    """What ``layerscan worker`` needs to rebuild ``session`` from the study alone."""
    from layerscan.generate import baseline_key

    loaded, study = session.loaded, session.study
    return {
        SPEC_ATTR: study_values(study),
        "prompts": list(session.spec.prompts),
        "eval_key": session.eval_key,
        "baseline_key": baseline_key(loaded, session.spec),
        "model_fingerprint": loaded.fingerprint,
        "device": _device_name(loaded.device),
        "groups": [g.pattern for g in loaded.index.groups(study.granularity,
                                                          study.text_encoder_granularity)],
        "criterion": study.criterion.describe(),
        "heartbeat_s": heartbeat,
    }


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def sharing_for(session, pool: "WorkerPool | None" = None):
    """How ``layerscan run`` takes part in its own Optuna study (and starts its helpers)."""
    from layerscan.search.optuna_search import Sharing

    beat = heartbeat_s()

    def ready(study_name: str, storage_url: str) -> None:
        print(f"optuna study {study_name} in {redact_url(storage_url)}; more workers join with: "
              f"layerscan worker --study {study_name} --storage URL", file=sys.stderr)
        if pool is not None:
            pool.start(study_name, storage_url)

    return Sharing(worker=pool.parent_label if pool else "main", host=socket.gethostname(),
                   device=_device_name(session.loaded.device), pid=os.getpid(), seed_offset=0,
                   heartbeat_s=beat, study_attrs=study_attrs(session, beat), on_ready=ready)


# --- several workers on one host ---------------------------------------------------------------

@dataclass
class Slot:
    """One worker: its label, device, environment, CPU threads and sampler seed offset."""

    label: str
    device: str | None
    env: dict
    threads: int
    seed_offset: int


def check_worker_flags(gpus: list[int] | None, workers: int | None, device: str | None) -> None:
    """Refuse --gpus/--workers/--device this machine cannot honour, before anything loads."""
    from layerscan.pipeline import check_device

    check_device(device)
    if gpus is None and workers is None:
        return
    plan_slots(gpus, workers, device)  # the counts
    for g in gpus or ():
        check_device(f"cuda:{g}", said=f"--gpus {g}")


def plan_slots(gpus: list[int] | None, workers: int | None, device: str | None) -> list[Slot]:
    """One slot per GPU of ``--gpus``, or ``--workers`` slots sharing this host's CPU cores.

    Each worker gets ``$OMP_NUM_THREADS`` torch threads when that is set, else an equal share
    of the cores (oversubscribed threads slow every worker down).
    """
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count() or 1)
    count = len(gpus) if gpus is not None else workers
    if not count or count < 1:
        raise UserError("--gpus needs GPU indices (e.g. 0,1) and --workers a count of 1 or more")
    threads = max(1, cores // count)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        threads = max(1, int(os.environ["OMP_NUM_THREADS"]))
    if gpus is not None:
        if len(set(gpus)) != len(gpus):
            raise UserError("--gpus takes distinct GPU indices, e.g. --gpus 0,1")
        return [Slot(f"gpu{g}", "cuda", {"CUDA_VISIBLE_DEVICES": str(g)}, threads, i)
                for i, g in enumerate(gpus)]
    return [Slot(f"w{i}", device, {}, threads, i) for i in range(workers)]


class WorkerPool:
    """``layerscan worker`` processes on this host, started once the study exists."""

    def __init__(self, slots: list[Slot], log_root: Path, flags: list[str],
                 parent_label: str = "main") -> None:
        self.slots = slots
        self.log_root = log_root
        self.flags = flags  # passed to every worker (--trust-remote-code, ...)
        self.parent_label = parent_label
        self.procs: list[tuple[Slot, subprocess.Popen, Path]] = []

    def start(self, study_name: str, storage_url: str) -> None:
        for slot in self.slots:
            out = self.log_root / slot.label
            out.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "layerscan.cli", "worker", "--study", study_name,
                   "--out", str(out), "--label", slot.label, "--seed-offset", str(slot.seed_offset),
                   "--threads", str(slot.threads), *self.flags]
            if slot.device:
                cmd += ["--device", slot.device]
            # The URL travels in the environment, so its password is not in the process list.
            env = {**os.environ, **slot.env, STORAGE_ENV: storage_url, "PYTHONUNBUFFERED": "1",
                   "OMP_NUM_THREADS": str(slot.threads)}
            with open(out / "worker.log", "w", encoding="utf-8") as log:
                proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
            self.procs.append((slot, proc, out / "worker.log"))
        if self.slots:
            print(f"started {len(self.slots)} worker process(es) "
                  f"({', '.join(s.label for s in self.slots)}); logs: {self.log_root}/*/worker.log",
                  file=sys.stderr)

    def wait(self, interrupted: bool = False) -> int:
        """Wait for every worker; returns how many did not end cleanly (each is named)."""
        failures = 0
        for slot, proc, log in self.procs:
            if interrupted and proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            try:
                code = proc.wait()
            except KeyboardInterrupt:
                proc.send_signal(signal.SIGINT)
                code = proc.wait()
            if code == 0:
                continue
            failures += 1
            if code < 0:
                print(f"worker {slot.label} was killed by signal {-code}; a trial it left "
                      "running is retried by another worker", file=sys.stderr)
            else:
                print(f"worker {slot.label} exited with status {code}; see {log}", file=sys.stderr)
        self.procs = []
        return failures


def pool_for_run(args, study, out_dir: Path):
    """``layerscan run --gpus/--workers``: this process takes the first slot, helpers the rest.

    Sets ``args.device`` and this process's CPU threads for its own slot.  Optuna's helpers
    join its shared study (``WorkerPool``); every other strategy's evaluate the batches it
    proposes (``layerscan.batch.EvaluationPool``).
    """
    slots = plan_slots(args.gpus, args.workers, args.device)
    first = slots[0]
    if first.device == "cuda":
        args.device = f"cuda:{args.gpus[0]}"
    from layerscan.search import STRATEGIES

    _set_threads(first.threads)
    if not STRATEGIES[study.strategy].shares_study:
        from layerscan.batch import EvaluationPool

        values = dict(study_values(study), strategy=study.strategy)
        return EvaluationPool(slots[1:], out_dir / "workers", _passed_flags(args), values)
    return WorkerPool(slots[1:], out_dir / "workers", _passed_flags(args), parent_label=first.label)


def _passed_flags(args) -> list[str]:
    flags = []
    if getattr(args, "trust_remote_code", False):
        flags.append("--trust-remote-code")
    if getattr(args, "allow_missing_lpips", False):
        flags.append("--allow-missing-lpips")
    if getattr(args, "cache_dir", None):
        flags += ["--cache-dir", str(Path(args.cache_dir).resolve())]
    return flags


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


# --- `layerscan worker` ------------------------------------------------------------------------

def read_study_attrs(storage_url: str, study_name: str) -> dict:
    import optuna

    from layerscan.search.optuna_search import open_storage

    try:
        study = optuna.load_study(study_name=study_name, storage=open_storage(storage_url, None))
    except KeyError:
        raise UserError(f"no study {study_name!r} in {redact_url(storage_url)}; start it with "
                        "layerscan run --strategy optuna --storage URL") from None
    attrs = study.user_attrs
    if SPEC_ATTR not in attrs:
        raise UserError(f"study {study_name!r} was not created by this version of layerscan run "
                        "(it has no study spec to work from)")
    return attrs


def _prompt_file(attrs: dict, values: dict, out_dir: Path) -> str:
    """The spec's prompt file when it holds the study's prompts, else a copy written here."""
    from layerscan.generate import read_prompts

    prompts = tuple(attrs["prompts"])
    try:
        if read_prompts(values["prompts"]) == prompts:
            return values["prompts"]
    except UserError:
        pass
    path = out_dir / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return str(path)


def worker_main(args) -> int:
    """Join a running study, evaluate until its budget is spent, and leave."""
    url = args.storage or os.environ.get(STORAGE_ENV)
    if not url:
        raise UserError(f"give the study's storage with --storage URL (or ${STORAGE_ENV})")
    check_worker_flags(args.gpus, args.workers, args.device)
    if args.gpus is not None or args.workers is not None:
        return _launch(args, url)
    _set_threads(args.threads)
    attrs = read_study_attrs(url, args.study)

    from layerscan.rundir import hold_run_dir
    from layerscan.study import slugify

    values = dict(attrs[SPEC_ATTR])
    if args.model:
        values["model"] = args.model
    host, pid = socket.gethostname(), os.getpid()
    label = args.label or f"{host}-{pid}"
    slug = slugify(values.get("name") or values["model"])
    with hold_run_dir(args.out or Path("reports") / slug / "workers" / label) as out:
        return _work(args, url, attrs, values, label, host, pid, out)


def _work(args, url: str, attrs: dict, values: dict, label: str, host: str, pid: int, out: Path) -> int:
    """One worker's share of the study, in its own (held) directory."""
    from layerscan.search.base import SearchContext
    from layerscan.search.ledger import BudgetExhausted, TrialLedger
    from layerscan.search.optuna_search import OptunaStrategy, Sharing
    from layerscan.session import open_session
    from layerscan.study import build_study

    values["prompts"] = _prompt_file(attrs, values, out)
    study = build_study(values)
    session = open_session(study, args.device, args.cache_dir, args.trust_remote_code,
                           args.allow_missing_lpips, warn=lambda m: print(m, file=sys.stderr))
    if session.loaded.fingerprint != attrs.get("model_fingerprint"):
        raise UserError(f"the model at {study.model} is not the one study {args.study!r} searches "
                        "(its content differs); pass --model with the path of the same model here")
    groups = session.loaded.index.groups(study.granularity, study.text_encoder_granularity)
    if [g.pattern for g in groups] != attrs.get("groups"):
        raise UserError("this model's layer groups differ from the study's; is it the same model "
                        "and layerscan version?")
    if session.eval_key != attrs.get("eval_key"):
        print(f"note: this worker's evaluation settings differ from the study creator's "
              f"({_device_name(session.loaded.device)} vs {attrs.get('device')}, or other torch/"
              "diffusers versions): it scores against its own BF16 baseline", file=sys.stderr)

    ledger = TrialLedger(session, out, "optuna", on_record=lambda r: print(
        f"[{label}] {r.label}: {r.status}", file=sys.stderr))
    ctx = SearchContext(ledger, groups, session.criterion, seed=study.seed, storage=url,
                        study_name=args.study, max_trials=study.max_trials, index=session.loaded.index)
    strategy = OptunaStrategy(sharing=Sharing(
        worker=label, host=host, device=_device_name(session.loaded.device), pid=pid,
        seed_offset=args.seed_offset if args.seed_offset is not None else pid,
        heartbeat_s=int(attrs.get("heartbeat_s") or heartbeat_s()), join_only=True))
    print(f"worker {label} joined study {args.study} in {redact_url(url)} "
          f"({session.loaded.device}); records in {out / 'trials.jsonl'}", file=sys.stderr)
    try:
        strategy.run(ctx)
    except BudgetExhausted:
        pass
    print(f"worker {label}: {strategy.evaluated_here} configurations evaluated here; "
          "the report is written by layerscan run", file=sys.stderr)
    return 0


def _launch(args, url: str) -> int:
    """``layerscan worker --gpus/--workers``: one worker process per slot, then wait."""
    read_study_attrs(url, args.study)  # fail here, once, when the study is not there
    slots = plan_slots(args.gpus, args.workers, args.device)
    for slot in slots:  # trials name the host too: `run --gpus` on another host has gpu0 as well
        slot.label = f"{socket.gethostname()}-{slot.label}"
    root = args.out or Path("reports") / "workers"
    flags = _passed_flags(args)
    if args.model:
        flags += ["--model", args.model]
    pool = WorkerPool(slots, root, flags)
    pool.start(args.study, url)
    try:
        failures = pool.wait()
    except KeyboardInterrupt:
        failures = pool.wait(interrupted=True)
    return 1 if failures else 0
