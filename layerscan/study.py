"""A study: one TOML file saying what to search and how, with every field overridable by flags.

Defaults (what ``layerscan run --model M`` alone uses) live in ``Study``'s field defaults, so the
README, the TOML files and the code cannot disagree about them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from layerscan.errors import UserError
from layerscan.metrics import METRICS

# The shipped studies: the top-level studies/ in a checkout (layerscan/studies links to it), the
# package data of the same name in an installed wheel.
STUDIES_DIR = Path(__file__).resolve().parent / "studies"
LOWER_IS_BETTER = {name: not info.higher_is_better for name, info in METRICS.items()}


_RELATIVE = re.compile(r"^\s*floor\s*(?:([+-])\s*([0-9]*\.?[0-9]+(?:[eE][+-]?\d+)?))?\s*$")


@dataclass(frozen=True)
class Threshold:
    """A criterion threshold: absolute, or an offset from the measured noise floor.

    Written ``0.15`` (absolute) or ``"floor + 0.05"`` / ``"floor - 10"`` (relative: the floor's
    value for that statistic plus the signed offset).  A relative threshold says "FP8 may add
    this much to what BF16 itself varies by under numerically equivalent changes".
    """

    value: float
    relative: bool = False

    @classmethod
    def parse(cls, raw: "Threshold | float | int | str") -> "Threshold":
        if isinstance(raw, Threshold):
            return raw
        if isinstance(raw, bool):
            raise UserError(f"a threshold is a number or 'floor + N', not {raw!r}")
        if isinstance(raw, (int, float)):
            return cls(float(raw))
        text = str(raw)
        m = _RELATIVE.match(text)
        if m:
            offset = float(m.group(2)) if m.group(2) else 0.0
            return cls(-offset if m.group(1) == "-" else offset, relative=True)
        try:
            return cls(float(text))
        except ValueError:
            raise UserError(f"threshold {text!r} is neither a number nor 'floor + N' / 'floor - N'") from None

    def resolve(self, floor: float | None) -> float:
        if not self.relative:
            return self.value
        if floor is None:
            raise ValueError("a floor-relative threshold needs the measured noise floor")
        return floor + self.value

    def __str__(self) -> str:
        if not self.relative:
            return f"{self.value:g}"
        return "floor" if self.value == 0 else f"floor {'+' if self.value > 0 else '-'} {abs(self.value):g}"


@dataclass(frozen=True)
class Criterion:
    """Quality a configuration must keep: on the mean over images and on the worst image.

    Pass rule: the pessimistic end of the mean's one-sided 95 % bootstrap interval (the upper
    end for lower-is-better metrics) must meet the mean threshold, and the worst image the
    worst threshold.  A mean that meets its threshold by less than its own sampling uncertainty
    is not a pass: other prompts or seeds could fail it.  Thresholds may be relative to the
    noise floor; ``resolve`` fixes them once the floor is measured.
    """

    metric: str = "lpips"
    # The default for real models; rationale in studies/README.md: FP8 may add one band of
    # vLLM-Omni's LPIPS guide ("minor", 0.05) on the mean to what BF16 varies by under
    # numerically equivalent changes, and one more band (0.15) on the worst image.
    mean: Threshold | float | str = "floor + 0.05"
    worst: Threshold | float | str = "floor + 0.15"
    floor_mean: float | None = None  # the noise floor's statistics, once measured
    floor_worst: float | None = None
    # A settings matrix's outputs come setting after setting, this many each (0: one setting);
    # the pass rule then holds under every setting on its own (``slices``, ``for_setting``),
    # floor-relative thresholds against each setting's own floor (mean, worst).
    per_setting: int = 0
    setting_floors: tuple[tuple[float | None, float | None], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", Threshold.parse(self.mean))
        object.__setattr__(self, "worst", Threshold.parse(self.worst))

    @property
    def lower_is_better(self) -> bool:
        return LOWER_IS_BETTER[self.metric]

    @property
    def mean_limit(self) -> float:
        return self.mean.resolve(self.floor_mean)

    @property
    def worst_limit(self) -> float:
        return self.worst.resolve(self.floor_worst)

    def resolve(self, floor_mean: float | None, floor_worst: float | None) -> "Criterion":
        return dataclasses.replace(self, floor_mean=floor_mean, floor_worst=floor_worst)

    def for_setting(self, number: int) -> "Criterion":
        """The criterion one setting of a matrix is judged by: its own floor where it has one."""
        if not self.setting_floors:
            return self
        floor_mean, floor_worst = self.setting_floors[number]
        return dataclasses.replace(self, floor_mean=floor_mean, floor_worst=floor_worst,
                                   per_setting=0, setting_floors=())

    def slices(self, count: int) -> list[range]:
        """The outputs of each setting among ``count`` (one range without a matrix)."""
        size = self.per_setting or max(count, 1)
        return [range(start, min(start + size, count)) for start in range(0, count, size)]

    def meets(self, value: float, limit: float) -> bool:
        return value <= limit if self.lower_is_better else value >= limit

    def passes(self, mean_bound: float, worst_value: float) -> bool:
        return self.meets(mean_bound, self.mean_limit) and self.meets(worst_value, self.worst_limit)

    def loss(self, mean_value: float) -> float:
        """Quality loss to minimise: the metric itself, or its negation where higher is better."""
        return mean_value if self.lower_is_better else -mean_value

    def describe(self) -> str:
        op = "<=" if self.lower_is_better else ">="
        if self.setting_floors and (self.mean.relative or self.worst.relative):
            # Each setting resolves the thresholds against its own floor: no one number holds.
            return (f"{self.metric} mean {op} {self.mean} and worst {op} {self.worst} under every "
                    "setting, each against its own noise floor")
        return (f"{self.metric} mean {op} {self._limit_text(self.mean, self.floor_mean)} "
                f"and worst {op} {self._limit_text(self.worst, self.floor_worst)}"
                + (" under every setting" if self.per_setting else ""))

    def _limit_text(self, threshold: Threshold, floor: float | None) -> str:
        if not threshold.relative:
            return f"{threshold.value:g}"
        if floor is None:
            return str(threshold)
        fmt = METRICS[self.metric].fmt
        return f"{threshold.resolve(floor):{fmt}} ({threshold}, floor {floor:{fmt}})"


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
    # A settings matrix ([[settings]] tables: name and any of SETTING_KEYS, the rest as above):
    # a configuration passes only if it passes under every setting.
    settings: tuple[dict, ...] = ()
    metrics: tuple[str, ...] = ("lpips", "ssim", "psnr")
    lpips_net: Literal["alex", "vgg"] = "alex"
    criterion: Criterion = field(default_factory=Criterion)
    target: str = "vllm-omni==0.30.0"  # the release the answer is for: see layerscan.profiles
    components: tuple[str, ...] | None = None  # quantized components (default: the target's)
    layer_match: Literal["exact", "substring"] | None = None  # how the target matches ignored_layers (default: the target's)
    granularity: Literal["family", "block", "module"] = "family"
    # default: the same as granularity; "component": the whole text encoder as one group
    text_encoder_granularity: Literal["family", "block", "module", "component"] | None = None
    strategy: Literal["auto", "greedy", "optuna", "exhaustive"] = "auto"
    refine: bool = False  # after the search, refine sensitive groups one level finer
    # What the answer optimises among passing configurations (layerscan.search.answer); None:
    # speed where it is measured as served (compiled, GPU), else memory.
    prefer: Literal["speed", "memory", "quality"] | None = None
    max_trials: int = 200
    timeout_s: float | None = None
    activation_scheme: Literal["token", "tensor"] = "token"
    # Compile the DiT's repeated blocks (None: on GPUs, where FP8 only pays off compiled; the
    # eager step is bound by launching kernels, see benchmarks/RESULTS.md).
    compile: bool | None = None
    profile: str | None = None
    storage: str | None = None  # Optuna storage URL; None: SQLite under the output directory
    seed: int = 0  # sampler seed for strategies that draw at random

    def validate(self) -> "Study":
        if not self.model:
            raise UserError("no model given: pass --model or a study file with model = ...")
        crit = self.criterion
        if crit.metric not in LOWER_IS_BETTER:
            raise UserError(f"criterion metric must be one of {', '.join(LOWER_IS_BETTER)}")
        if crit.metric not in self.metrics:
            raise UserError(f"criterion metric {crit.metric!r} is not among the "
                            f"metrics computed ({', '.join(self.metrics)})")
        low, high = METRICS[crit.metric].low, METRICS[crit.metric].high
        for name in ("mean", "worst"):
            threshold = getattr(crit, name)
            if threshold.relative:
                # An offset that tightens the floor asks FP8 to beat BF16's own variation.
                if threshold.value != 0 and (threshold.value < 0) == crit.lower_is_better:
                    raise UserError(f"criterion {name} {threshold} is stricter than the noise floor; "
                                    f"for {crit.metric} write 'floor {'+' if crit.lower_is_better else '-'} N'")
            elif not low <= threshold.value <= high:
                raise UserError(f"criterion {name} {threshold.value:g} is outside the "
                                f"range of {crit.metric} ({low:g} to {high:g})")
        from layerscan.profiles import resolve_target

        object.__setattr__(self, "target", resolve_target(self.target).name)
        unknown = set(self.metrics) - set(LOWER_IS_BETTER)
        if unknown:
            raise UserError(f"unknown metric(s): {', '.join(sorted(unknown))}")
        if not self.seeds:
            raise UserError("at least one seed is needed")
        if self.settings:
            _check_resolved(self.generation_settings())
        for image in {self.image} | {s.get("image") for s in self.settings}:
            if image is not None and not Path(image).is_file():
                raise UserError(f"input image not found: {image}")
        return self

    def generation_settings(self) -> list[dict]:
        """Each setting of the matrix with every key resolved (the study's value where the
        setting says nothing; ``pipeline_kwargs`` merged over the study's), cheapest first, so
        an early-stopped evaluation tries the cheapest setting that can prove a failure first.
        Without a matrix: the study's one setting."""
        resolved = []
        for entry in self.settings or ({},):
            values = {key: entry.get(key, getattr(self, key)) for key in SETTING_KEYS}
            values["pipeline_kwargs"] = {**self.pipeline_kwargs, **entry.get("pipeline_kwargs", {})}
            values["name"] = entry.get("name") or _setting_name(values)
            resolved.append(values)
        return sorted(resolved, key=setting_cost)

    @property
    def slug(self) -> str:
        return slugify(self.name or self.model)


# What a setting of a matrix may change; everything else (prompts, seeds, the model) is the study's.
SETTING_KEYS = ("steps", "height", "width", "guidance", "image", "pipeline_kwargs")
_SETTING_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]*$")  # part of every output's file name


def _setting_name(values: dict) -> str:
    frames = values["pipeline_kwargs"].get("num_frames")
    return f"{values['width']}x{values['height']}" + (f"x{frames}f" if frames else "") + \
        f"-{values['steps']}steps"


def setting_cost(values: dict) -> float:
    """What one output costs under a setting, in relative units: pixels x frames x steps."""
    frames = values["pipeline_kwargs"].get("num_frames", 1)
    return values["height"] * values["width"] * (frames if isinstance(frames, int) else 1) * values["steps"]


def check_matrix(entries: tuple[dict, ...]) -> tuple[dict, ...]:
    """Each [[settings]] table: known keys with values of their study field's type (returned
    converted, as the study's own: guidance 4 is 4.0), and a name usable in a file name.  That
    no two settings are alike is checked once they are resolved (``Study.validate``)."""
    converted = []
    for number, entry in enumerate(entries, 1):
        where = f"[[settings]] #{number}"
        unknown = set(entry) - set(SETTING_KEYS) - {"name"}
        if unknown:
            raise UserError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; a setting may "
                            f"set name, {', '.join(SETTING_KEYS)}")
        try:
            checked = check_settings({k: v for k, v in entry.items() if k != "name"})
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
        name = entry.get("name")
        if name is not None and not (isinstance(name, str) and _SETTING_NAME.match(name)):
            raise UserError(f"{where}: name {name!r} must be letters, digits, '.' or '-'")
        converted.append(checked | ({"name": name} if name is not None else {}))
    return tuple(converted)


def _check_resolved(settings: list[dict]) -> None:
    """No two settings of a matrix alike or alike in name (outputs are filed by name)."""
    names, seen = set(), {}
    for values in settings:
        key = repr(sorted((k, v) for k, v in values.items() if k != "name"))
        if key in seen:
            raise UserError(f"[[settings]] {values['name']!r} and {seen[key]!r} are the same setting")
        seen[key] = values["name"]
        if values["name"] in names:
            raise UserError(f"two [[settings]] are named {values['name']!r}: name them apart "
                            "(name = \"...\")")
        names.add(values["name"])


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
    # Paths are relative to the study file so a study directory can move as a unit (a value
    # that is not a string is left to check_settings to refuse): the study's, and each setting's.
    entries = values.get("settings") if isinstance(values.get("settings"), list) else []
    for table, key in [(values, "prompts"), (values, "image")] + [(e, "image") for e in entries]:
        if isinstance(table, dict) and isinstance(table.get(key), str) \
                and not Path(table[key]).is_absolute():
            relative = (path.parent / table[key]).resolve()
            table[key] = str(relative) if relative.exists() else table[key]
    return values


# Where a study file's section puts its keys; the flat names are Study's fields (criterion_*:
# Criterion's), and every error names the key as written in the file.
_CRITERION_TYPES = {"criterion_metric": str, "criterion_mean": float | str, "criterion_worst": float | str}
_FLAG_NAMES = {"timeout_s": "--timeout"}  # the flags not spelled like their field
# Settings that must be above zero, or at least zero, once their type is right.
_POSITIVE = ("steps", "height", "width", "max_trials", "timeout_s")
_NON_NEGATIVE = ("guidance",)
_TYPE_WORDS = {int: "a whole number", float: "a number", str: "a string", bool: "true or false",
               dict: "a table of keyword arguments"}


@functools.cache
def _schema() -> dict:
    """Every setting's declared type: ``Study``'s annotations and the criterion's (resolved once)."""
    return typing.get_type_hints(Study) | _CRITERION_TYPES


def setting_names() -> set[str]:
    """Every setting a study file or a flag may give: ``Study``'s fields and the criterion's."""
    return set(_schema()) - {"criterion"}


def as_written(key: str, as_flags: bool) -> str:
    """A setting as the user wrote it: ``--timeout`` as a flag, ``criterion.mean`` in a file."""
    if as_flags:
        return _FLAG_NAMES.get(key, "--" + key.replace("_", "-"))
    return key.replace("criterion_", "criterion.", 1)


def choices(name: str) -> list[str]:
    """The values a choice field of ``Study`` takes, from its annotation (the CLI's choices)."""
    hint = _schema()[name]
    for option in (hint, *typing.get_args(hint)):
        if typing.get_origin(option) is Literal:
            return list(typing.get_args(option))
    raise ValueError(f"{name} is not a choice field")


def _describe_type(hint) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        if item is dict:
            return "a list of tables, e.g. [[settings]] with steps = 8"
        return f"a list of {_TYPE_WORDS[item].removeprefix('a ')}s, e.g. " + \
            ("[0, 1]" if item is int else '["a", "b"]')
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe_type(h) for h in typing.get_args(hint) if h is not type(None))
    return _TYPE_WORDS.get(hint, getattr(hint, "__name__", str(hint)))


def _conform(hint, value):
    """``value`` as the type ``hint`` declares, or raise ValueError.  Lists become tuples and whole
    numbers are numbers; nothing else is converted (a string "10" is not a step count)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _conform(option, value)
            except ValueError:
                continue
        raise ValueError
    if origin is Literal:
        if isinstance(value, str) and value in typing.get_args(hint):
            return value
        raise ValueError
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError
        return tuple(_conform(typing.get_args(hint)[0], item) for item in value)
    if hint is bool or isinstance(value, bool):  # True is an int to Python, not to a study
        if hint is bool and isinstance(value, bool):
            return value
        raise ValueError
    if hint is float and isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError
        return float(value)
    if hint in (int, str, dict) and isinstance(value, hint):
        return value
    raise ValueError



def check_settings(values: dict, as_flags: bool = False) -> dict:
    """Every setting's type and range, before anything loads: one line naming the key (or with
    ``as_flags`` the flag), the value and what is accepted.  The types are ``Study``'s field
    annotations, so a new field is checked the moment it is declared."""
    def setting(key: str, value) -> str:
        return f"{as_written(key, as_flags)} {value}" if as_flags else f"setting {as_written(key, False)} = {value!r}"

    hints = _schema()
    unknown = set(values) - set(hints)
    if unknown:
        names = sorted(as_written(k, as_flags) for k in unknown)
        raise UserError(f"unknown study field(s): {', '.join(names)}")
    checked = {}
    for key, value in values.items():
        if key == "criterion":
            raise UserError("criterion is a [criterion] table with metric, mean and worst")
        try:
            checked[key] = _conform(hints[key], value)
        except ValueError:
            raise UserError(f"{setting(key, value)}: expected {_describe_type(hints[key])}") from None
    for key in _POSITIVE:
        if checked.get(key) is not None and checked[key] <= 0:
            raise UserError(f"{setting(key, checked[key])}: expected a number above 0")
    for key in _NON_NEGATIVE:
        if checked.get(key) is not None and checked[key] < 0:
            raise UserError(f"{setting(key, checked[key])}: expected a number of at least 0")
    if "settings" in checked:
        checked["settings"] = check_matrix(checked["settings"])
    for seed in checked.get("seeds", ()):
        if not 0 <= seed < 2 ** 63:  # what torch.Generator.manual_seed takes without wrapping
            raise UserError(f"{setting('seeds', list(checked['seeds']))}: {seed} is not a seed "
                            "(0 to 2**63 - 1)")
    return checked


def build_study(values: dict) -> Study:
    """Study from flat values (study file first, then flags that were given)."""
    values = check_settings({k: v for k, v in values.items() if v is not None})
    crit = {k[len("criterion_"):]: values.pop(k) for k in list(values) if k.startswith("criterion_")}
    base = _default_criterion(crit.get("metric"))
    criterion = Criterion(**{"metric": base.metric, "mean": base.mean, "worst": base.worst, **crit})
    study = Study(**values, criterion=criterion)
    return dataclasses.replace(study, prompts=resolve_prompts(study.prompts)).validate()


DEFAULT_CRITERIA = {  # rationale for each in studies/README.md
    "lpips": Criterion(),
    "ssim": Criterion("ssim", 0.95, 0.90),
    "psnr": Criterion("psnr", 30.0, 25.0),
    "accuracy": Criterion("accuracy", 0.9, 0.0),
}


def _default_criterion(metric: str | None) -> Criterion:
    """Each metric's default thresholds (rationale in studies/README.md)."""
    metric = metric or "lpips"
    if metric in DEFAULT_CRITERIA:
        return DEFAULT_CRITERIA[metric]
    info = METRICS.get(metric)
    if info is None:
        raise UserError(f"unknown criterion metric {metric!r}; choose from: {', '.join(METRICS)}")
    # Optional metrics have no defaults of their own: within the noise floor.
    return Criterion(metric, "floor", "floor")
