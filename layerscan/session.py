"""A loaded pipeline with its FP8 engine, scorer and BF16 baseline: what eval and run share."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from layerscan.engine import Fp8Engine
from layerscan.generate import Baseline, GenerationSpec, baseline_key, load_or_build_baseline, read_prompts
from layerscan.metrics import Scorer, check_accuracy_prompts, checker_fingerprint, resolve_metrics
from layerscan.pipeline import LoadedPipeline, load_pipeline, local_model_dir
from layerscan.study import Study
from layerscan.workers import baseline_lock


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


@dataclass
class Session:
    study: Study
    loaded: LoadedPipeline
    engine: Fp8Engine
    spec: GenerationSpec
    scorer: Scorer
    metrics: list[str]
    baseline: Baseline

    @property
    def eval_key(self) -> str:
        """Identifies the evaluation settings; trial records from other settings are not reused."""
        fields = dict(baseline=baseline_key(self.loaded, self.spec), metrics=self.metrics,
                      lpips_net=self.study.lpips_net, scheme=self.study.activation_scheme,
                      profile=self.loaded.profile.name)
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
) -> Session:
    """Validate inputs cheaply first (model reference, prompts, metrics), then load, quantize
    and baseline."""
    local_model_dir(study.model)
    prompts = read_prompts(study.prompts)
    metrics = resolve_metrics(study.metrics, study.lpips_net, allow_missing_lpips)
    if len(metrics) < len(study.metrics):
        warn("warning: LPIPS backbone weights are missing; scoring without LPIPS "
             "(see the message of `layerscan eval` without --allow-missing-lpips for how to add them)")
    if "accuracy" in metrics:
        check_accuracy_prompts(prompts)
    if study.criterion.metric not in metrics:
        from layerscan.errors import UserError
        raise UserError(f"the criterion uses {study.criterion.metric}, which cannot be computed "
                        "here; choose another with --criterion-metric")
    spec = GenerationSpec(prompts, tuple(study.seeds), study.steps, study.height, study.width,
                          study.guidance, study.image, tuple(sorted(study.pipeline_kwargs.items())))
    loaded = load_pipeline(study.model, device, trust_remote_code=trust_remote_code,
                           revision=study.revision, profile=study.profile)
    scorer = Scorer(metrics, study.lpips_net, str(loaded.device))
    engine = Fp8Engine(loaded, study.activation_scheme)
    if engine.residency == "requantize":
        warn("DiT weights: BF16 and FP8 copies do not fit side by side on "
             f"{loaded.device}; re-quantizing on every switch")
    if study.compile:
        compile_transformer(loaded.transformer)
    engine.apply(None)
    # One process builds a baseline; others on the same cache wait for it and load it.
    with baseline_lock(loaded, spec, cache_root), \
            tqdm(total=len(spec.items()), desc="BF16 baseline", unit="img", leave=False) as bar:
        baseline = load_or_build_baseline(loaded, spec, cache_root,
                                          on_image=lambda i, s: bar.update(1))
    return Session(study, loaded, engine, spec, scorer, metrics, baseline)
