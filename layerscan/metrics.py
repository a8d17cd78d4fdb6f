"""Score generated images against the BF16 baseline images of the same prompts (and their prompts).

Four metrics, all computed on the uint8 HxWx3 arrays layerscan writes as PNG:

* ``lpips`` -- learned perceptual distance (lower is better). Needs the torchvision ImageNet
  backbone checkpoint on disk; it is never downloaded and never replaced by random weights,
  because an LPIPS built on a random backbone still returns plausible-looking numbers and
  would silently corrupt every search decision made from it.
* ``ssim`` -- structural similarity (higher is better), ``skimage`` implementation.
* ``psnr`` -- peak signal-to-noise ratio in dB (higher is better), capped at
  ``PSNR_IDENTICAL_DB`` so identical images do not produce ``inf``.
* ``accuracy`` -- task-level fidelity, for prompts the demo checker reads
  (``layerscan.demo.checker``): 1 when the picture shows every colour, shape, position and
  background its prompt names, else 0; the mean over prompts is prompt-following accuracy.
  Unlike the other three it compares with the prompt, not with the BF16 picture, so BF16
  itself has an accuracy to compare FP8 with.

How the ``lpips`` package loads weights (read from lpips 0.1.4, relied on here):

* ``lpips.LPIPS(pnet_rand=False)`` builds the backbone with ``torchvision.models.alexnet(
  pretrained=True)`` / ``vgg16(pretrained=True)``, which downloads the checkpoint into
  ``torch.hub.get_dir()/checkpoints`` when it is absent. We always pass ``pnet_rand=True``
  (no download can be attempted), build the skeleton on the ``meta`` device (no random
  values exist at any point) and attach the checkpoint's tensors ourselves.
* ``lpips.LPIPS(pretrained=True)`` loads the linear-layer weights shipped inside the wheel
  (``lpips/weights/v0.1/<net>.pth``) with a bare ``torch.load`` (no ``weights_only``; only
  torch>=2.6's changed default makes that safe) and ``load_state_dict(strict=False)``, which
  would also hide a missing key. We pass ``pretrained=False`` and load that file ourselves
  with an explicit ``weights_only=True`` and strict key checking.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from layerscan.errors import UserError

if TYPE_CHECKING:
    import torch

__all__ = [
    "LPIPS_MIN_SIDE",
    "LPIPS_NETS",
    "METRICS",
    "PSNR_IDENTICAL_DB",
    "LpipsWeightsMissing",
    "MetricInfo",
    "MetricSummary",
    "Scorer",
    "check_accuracy_prompts",
    "checker_fingerprint",
    "check_lpips_weights",
    "lpips_weights_path",
    "lpips_weights_url",
    "resolve_metrics",
    "summarize",
]

PSNR_IDENTICAL_DB = 100.0
"""PSNR reported for identical images (whose true PSNR is infinite), and the ceiling for all PSNRs.

An ``inf`` would make every mean containing it ``inf`` and hide the other prompts. 100 dB is far
above what any visible difference produces (one grey level of error on every pixel is 48 dB), so
the cap only ever merges "identical" with "a handful of pixels off by one level in a huge image";
applying it to every value, not only to exact matches, keeps identical images ranked no worse
than nearly identical ones.
"""

LPIPS_MIN_SIDE = 32
"""Smallest image side fed to the LPIPS backbone; smaller pairs are upsampled (bilinear) first.

Measured with lpips 0.1.4: AlexNet's pooling stack fails below 31 px, VGG16's below 16 px. 32 px
works for both, so smaller images (e.g. tiny test models) are scaled up with the same factor for
image and reference, keeping the aspect ratio, until their shorter side is 32 px.
"""

LPIPS_NETS: dict[str, str] = {"alex": "alexnet", "vgg": "vgg16"}
"""LPIPS backbone names accepted here -> torchvision architecture names."""

_SSIM_DEFAULT_WIN = 7
_PSNR_DATA_RANGE = 255.0


class LpipsWeightsMissing(UserError):
    """The torchvision backbone checkpoint LPIPS needs is absent or unreadable.

    A ``UserError`` because the user fixes it by copying a file (or by dropping LPIPS); the
    message is one line naming the path, the download URL and the flags to continue without it.
    """


@dataclass(frozen=True)
class MetricInfo:
    """Static facts about a metric that reports and summaries need.

    ``higher_is_better`` decides what "worst" means; ``low``/``high`` bound the values it can
    take (a threshold outside them is a mistake, and the better end is the best score a prompt
    could still reach); ``unit`` and ``fmt`` are display hints (``format(value, fmt)`` followed
    by ``unit``).
    """

    name: str
    higher_is_better: bool
    low: float
    high: float
    unit: str = ""
    fmt: str = ".4f"

    @property
    def best(self) -> float:
        return self.high if self.higher_is_better else self.low

    def format(self, value: float) -> str:
        """Render a value for tables and logs, e.g. ``"31.25 dB"``."""
        text = format(value, self.fmt)
        return f"{text} {self.unit}" if self.unit else text


METRICS: dict[str, MetricInfo] = {
    "lpips": MetricInfo("lpips", higher_is_better=False, low=0.0, high=math.inf, fmt=".4f"),
    "ssim": MetricInfo("ssim", higher_is_better=True, low=-1.0, high=1.0, fmt=".4f"),
    # uint8 pictures: 0 dB at the largest possible error, capped where they are identical.
    "psnr": MetricInfo("psnr", higher_is_better=True, low=0.0, high=PSNR_IDENTICAL_DB, unit="dB",
                       fmt=".2f"),
    "accuracy": MetricInfo("accuracy", higher_is_better=True, low=0.0, high=1.0, fmt=".3f"),
}


@dataclass
class MetricSummary:
    """Scores of a set of prompts: every prompt's values, plus their mean and worst per metric.

    ``worst`` is the max for lower-is-better metrics (lpips) and the min for higher-is-better ones
    (ssim, psnr); a NaN anywhere makes both mean and worst NaN, since NaN is never a good score.
    """

    per_prompt: list[dict[str, float]]
    mean: dict[str, float] = field(default_factory=dict)
    worst: dict[str, float] = field(default_factory=dict)


def summarize(per_prompt: list[dict[str, float]]) -> MetricSummary:
    """Aggregate per-prompt scores into mean and worst.

    All dicts must have the same metric names and those names must be in ``METRICS`` (otherwise
    "worst" is undefined); an empty list is an error because a mean of nothing is not a score.
    """
    if not per_prompt:
        raise ValueError("summarize() needs at least one prompt's scores, got none")
    names = list(per_prompt[0])
    for i, scores in enumerate(per_prompt):
        if set(scores) != set(names):
            raise ValueError(
                f"prompt {i} has metrics {sorted(scores)}, prompt 0 has {sorted(names)}; "
                "all prompts must be scored with the same metrics"
            )
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {sorted(METRICS)}")

    mean: dict[str, float] = {}
    worst: dict[str, float] = {}
    for name in names:
        values = [float(scores[name]) for scores in per_prompt]
        if any(math.isnan(v) for v in values):
            mean[name] = worst[name] = math.nan
            continue
        mean[name] = math.fsum(values) / len(values)
        worst[name] = min(values) if METRICS[name].higher_is_better else max(values)
    return MetricSummary(per_prompt=[dict(s) for s in per_prompt], mean=mean, worst=worst)


# ----------------------------------------------------------------------------- LPIPS weights


def _check_net(net: str) -> str:
    if net not in LPIPS_NETS:
        raise UserError(f"unknown LPIPS network {net!r}; choose one of: {', '.join(LPIPS_NETS)}")
    return LPIPS_NETS[net]


def lpips_weights_url(net: str = "alex") -> str:
    """Download URL of the torchvision ImageNet checkpoint for an LPIPS backbone.

    Read from torchvision's weights enums at runtime so the name always matches what the
    installed torchvision would itself look for.
    """
    arch = _check_net(net)
    from torchvision.models import AlexNet_Weights, VGG16_Weights

    weights = AlexNet_Weights.IMAGENET1K_V1 if arch == "alexnet" else VGG16_Weights.IMAGENET1K_V1
    return weights.url


def lpips_weights_path(net: str = "alex") -> Path:
    """Where torchvision keeps the backbone checkpoint: ``torch.hub.get_dir()/checkpoints/<file>``.

    ``torch.hub.get_dir()`` honours ``TORCH_HOME`` (and ``XDG_CACHE_HOME``) at call time, so
    this is the same place a download on a machine with internet would have put the file.
    """
    import torch.hub

    filename = os.path.basename(lpips_weights_url(net))
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _missing_message(net: str, path: Path, problem: str) -> str:
    """One line (the CLI prints UserErrors as a single line): path, URL, and how to skip LPIPS."""
    problem = " ".join(problem.split())
    if len(problem) > 300:  # torch's unpickling errors run to dozens of lines
        problem = problem[:300] + "..."
    return (
        f"LPIPS ({net}) needs the torchvision {LPIPS_NETS[net]} ImageNet weights at {path} "
        f"but {problem}; on a machine with internet download {lpips_weights_url(net)} and copy "
        f"it to that path (or point TORCH_HOME at a directory holding hub/checkpoints/"
        f"{path.name}), or continue without LPIPS with --metrics ssim,psnr or --allow-missing-lpips"
    )


def check_lpips_weights(net: str = "alex") -> None:
    """Raise ``LpipsWeightsMissing`` unless the backbone checkpoint file exists locally.

    Only checks presence (cheap, for early CLI validation); ``Scorer`` additionally loads and
    validates the file and raises the same error if it is corrupt or of the wrong architecture.
    """
    path = lpips_weights_path(net)
    if not path.is_file():
        raise LpipsWeightsMissing(_missing_message(net, path, "the file does not exist"))


def _metric_names(requested: Sequence[str]) -> list[str]:
    """Known metric names, lower-cased and de-duplicated in request order; at least one."""
    names: list[str] = []
    for raw in requested:
        name = raw.strip().lower()
        if name not in METRICS:
            raise UserError(f"unknown metric {raw!r}; choose from: {', '.join(METRICS)}")
        if name not in names:
            names.append(name)
    if not names:
        raise UserError(f"no metrics requested; choose from: {', '.join(METRICS)}")
    return names


def resolve_metrics(
    requested: Sequence[str], lpips_net: str, allow_missing_lpips: bool
) -> list[str]:
    """Validate requested metric names and decide whether LPIPS can be used.

    Returns the names (lower-cased, de-duplicated, in request order). If ``lpips`` is requested
    and its backbone checkpoint is missing: raise ``LpipsWeightsMissing``, or, when
    ``allow_missing_lpips`` is set, return the list without ``lpips`` (the caller warns).
    A comma-separated string is accepted too, as typed after ``--metrics``. If LPIPS was the
    only metric requested, dropping it would leave nothing to score, so the error is raised
    even with ``allow_missing_lpips``.
    """
    if isinstance(requested, str):
        requested = requested.split(",")
    names = _metric_names([raw for raw in requested if raw.strip()])
    if "lpips" in names:
        _check_net(lpips_net)
        try:
            check_lpips_weights(lpips_net)
        except LpipsWeightsMissing:
            if not allow_missing_lpips:
                raise
            names.remove("lpips")
            if not names:
                raise
    return names


class _BadCheckpoint(Exception):
    """Internal: a weights file could not be read as a tensor state dict (callers re-raise)."""


def _load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load`` with ``weights_only=True`` (never unpickles code); failures -> _BadCheckpoint.

    Only the exception type goes into the message: torch's own text recommends retrying with
    ``weights_only=False``, which is exactly what must not be done with a downloaded file.
    """
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, or a pickle with non-tensor objects
        raise _BadCheckpoint(
            f"the file is corrupt or not a plain tensor checkpoint ({type(exc).__name__})"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise _BadCheckpoint("the file is not a state dict of tensors")
    return state


def _build_lpips(net: str, device: str) -> torch.nn.Module:
    """Build an LPIPS model whose every learned tensor comes from a file on disk.

    The model skeleton is constructed on the ``meta`` device with ``pnet_rand=True`` and
    ``pretrained=False``: no download is attempted, and no random values are ever computed
    (meta tensors have shapes but no data). Backbone and linear layers are then attached from
    their files with strict ``load_state_dict(assign=True)``, so a missing, mis-shaped or
    mis-named tensor raises; a tensor left unloaded would stay on ``meta`` and is caught by the
    final check. (The two ScalingLayer buffers are constants built with the legacy
    ``torch.Tensor(list)`` constructor, which ignores the device context and gives real values.)
    The LPIPS backbone keeps torchvision's ``features`` modules under their original indices,
    split into slices (``net.slice2.3.weight`` is ``features.3.weight``): the key mapping.
    """
    import lpips
    import torch

    path = lpips_weights_path(net)
    check_lpips_weights(net)
    try:
        backbone_state = _load_checkpoint(path)
    except _BadCheckpoint as exc:
        raise LpipsWeightsMissing(_missing_message(net, path, f"{exc}; delete it")) from exc

    with warnings.catch_warnings():
        # lpips passes torchvision's deprecated ``pretrained=False``; harmless, but noisy.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\.models")
        with torch.device("meta"):
            model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)

    # Backbone: net.sliceK.<idx>.<param> <- features.<idx>.<param>
    mapped: dict[str, torch.Tensor] = {}
    for key in model.net.state_dict():
        _slice, rest = key.split(".", 1)
        source = f"features.{rest}"
        if source not in backbone_state:
            raise LpipsWeightsMissing(
                _missing_message(net, path, f"the file has no tensor {source!r}; is it the "
                                 f"{LPIPS_NETS[net]} checkpoint?")
            )
        mapped[key] = backbone_state[source]
    try:
        model.net.load_state_dict(mapped, strict=True, assign=True)
    except RuntimeError as exc:
        problem = f"its tensors do not fit {LPIPS_NETS[net]} ({exc})"
        raise LpipsWeightsMissing(_missing_message(net, path, problem)) from exc

    # Linear layers: shipped in the lpips wheel as lin<i>.model.1.weight.
    lin_path = Path(lpips.__file__).parent / "weights" / f"v{model.version}" / f"{net}.pth"
    try:
        lin_state = _load_checkpoint(lin_path)
    except _BadCheckpoint as exc:
        raise UserError(f"cannot read the lpips package file {lin_path}: {exc}; "
                        "reinstall lpips==0.1.4") from exc
    expected = {f"lin{i}.model.1.weight" for i in range(len(model.lins))}
    if set(lin_state) != expected:
        raise UserError(
            f"the lpips package file {lin_path} has keys {sorted(lin_state)}, expected "
            f"{sorted(expected)}; reinstall lpips==0.1.4"
        )
    for i, lin in enumerate(model.lins):
        try:
            lin.load_state_dict(
                {"model.1.weight": lin_state[f"lin{i}.model.1.weight"]}, strict=True, assign=True
            )
        except RuntimeError as exc:
            raise UserError(
                f"the lpips package file {lin_path} does not fit the {net} model "
                f"({' '.join(str(exc).split())}); reinstall lpips==0.1.4"
            ) from exc

    # Belt and braces: anything not loaded from a file is still a data-less meta tensor.
    unloaded = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unloaded:
        raise RuntimeError(f"LPIPS tensors not loaded from any file: {unloaded}")

    model.eval().requires_grad_(False)
    return model.to(device)


# ----------------------------------------------------------------------------- scoring


def _check_pair(image: np.ndarray, reference: np.ndarray) -> None:
    for label, arr in (("image", image), ("reference", reference)):
        if not isinstance(arr, np.ndarray):
            raise ValueError(f"{label} must be a numpy array, got {type(arr).__name__}")
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ValueError(f"{label} must be HxWx3, got shape {arr.shape}")
        if arr.dtype != np.uint8:
            # The metrics assume a 0..255 range; a float image in 0..1 would score as garbage.
            raise ValueError(f"{label} must be uint8 (0..255), got dtype {arr.dtype}")
    if image.shape != reference.shape:
        raise ValueError(
            f"image shape {image.shape} differs from reference shape {reference.shape}; "
            "images must be generated at the baseline's resolution to be compared"
        )


def _psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """skimage PSNR with data_range 255, capped at ``PSNR_IDENTICAL_DB`` (identical -> the cap)."""
    from skimage.metrics import peak_signal_noise_ratio

    if np.array_equal(image, reference):
        return PSNR_IDENTICAL_DB
    value = float(peak_signal_noise_ratio(reference, image, data_range=_PSNR_DATA_RANGE))
    return min(value, PSNR_IDENTICAL_DB)


def _ssim_win_size(height: int, width: int) -> int:
    """The default 7, or the largest odd window that fits a smaller image (at least 3)."""
    side = min(height, width, _SSIM_DEFAULT_WIN)
    win = side if side % 2 == 1 else side - 1
    if win < 3:
        # win_size 1 divides by zero in skimage's sample covariance.
        raise ValueError(f"SSIM needs images of at least 3x3 pixels, got {height}x{width}")
    return win


def _ssim(image: np.ndarray, reference: np.ndarray) -> float:
    """skimage SSIM over RGB (channel_axis=-1, data_range=255), window shrunk for tiny images."""
    from skimage.metrics import structural_similarity

    win = _ssim_win_size(image.shape[0], image.shape[1])
    return float(
        structural_similarity(
            reference, image, channel_axis=-1, data_range=_PSNR_DATA_RANGE, win_size=win
        )
    )


def check_accuracy_prompts(prompts: Sequence[str]) -> None:
    """``accuracy`` needs prompts that name what the checker reads; say which do not."""
    from layerscan.demo.checker import parse_prompt

    specs = {p: parse_prompt(p) for p in prompts}
    unreadable = [p for p, spec in specs.items() if spec.colour is None or spec.shape is None]
    if unreadable:
        raise UserError(f"metric 'accuracy' reads demo-style prompts (\"a red circle in the top left on a "
                        f"white background\"); {len(unreadable)} prompt(s) name no colour or shape, "
                        f"e.g. {unreadable[0]!r}: drop 'accuracy' from the metrics or use such prompts")


def checker_fingerprint() -> str:
    """A hash of the checker's code and the palette it names colours by."""
    import hashlib

    from layerscan.demo import checker, scenes

    digest = hashlib.sha256()
    for module in (checker, scenes):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


def _prompt_accuracy(image: np.ndarray, prompt: str | None) -> float:
    from layerscan.demo.checker import check

    if prompt is None:
        raise ValueError("metric 'accuracy' needs the prompt of each image")
    return 1.0 if check(image, prompt).correct else 0.0


class Scorer:
    """Scores images against references with a fixed set of metrics.

    LPIPS is built eagerly in ``__init__`` so a missing or broken backbone checkpoint fails
    before any (expensive) generation, never later in a search. Images whose shorter side is
    below ``LPIPS_MIN_SIDE`` are upsampled bilinearly (same size for both images) before LPIPS
    only; SSIM and PSNR always see the original pixels.
    """

    def __init__(
        self,
        metrics: Sequence[str] = ("lpips", "ssim", "psnr"),
        lpips_net: str = "alex",
        device: str = "cpu",
    ) -> None:
        if isinstance(metrics, str):
            metrics = metrics.split(",")
        self.metrics: tuple[str, ...] = tuple(_metric_names(metrics))
        self.lpips_net = lpips_net
        self.device = device
        self._lpips: torch.nn.Module | None = None
        if "lpips" in self.metrics:
            _check_net(lpips_net)
            self._lpips = _build_lpips(lpips_net, device)

    @property
    def lpips_model(self) -> torch.nn.Module | None:
        """The loaded LPIPS module (``None`` when LPIPS is not among the metrics)."""
        return self._lpips

    def _lpips_distance(self, image: np.ndarray, reference: np.ndarray) -> float:
        import torch
        import torch.nn.functional as F

        assert self._lpips is not None
        pair = np.stack([image, reference])  # 2xHxWx3 uint8
        x = torch.from_numpy(pair).to(self.device).permute(0, 3, 1, 2).float()
        x = x / 127.5 - 1.0  # LPIPS expects [-1, 1]
        h, w = x.shape[-2:]
        if min(h, w) < LPIPS_MIN_SIDE:
            scale = LPIPS_MIN_SIDE / min(h, w)
            size = (max(LPIPS_MIN_SIDE, round(h * scale)), max(LPIPS_MIN_SIDE, round(w * scale)))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        with torch.inference_mode():
            distance = self._lpips(x[0:1], x[1:2])
        return float(distance.reshape(-1)[0].item())

    def score_pair(self, image: np.ndarray, reference: np.ndarray,
                   prompt: str | None = None) -> dict[str, float]:
        """Score one generated image against its baseline (and, for ``accuracy``, its prompt);
        keys in the order of ``metrics``."""
        _check_pair(image, reference)
        scores: dict[str, float] = {}
        for name in self.metrics:
            if name == "lpips":
                scores[name] = self._lpips_distance(image, reference)
            elif name == "ssim":
                scores[name] = _ssim(image, reference)
            elif name == "accuracy":
                scores[name] = _prompt_accuracy(image, prompt)
            else:
                scores[name] = _psnr(image, reference)
        return scores

    def score(
        self, images: Sequence[np.ndarray], references: Sequence[np.ndarray],
        prompts: Sequence[str] | None = None,
    ) -> MetricSummary:
        """Score prompt i's image against reference i for every i, then summarize."""
        if len(images) != len(references) or (prompts is not None and len(prompts) != len(images)):
            raise ValueError(
                f"got {len(images)} images but {len(references)} references"
                f"{'' if prompts is None else f' and {len(prompts)} prompts'}; "
                "need one baseline image (and prompt) per generated image"
            )
        prompts = list(prompts) if prompts is not None else [None] * len(images)
        return summarize([self.score_pair(img, ref, prompt)
                          for img, ref, prompt in zip(images, references, prompts)])
