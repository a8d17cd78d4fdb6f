"""The ``layerscan`` command: parse, call, print.  User mistakes end in one line and exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from layerscan.errors import UserError
from layerscan.metrics import METRICS
from layerscan.study import choices

DEFAULT_MODEL = "demo"  # the trained offline pipeline shipped in layerscan/demo/pipeline
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_MISMATCH = 1  # layerscan check: the target's code disagrees with the recommendation
TARGET_HELP = ("the release the answer is for: vllm-omni==0.30.0 (default; 'vllm-omni' is the "
               "newest layerscan knows) or seed (the seed guide: text encoder and VAE as FP8 "
               "weight storage, substring matching)")
INTERRUPTED_MESSAGE = ("interrupted: every finished evaluation is kept; "
                       "rerun the same command to resume")


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def _add_study_flags(p: argparse.ArgumentParser) -> None:
    """Flags that override study fields; None means "not given" so the study file wins."""
    p.add_argument("--model", help="hub id (org/Model), pipeline directory or built-in name "
                                   f"(default, without --study: {DEFAULT_MODEL!r}, the trained demo)")
    p.add_argument("--study", help="study TOML file (or the name of one in studies/)")
    p.add_argument("--revision", help="hub revision of the model")
    p.add_argument("--prompts", help="prompt file, one prompt per line")
    p.add_argument("--seeds", type=_ints, help="comma-separated seeds, e.g. 0,1")
    p.add_argument("--steps", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--metrics", type=_csv, help="comma-separated: " + ",".join(METRICS))
    p.add_argument("--lpips-net", dest="lpips_net", choices=choices("lpips_net"))
    p.add_argument("--activation-scheme", dest="activation_scheme", choices=choices("activation_scheme"),
                   help="dynamic FP8 activation scale per token (vLLM-Omni default) or per tensor")
    p.add_argument("--profile", help="architecture profile (default: chosen from the DiT class)")
    p.add_argument("--target", help=TARGET_HELP)
    p.add_argument("--components", type=_csv,
                   help="quantized components, e.g. transformer (default: the target's for the model)")
    p.add_argument("--layer-match", dest="layer_match", choices=choices("layer_match"),
                   help="how the target matches ignored_layers (default: the target's; vLLM: exact)")
    p.add_argument("--criterion-metric", dest="criterion_metric", choices=list(METRICS))
    p.add_argument("--criterion-mean", dest="criterion_mean",
                   help="mean threshold: a number, or relative to the noise floor: 'floor + 0.05'")
    p.add_argument("--criterion-worst", dest="criterion_worst",
                   help="worst-image threshold: a number or 'floor + N' / 'floor - N'")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the DiT's repeated blocks (default: on GPUs); times are "
                        "then 'compiled'")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument("--cache-dir", dest="cache_dir", type=Path,
                   help="baseline and tiny-pipeline cache (default: $LAYERSCAN_CACHE or ~/.cache/layerscan)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow code shipped with the model repository to run")
    p.add_argument("--allow-missing-lpips", action="store_true",
                   help="continue without LPIPS when its backbone weights are not available")


def _settings_given(args: argparse.Namespace) -> dict:
    """The flags that set study settings and were given: every parsed option whose name is a
    setting of the schema (``Study``'s fields and the criterion's), so no list repeats them."""
    from layerscan.study import setting_names

    names = setting_names()
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def _study(args: argparse.Namespace, **extra):
    from layerscan.study import build_study, check_settings, find_study_for_model, load_study

    if not args.study and not args.model:
        print(f"no --model: using the built-in {DEFAULT_MODEL} model (a small trained Qwen-Image)",
              file=sys.stderr)
        args.model = DEFAULT_MODEL
    study_path = args.study or (args.model and find_study_for_model(args.model))
    values = load_study(study_path) if study_path else {}
    metric = args.criterion_metric
    if metric and metric != values.get("criterion_metric", "lpips"):
        # The file's thresholds are for its own metric; another one starts from its defaults.
        values.pop("criterion_mean", None)
        values.pop("criterion_worst", None)
    if study_path and not args.study:
        print(f"using study {study_path}", file=sys.stderr)
    flags = _settings_given(args)
    values.update(check_settings(flags, as_flags=True))  # a bad flag is named as typed
    _refuse_flags_every_setting_overrides(values.get("settings") or (), flags)
    values.update({k: v for k, v in extra.items() if v is not None})
    return build_study(values)


def _refuse_flags_every_setting_overrides(settings, flags: dict) -> None:
    """A flag such as --height would change nothing when every setting of the study's matrix
    sets its own: said, rather than silently ignored."""
    from layerscan.study import SETTING_KEYS, as_written

    moot = [k for k in SETTING_KEYS if k in flags and k != "pipeline_kwargs"
            and all(isinstance(s, dict) and k in s for s in settings)] if settings else []
    if moot:
        raise UserError(f"{', '.join(as_written(k, True) for k in moot)}: every [[settings]] table of "
                        "this study sets its own; edit the study's settings instead")


def _session(args, study, check_loaded=None):
    from layerscan.session import open_session

    return open_session(study, args.device, args.cache_dir, args.trust_remote_code,
                        args.allow_missing_lpips, warn=lambda m: print(m, file=sys.stderr),
                        check_loaded=check_loaded)


def cmd_layers(args) -> int:
    from layerscan.pipeline import load_pipeline

    loaded = load_pipeline(args.model, "cpu", trust_remote_code=args.trust_remote_code,
                           profile=args.profile, target=args.target)
    index = loaded.index
    groups = index.groups(args.granularity, args.text_encoder_granularity)
    share = {g.pattern: g.params / index.component_params[g.component] for g in groups}
    if args.json:
        print(json.dumps([dict(pattern=g.pattern, component=g.component, layers=len(g.layers),
                               params=g.params, share=share[g.pattern]) for g in groups], indent=1))
        return 0
    profile = loaded.profile
    print(f"{args.model}: profile {profile.name}, target {profile.target.name} "
          f"(ignored_layers matched {profile.match}ly)")
    for component in index.components:
        layers = index.of(component)
        print(f"  {component}: {len(layers)} quantizable layers "
              f"({'W8A8' if index.method(component) == 'w8a8' else 'FP8 weight storage'}), "
              f"{sum(l.params for l in layers):,} of {index.component_params[component]:,} parameters")
    width = max([len(g.pattern) for g in groups] + [7])
    print(f"{'pattern':<{width}}  {'layers':>6}  {'params':>14}  {'share':>7}")
    for g in groups:
        print(f"{g.pattern:<{width}}  {len(g.layers):>6}  {g.params:>14,}  {100 * share[g.pattern]:>6.2f}%")
    return 0


def cmd_eval(args) -> int:
    from layerscan.evaluate import evaluate, setting_verdicts, worst_setting
    from layerscan.report.plots import format_bytes

    from layerscan.pipeline import check_device
    from layerscan.rundir import prepare_dir

    study = _study(args)
    check_device(args.device)
    out = prepare_dir(args.out or Path("reports") / study.slug / "eval")
    config = None if args.bf16 else list(args.ignore or [])
    session = _session(args, study, check_loaded=lambda loaded: config and loaded.index.validate(config))
    record = evaluate(session.engine, config, session.spec, session.baseline, session.scorer,
                      session.criterion, image_dir=out / "images")
    print(f"configuration: {record.label}   device: {record.device}   status: {record.status}")
    if record.status == "failed":
        raise UserError(f"evaluation failed: {record.error}")
    floor = session.floor
    print(f"{'metric':<9} {'mean':>10} {'95 % CI':>21} {'worst':>10} {'floor mean':>11} {'floor worst':>12}")
    for metric in session.metrics:
        low, high = record.ci[metric]
        print(f"{metric:<9} {record.mean[metric]:>10.4f} {f'[{low:.4f}, {high:.4f}]':>21} "
              f"{record.worst[metric]:>10.4f} {floor.mean[metric]:>11.4f} {floor.worst[metric]:>12.4f}")
    print(f"criterion ({session.criterion.describe()}): {'pass' if record.passes else 'FAIL'}")
    data = record.to_dict()
    if session.spec.settings:  # a matrix: the verdict under each setting, which decides
        crit, names = session.criterion, session.spec.setting_names()
        data["per_setting"] = setting_verdicts(record, crit, names)
        for verdict in data["per_setting"]:
            print(f"  setting {verdict['setting']:<12} {crit.metric} mean {verdict['mean']:.4f} "
                  f"(bound {verdict['bound']:.4f}), worst {verdict['worst']:.4f}: "
                  f"{'pass' if verdict['passes'] else 'FAIL'}")
        data["worst_setting"] = worst_setting(record, crit, names)
        print(f"  worst setting: {data['worst_setting']}")
    for component, size in record.weight_bytes.items():
        print(f"weights {component:<14} {format_bytes(size):>12}")
    print(f"weights {'total':<14} {format_bytes(record.total_weight_bytes):>12}")
    if record.peak_memory_bytes is not None:
        print(f"peak GPU memory        {format_bytes(record.peak_memory_bytes):>12}")
    print(f"seconds per image      {record.seconds_per_image:>12.3f} ({record.execution_mode})")
    (out / "eval.json").write_text(json.dumps(data, indent=1))
    print(f"images and eval.json in {out}")
    return 0


def cmd_run(args) -> int:
    from layerscan.rundir import hold_run_dir
    from layerscan.workers import check_worker_flags

    # Everything a user can get wrong is refused here, before the model loads.
    study = _study(args)
    check_worker_flags(args.gpus, args.workers, args.device)
    out = args.out or Path("reports") / study.slug
    with hold_run_dir(out, wait=args.wait):
        return _run_in(args, study, out)


def _run_in(args, study, out: Path) -> int:
    from layerscan.configs import describe
    from layerscan.report.document import write_report
    from layerscan.runner import run_study

    from layerscan.clock import CHECK, CLOCK, timing_line, timing_since

    started = CLOCK.snapshot()
    pool = None
    if args.gpus is not None or args.workers is not None:  # one worker per GPU, or N on CPU
        from layerscan.workers import pool_for_run

        pool = pool_for_run(args, study, out)
    session = _session(args, study)
    outcome = run_study(session, out, study.strategy, pool)
    if outcome.stop_reason != "interrupted":
        from layerscan.report.outputs import paste_forms
        from layerscan.target_check import check_after_run

        with CLOCK.phase(CHECK):
            outcome.target_check = check_after_run(
                paste_forms(study.model, outcome.recommended, session.loaded), session.loaded.path)
    outcome.timing = timing_since(started)
    path = write_report(session, outcome, out)
    rec = outcome.recommended
    if rec is None:
        answer = "no configuration met the criterion"
    else:
        from layerscan.report.outputs import quantization_configs

        answer = json.dumps(quantization_configs(rec, session.loaded)["paste"])
        if len(answer) > 300:
            answer = answer[:300] + f"... (in full in {out / 'recommendation.json'})"
    print(f"recommended for {session.loaded.profile.target.name} "
          f"({describe(rec.config) if rec else 'none'}): quantization_config={answer}")
    if outcome.ledger.preference_note:
        print(f"note: {outcome.ledger.preference_note}", file=sys.stderr)
    if outcome.target_check is not None:
        print(outcome.target_check["line"].replace("**", ""))
    # Every process's records count (a shared study's workers included), as in the report.
    print(f"{outcome.ledger.cost()['configurations']} FP8 configurations on record "
          f"({outcome.evaluated_now_text()}); report: {path}")
    print(timing_line(timing_since(started)))
    if not outcome.final:
        print(f"not final: {outcome.why_not_final}", file=sys.stderr)
    if outcome.stop_reason == "interrupted":
        print(INTERRUPTED_MESSAGE, file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def cmd_check(args) -> int:
    from layerscan.pipeline import resolve_model_dir
    from layerscan.profiles import resolve_target
    from layerscan.target_check import check_recommendation

    path = args.report / "recommendation.json" if args.report.is_dir() else args.report
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"no layerscan recommendation.json in {args.report}") from None
    if not isinstance(data, dict) or "target" not in data:
        raise UserError(f"{path} names no target release (written by an older layerscan); "
                        "rerun layerscan run to rewrite it")
    written_for = resolve_target(data["target"])
    if args.target and resolve_target(args.target) != written_for:
        raise UserError(f"{path} was written for {written_for.name}, not {resolve_target(args.target).name}; "
                        f"rerun layerscan run --target {args.target} for an answer for that release")
    model_dir = resolve_model_dir(args.model or data["model"], data.get("revision"))
    result = check_recommendation(data, model_dir, args.python)
    print(f"{path}: {data['model']} for {written_for.name}, checked with {result.version}")
    for form, components in result.counts.items():
        for component, count in components.items():
            print(f"  {form:<13} {component:<14} FP8 {count['fp8']:>5}  BF16 {count['bf16']:>5}")
    for note in result.notes:
        print(f"note: {note}")
    for problem in result.problems:
        print(f"problem: {problem}")
    print("agrees: every form loads and keeps exactly the intended layers in BF16" if result.ok
          else f"disagrees: {len(result.problems)} problem(s)")
    return 0 if result.ok else EXIT_MISMATCH


def cmd_serve(args) -> int:
    from layerscan.batch import serve

    return serve(args)


def cmd_worker(args) -> int:
    from layerscan.workers import worker_main

    return worker_main(args)


def _add_worker_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--gpus", type=_ints, help="one worker per GPU, e.g. 0,1")
    group.add_argument("--workers", type=int, help="N workers sharing this host's CPU cores")


def cmd_table(args) -> int:
    from layerscan.report.table import HEADERS, read_rows, render_table, update_docs_table

    if args.ci_entries:
        from layerscan.report.table import read_ci_entries

        print(read_ci_entries(args.reports))
        return 0
    rows = read_rows(args.reports)
    if args.update:
        for row, action in zip(rows, update_docs_table(args.update, rows)):
            print(f"{action}: {row['model']}")
    else:
        print(render_table(rows, HEADERS[args.format] if args.format else None), end="")
    return 0


def cmd_tiny(args) -> int:
    from layerscan.tiny import build_tiny_pipeline

    print(build_tiny_pipeline(args.name, args.out, seed=args.seed))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layerscan", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("layers", help="list every quantized component's layer groups")
    p.add_argument("--model", required=True)
    p.add_argument("--granularity", default="family", choices=choices("granularity"))
    p.add_argument("--text-encoder-granularity", dest="text_encoder_granularity",
                   choices=choices("text_encoder_granularity"))
    p.add_argument("--profile")
    p.add_argument("--target", help=TARGET_HELP)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("eval", help="evaluate one configuration against BF16")
    _add_study_flags(p)
    p.add_argument("--ignore", action="append", metavar="PATTERN",
                   help="keep layers matching PATTERN in BF16 (repeatable)")
    p.add_argument("--bf16", action="store_true", help="evaluate BF16 itself (a sanity check)")
    p.add_argument("--out", type=Path, help="where images and eval.json go")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("run", help="search ignored_layers and write the report")
    _add_study_flags(p)
    p.add_argument("--name", help="display name of the model in the table row")
    p.add_argument("--granularity", choices=choices("granularity"))
    p.add_argument("--text-encoder-granularity", dest="text_encoder_granularity",
                   choices=choices("text_encoder_granularity"),
                   help="text-encoder groups (default: as --granularity; component: the whole text encoder)")
    p.add_argument("--strategy", choices=choices("strategy"),
                   help="auto (default): proxy-ordered greedy with early stopping")
    p.add_argument("--refine", action="store_true", default=None,
                   help="refine the sensitive groups one level finer (families to "
                        "transformer_blocks.N.family cells, blocks to their families)")
    p.add_argument("--prefer", choices=choices("prefer"),
                   help="what the answer optimises among passing configurations (default: speed "
                        "where measured as served, compiled on a GPU; else memory)")
    p.add_argument("--max-trials", dest="max_trials", type=int)
    p.add_argument("--timeout", dest="timeout_s", type=float, help="seconds")
    p.add_argument("--storage", help="Optuna storage URL (default: SQLite in the output directory)")
    p.add_argument("--out", type=Path, help="report directory (default: reports/<model-slug>)")
    p.add_argument("--wait", action="store_true",
                   help="when another run holds --out, wait for it instead of exiting")
    _add_worker_flags(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("worker", help="join a running Optuna study from another process or host")
    p.add_argument("--study", required=True, help="the study name that layerscan run printed")
    p.add_argument("--storage", help="the study's storage URL (default: $LAYERSCAN_STORAGE)")
    p.add_argument("--model", help="the model's path on this host, when not the study's")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument("--cache-dir", dest="cache_dir", type=Path, help="baseline cache (see run)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--allow-missing-lpips", action="store_true")
    p.add_argument("--out", type=Path, help="this worker's trials.jsonl directory")
    p.add_argument("--label", help="name on this worker's trials (default: host-pid)")
    p.add_argument("--seed-offset", dest="seed_offset", type=int, help="sampler seed offset")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    _add_worker_flags(p)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("serve", help="a helper of `run --workers/--gpus` (started by it): evaluate "
                                     "the configurations sent on stdin")
    p.add_argument("--spec", required=True, help="the run's study values (JSON file)")
    p.add_argument("--device")
    p.add_argument("--cache-dir", dest="cache_dir", type=Path)
    p.add_argument("--threads", type=int)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--allow-missing-lpips", action="store_true")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("table", help="print the supported-models table from report directories")
    p.add_argument("reports", nargs="+", type=Path)
    p.add_argument("--update", type=Path,
                   help="replace or insert the rows in this docs file, in the columns of its table")
    p.add_argument("--format", choices=["vllm-omni", "seed"],
                   help="header to print (default: the first report's target's)")
    p.add_argument("--ci-entries", dest="ci_entries", action="store_true",
                   help="print each report's entry for vLLM-Omni's FP8 quality test instead (one "
                        "model measured on several GPUs: one entry with per-GPU thresholds)")
    p.set_defaults(func=cmd_table)

    p = sub.add_parser("check", help="hold a report's recommendation to the installed target release's own code")
    p.add_argument("report", type=Path, help="a report directory (or its recommendation.json)")
    p.add_argument("--target", help="the release the recommendation must be for (default: the one it names)")
    p.add_argument("--python", help="the Python of an environment with vllm-omni installed "
                                    "(default: $LAYERSCAN_VLLM_OMNI_PYTHON, else this one)")
    p.add_argument("--model", help="the model's local pipeline directory, when not the report's model")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("tiny", help="write a built-in tiny pipeline to a directory")
    p.add_argument("name", help="e.g. tiny-qwen-image, tiny-wan2.2-outlier (an unknown name lists them all)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"layerscan: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(INTERRUPTED_MESSAGE, file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
