"""A loaded pipeline with its FP8 engine, scorer and BF16 baseline: what eval and run share."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from layerscan.cache import cache_root_or_default
from layerscan.clock import CLOCK, LOAD
from layerscan.engine import Fp8Engine
from layerscan.errors import UserError
from layerscan.floor import NoiseFloor, measure_floor
from layerscan.generate import (
    FLOOR_VARIANTS, Baseline, GenerationSpec, Setting, baseline_key, baseline_lock, join_baselines,
    load_or_build_baseline, read_prompts,
)
from layerscan.metrics import LPIPS_PROTOCOL, METRICS, Scorer, check_accuracy_prompts, checker_fingerprint, resolve_metrics
from layerscan.pipeline import LoadedPipeline, load_pipeline, local_model_dir
from layerscan.proxy.capture import capture_trajectory
from layerscan.study import Criterion, Study


def compile_transformer(transformer) -> None:
    """Compile the repeated blocks once; each FP8 configuration adds its own guard set, so the
    recompile limit is raised rather than letting dynamo fall back to eager after eight."""
    import torch

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 4096)
    if getattr(transformer, "_repeated_blocks", None):
        transformer.compile_repeated_blocks(fullgraph=True)
    else:
        transformer.compile()
    transformer._layerscan_compiled = True


def output_metrics(metrics: list[str], loaded: LoadedPipeline) -> list[str]:
    """The metrics for what the pipeline makes: a video pipeline's clips are also scored for
    ``temporal`` (flicker FP8 adds, which no per-frame metric sees); for images, a video-only
    metric is the user's mistake."""
    video_only = [m for m in METRICS if METRICS[m].video_only]
    if loaded.video:
        return metrics + [m for m in video_only if m not in metrics]
    asked = [m for m in metrics if m in video_only]
    if asked:
        raise UserError(f"metric(s) {', '.join(asked)} compare video frames; {loaded.model} makes "
                        "images: drop them from the metrics")
    return metrics


def generation_spec(study: Study, prompts: tuple[str, ...]) -> GenerationSpec:
    """What decides the pixels: the study's prompts and seeds under its one setting, or under
    each of its settings matrix (``Study.generation_settings``, cheapest first)."""
    settings = tuple(Setting(s["name"], s["steps"], s["height"], s["width"], s["guidance"], s["image"],
                             tuple(sorted(s["pipeline_kwargs"].items())))
                     for s in study.generation_settings()) if study.settings else ()
    return GenerationSpec(prompts, tuple(study.seeds), study.steps, study.height, study.width,
                          study.guidance, study.image, tuple(sorted(study.pipeline_kwargs.items())),
                          settings)


@dataclass
class Session:
    study: Study
    loaded: LoadedPipeline
    engine: Fp8Engine
    spec: GenerationSpec
    scorer: Scorer
    metrics: list[str]
    cache_root: Path  # baselines, trial images and proxy trajectories (layerscan.cache)
    baseline: Baseline | None = None
    floor: NoiseFloor | None = None
    criterion: Criterion | None = None  # the study's, with floor-relative thresholds resolved

    @property
    def proxy_spec(self) -> GenerationSpec:
        """The setting the proxies record and replay: the first (cheapest) of a matrix.  A proxy
        only orders candidates; every verdict is still a full evaluation under every setting."""
        return self.spec.parts()[0]

    @property
    def eval_key(self) -> str:
        """Identifies the evaluation settings; trial records from other settings are not reused."""
        profile = self.loaded.profile
        fields = dict(baseline=baseline_key(self.loaded, self.spec), metrics=self.metrics,
                      lpips_net=self.study.lpips_net, activation=self.study.activation_scheme,
                      profile=profile.name, target=profile.target.name,
                      components=[(c.attr, c.method) for c in profile.components])
        if "lpips" in self.metrics:  # how images reach the LPIPS network changes its numbers
            fields["lpips_protocol"] = LPIPS_PROTOCOL
        if "accuracy" in self.metrics:  # a changed checker scores the same pictures differently
            fields["checker"] = checker_fingerprint()
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


def open_session(
    study: Study,
    device: str | None = None,
    cache_root: Path | None = None,
    trust_remote_code: bool = False,
    allow_missing_lpips: bool = False,
    warn=print,
    loaded: LoadedPipeline | None = None,
    check_loaded=None,
) -> Session:
    """Validate inputs cheaply first (model reference, prompts, metrics), then load, quantize,
    generate (or load) the BF16 baseline with its noise-floor variants and measure the floor.

    ``check_loaded``: called with the loaded pipeline before the baseline, for checks that need
    its layers (a pattern that matches none is refused before minutes of generation, not after).

    ``loaded``: a pipeline already in memory (benchmarks build full-size ones from configs
    with random weights, which never touch a disk); ``study.model`` then only names it.
    """
    cache_root = cache_root_or_default(cache_root)
    if loaded is None:
        with CLOCK.phase(LOAD):  # a built-in tiny model is built here on first use
            local_model_dir(study.model, cache_root)
    prompts = read_prompts(study.prompts)
    metrics = resolve_metrics(study.metrics, study.lpips_net, allow_missing_lpips)
    if len(metrics) < len(study.metrics):
        warn("warning: LPIPS backbone weights are missing; scoring without LPIPS "
             "(see the message of `layerscan eval` without --allow-missing-lpips for how to add them)")
    if "accuracy" in metrics:
        check_accuracy_prompts(prompts)
    if study.criterion.metric not in metrics:
        raise UserError(f"the criterion uses {study.criterion.metric}, which cannot be computed "
                        "here; choose another with --criterion-metric (e.g. --criterion-metric psnr)")
    spec = generation_spec(study, prompts)
    if loaded is None:
        with CLOCK.phase(LOAD):
            loaded = load_pipeline(study.model, device, trust_remote_code=trust_remote_code,
                                   revision=study.revision, profile=study.profile, target=study.target,
                                   components=study.components, match=study.layer_match,
                                   cache_root=cache_root)
    if check_loaded is not None:
        check_loaded(loaded)
    metrics = output_metrics(metrics, loaded)
    scorer = Scorer(metrics, study.lpips_net, str(loaded.device), video=loaded.video)
    engine = Fp8Engine(loaded, study.activation_scheme)
    if engine.residency == "requantize":
        warn("weights: BF16 and FP8 copies of the quantized layers do not fit side by side on "
             f"{loaded.device}; re-quantizing on every switch")
    compiled = study.compile or (study.compile is None and loaded.device.type == "cuda")
    if compiled:
        compile_transformer(loaded.transformer)
    engine.apply(None)
    session = Session(study, loaded, engine, spec, scorer, metrics, cache_root)
    images = len(spec.items())
    # One process builds a baseline; others on the same cache wait for it and load it.  The
    # denoising trajectory the proxies replay is recorded on the way, at the cost of a few copies
    # (of the first setting's: the proxies read one setting, see proxy_spec).
    parts = []
    if compiled:  # the requantize residency's CPU copies, beside the output that compiles
        engine.start_master_copies()

    def made(index: int, seconds: float) -> None:
        bar.update(1)
        engine.finish_master_copies()  # no output the BF16 timing counts runs beside them

    with tqdm(total=images * (1 + len(FLOOR_VARIANTS)), desc="BF16 baseline + noise floor",
              unit="img", leave=False) as bar:
        for number, part in enumerate(spec.parts()):
            with baseline_lock(loaded, part, cache_root):
                parts.append(load_or_build_baseline(
                    loaded, part, cache_root, on_image=made,
                    capture=capture_trajectory(loaded, part, cache_root) if number == 0 else None,
                    warn=warn))
    session.baseline = join_baselines(parts)
    session.floor = measure_floor(scorer, session.baseline, [p for _, p, _ in spec.items()])
    crit = study.criterion
    session.criterion = dataclasses.replace(
        crit.resolve(session.floor.mean.get(crit.metric), session.floor.worst.get(crit.metric)),
        per_setting=spec.per_setting if spec.settings else 0,
        setting_floors=tuple((f["mean"].get(crit.metric), f["worst"].get(crit.metric))
                             for f in session.floor.settings))
    return session
