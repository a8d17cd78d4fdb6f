"""A study: one TOML file saying what to search and how, with every field overridable by flags.

Defaults (what ``layerscan run --model M`` alone uses) live in ``Study``'s field defaults, so the
README, the TOML files and the code cannot disagree about them.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from layerscan.errors import UserError
from layerscan.layers import GRANULARITIES
from layerscan.metrics import METRICS

STUDIES_DIR = Path(__file__).resolve().parent.parent / "studies"
LOWER_IS_BETTER = {name: not info.higher_is_better for name, info in METRICS.items()}


@dataclass(frozen=True)
class Criterion:
    """Quality a configuration must keep, on the prompt mean and on the worst prompt."""

    metric: str = "lpips"
    mean: float = 0.05
    worst: float = 0.10

    def passes(self, mean_value: float, worst_value: float) -> bool:
        if LOWER_IS_BETTER[self.metric]:
            return mean_value <= self.mean and worst_value <= self.worst
        return mean_value >= self.mean and worst_value >= self.worst

    def loss(self, mean_value: float) -> float:
        """Quality loss to minimise: the metric itself, or its negation where higher is better."""
        return mean_value if LOWER_IS_BETTER[self.metric] else -mean_value

    def describe(self) -> str:
        op = "<=" if LOWER_IS_BETTER[self.metric] else ">="
        return f"{self.metric} mean {op} {self.mean:g} and worst {op} {self.worst:g}"


@dataclass(frozen=True)
class Study:
    model: str = ""
    revision: str | None = None
    name: str = ""
    prompts: str = "studies/prompts/default.txt"
    seeds: tuple[int, ...] = (0,)
    steps: int = 20
    height: int = 512
    width: int = 512
    guidance: float = 4.0
    image: str | None = None  # input image, for editing pipelines
    pipeline_kwargs: dict = field(default_factory=dict)  # passed to the pipeline call as is
    metrics: tuple[str, ...] = ("lpips", "ssim", "psnr")
    lpips_net: str = "alex"
    criterion: Criterion = field(default_factory=Criterion)
    granularity: str = "family"
    strategy: str = "auto"
    refine: bool = False  # after the search, refine sensitive groups one level finer
    max_trials: int = 200
    timeout_s: float | None = None
    activation_scheme: str = "token"
    compile: bool = False  # compile the DiT's repeated blocks (FP8 only pays off compiled on GPUs)
    profile: str | None = None
    storage: str | None = None  # Optuna storage URL; None: SQLite under the output directory
    seed: int = 0  # sampler seed for strategies that draw at random

    def validate(self) -> "Study":
        if not self.model:
            raise UserError("no model given: pass --model or a study file with model = ...")
        if self.criterion.metric not in LOWER_IS_BETTER:
            raise UserError(f"criterion metric must be one of {', '.join(LOWER_IS_BETTER)}")
        if self.criterion.metric not in self.metrics:
            raise UserError(f"criterion metric {self.criterion.metric!r} is not among the "
                            f"metrics computed ({', '.join(self.metrics)})")
        low, high = METRICS[self.criterion.metric].low, METRICS[self.criterion.metric].high
        for name in ("mean", "worst"):
            if not low <= getattr(self.criterion, name) <= high:
                raise UserError(f"criterion {name} {getattr(self.criterion, name):g} is outside the "
                                f"range of {self.criterion.metric} ({low:g} to {high:g})")
        unknown = set(self.metrics) - set(LOWER_IS_BETTER)
        if unknown:
            raise UserError(f"unknown metric(s): {', '.join(sorted(unknown))}")
        if self.granularity not in GRANULARITIES:
            raise UserError(f"granularity must be one of {', '.join(GRANULARITIES)}")
        for name in ("steps", "height", "width", "max_trials"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be positive")
        if not self.seeds:
            raise UserError("at least one seed is needed")
        if self.image is not None and not Path(self.image).is_file():
            raise UserError(f"input image not found: {self.image}")
        return self

    @property
    def slug(self) -> str:
        return slugify(self.name or self.model)


def slugify(text: str) -> str:
    """``Qwen/Qwen-Image`` -> ``qwen-image``; a directory -> its name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(text.rstrip("/")).name).strip("-").lower() or "model"


def find_study_for_model(model: str) -> Path | None:
    """The shipped study whose ``model`` is this model, so ``--model M`` alone gets its settings."""
    if not STUDIES_DIR.is_dir():
        return None
    for path in sorted(STUDIES_DIR.glob("*.toml")):
        try:
            if tomllib.loads(path.read_text(encoding="utf-8")).get("model") == model:
                return path
        except tomllib.TOMLDecodeError:
            continue
    return None


def resolve_prompts(path: str) -> str:
    """Relative prompt paths that do not exist from here are looked up in the project root."""
    if Path(path).exists() or Path(path).is_absolute():
        return path
    fallback = STUDIES_DIR.parent / path
    return str(fallback) if fallback.exists() else path


def load_study(path: str | Path) -> dict:
    """Read a study TOML into a flat dict of Study fields (unknown keys are an error)."""
    path = Path(path)
    if not path.is_file():
        candidate = STUDIES_DIR / f"{path}.toml"
        if not candidate.is_file():
            raise UserError(f"study file not found: {path}")
        path = candidate
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: invalid TOML: {exc}") from None
    values = {}
    for section, entries in data.items():
        if section in ("criterion", "budget", "generation") and isinstance(entries, dict):
            prefix = "criterion_" if section == "criterion" else ""
            values.update({prefix + k: v for k, v in entries.items()})
        else:
            values[section] = entries
    for key in ("prompts", "image"):
        # Paths are relative to the study file so a study directory can move as a unit.
        if key in values and not Path(values[key]).is_absolute():
            relative = (path.parent / values[key]).resolve()
            values[key] = str(relative) if relative.exists() else values[key]
    return values


def build_study(values: dict) -> Study:
    """Study from flat values (study file first, then flags that were given)."""
    values = {k: v for k, v in values.items() if v is not None}
    crit = {k[len("criterion_"):]: values.pop(k) for k in list(values) if k.startswith("criterion_")}
    known = {f.name for f in dataclasses.fields(Study)}
    unknown = set(values) - known
    if unknown:
        raise UserError(f"unknown study field(s): {', '.join(sorted(unknown))}")
    for key in ("seeds", "metrics"):
        if key in values:
            values[key] = tuple(values[key])
    criterion = Criterion(**{**dataclasses.asdict(_default_criterion(crit.get("metric"))), **crit})
    study = Study(**values, criterion=criterion)
    return dataclasses.replace(study, prompts=resolve_prompts(study.prompts)).validate()


def _default_criterion(metric: str | None) -> Criterion:
    """Each metric's default thresholds (rationale in studies/README.md)."""
    defaults = {"lpips": Criterion("lpips", 0.05, 0.10),
                "ssim": Criterion("ssim", 0.95, 0.90),
                "psnr": Criterion("psnr", 30.0, 25.0),
                "accuracy": Criterion("accuracy", 0.9, 0.0)}
    return defaults.get(metric or "lpips", Criterion(metric or "lpips"))
