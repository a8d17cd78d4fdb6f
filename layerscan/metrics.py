"""Score generated images or videos against the BF16 baseline of the same prompts (and the prompts).

All metrics are computed on the uint8 HxWx3 arrays layerscan writes as PNG (videos: TxHxWx3).
The default four:

* ``lpips`` -- learned perceptual distance (lower is better). Needs the torchvision ImageNet
  backbone checkpoint on disk: fetched on first use, never replaced by random weights (see
  ``layerscan.lpips_weights``, which owns the file and builds the model from it).
* ``ssim`` -- structural similarity (higher is better), ``skimage`` implementation.
* ``psnr`` -- peak signal-to-noise ratio in dB (higher is better), capped at
  ``PSNR_IDENTICAL_DB`` so identical images do not produce ``inf``.
* ``accuracy`` -- task-level fidelity, for prompts the demo checker reads
  (``layerscan.demo.checker``): 1 when the picture shows every colour, shape, position and
  background its prompt names, else 0; the mean over prompts is prompt-following accuracy.
  Unlike the other three it compares with the prompt, not with the BF16 picture, so BF16
  itself has an accuracy to compare FP8 with.

Optional pixel metrics, never computed unless asked for, with the definitions of vLLM-Omni's
``vllm_omni/quantization/tools/compare_diffusion_trajectory_similarity.py`` (float64 on the 0-255
scale, the BF16 picture as the reference) so its recommended thresholds (cosine >= 0.98,
MAE <= 12, relative L2 <= 0.20) can be applied to layerscan's numbers:

* ``cosine`` -- cosine similarity of the flattened pixel vectors (higher is better). The vectors
  are uncentred and non-negative, so it sits close to 1 even for clearly different pictures.
* ``mae`` -- mean absolute pixel difference in grey levels (lower is better).
* ``rel_l2`` -- ``||reference - image|| / ||reference||`` (lower is better).

Video only (``Scorer.score_video``):

* ``temporal`` -- flicker the candidate has and the baseline had not (lower is better): the mean
  absolute change of the per-pixel error between consecutive frames, in grey levels. See
  ``_temporal`` for why this definition.

LPIPS, as vLLM-Omni computes it. vLLM-Omni's FP8 quality gates (``benchmarks/diffusion/
quantization_quality.py``, reused by its quantization tests, which gate each model at an LPIPS of
0.15 to 0.35) compute LPIPS with a fixed protocol, and layerscan reproduces it so that its numbers
can be read against those gates:

* Images: the PIL image is resized to 256x256 with PIL's bilinear filter (torchvision's
  ``Resize((256, 256))`` on a PIL image calls exactly that; PIL always antialiases, and the aspect
  ratio is not kept: non-square pictures are squashed), turned into float32 by ``ToTensor``
  (``/255``) and ``Normalize(0.5, 0.5)`` (``-0.5``, ``/0.5``), giving [-1, 1], and passed as
  ``loss_fn(baseline, candidate)`` to ``lpips.LPIPS(net=...)`` with its defaults (version 0.1,
  linear calibration on, spatial average), one pair per call. The resize matters for the value,
  not only for speed: AlexNet's filters have fixed sizes in pixels, so the same two pictures at
  1024 px and at 256 px give different distances, and a threshold is only meaningful at the
  resolution it was chosen at. (layerscan used to score at native resolution and upsample only
  images below ``LPIPS_MIN_SIDE``; 256 px is above AlexNet's and VGG's minimum, so images no
  longer need that.)
* Video frames: every frame, at native resolution (no resize), scaled ``/255*2-1``, one frame pair
  per call, then the mean over frames. vLLM-Omni feeds float frames straight from the pipeline;
  layerscan has the uint8 frames it saved, so the two can differ by that rounding (at most half a
  grey level per pixel). Frames whose shorter side is below ``LPIPS_MIN_SIDE`` (tiny test models;
  vLLM-Omni would crash on them) are upsampled bilinearly first: the only place that rule remains.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from layerscan.clock import CLOCK, SCORE
from layerscan.errors import UserError
from layerscan.lpips_weights import LpipsWeightsMissing, build_lpips, check_lpips_weights, check_net

if TYPE_CHECKING:
    import torch

__all__ = [
    "LPIPS_IMAGE_SIZE",
    "LPIPS_MIN_SIDE",
    "LPIPS_PROTOCOL",
    "METRICS",
    "PSNR_IDENTICAL_DB",
    "MetricInfo",
    "MetricSummary",
    "Scorer",
    "check_accuracy_prompts",
    "checker_fingerprint",
    "lpips_image_input",
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

LPIPS_IMAGE_SIZE = (256, 256)
"""(height, width) every image is resized to before LPIPS, as vLLM-Omni's ``Resize((256, 256))``."""

LPIPS_PROTOCOL = "vllm-omni/v1: images PIL-bilinear 256x256, frames native; [-1,1]; lpips v0.1"
"""Names the way LPIPS values are computed here; part of what identifies comparable scores.

LPIPS values from before this protocol (native resolution, upsampling only below 32 px) are not
comparable with these, so anything that caches scores should include this string in its key.
"""

LPIPS_MIN_SIDE = 32
"""Smallest video-frame side fed to the LPIPS backbone; smaller frame pairs are upsampled first.

Measured with lpips 0.1.4: AlexNet's pooling stack fails below 31 px, VGG16's below 16 px. 32 px
works for both, so smaller frames (e.g. from tiny test models) are scaled up bilinearly with the
same factor for frame and reference, keeping the aspect ratio, until their shorter side is 32 px.
Images never need it: they are always resized to ``LPIPS_IMAGE_SIZE``.
"""

_SSIM_DEFAULT_WIN = 7
_PSNR_DATA_RANGE = 255.0


@dataclass(frozen=True)
class MetricInfo:
    """Static facts about a metric that reports and summaries need.

    ``higher_is_better`` decides what "worst" means; ``low``/``high`` bound the values it can
    take (a threshold outside them is a mistake, and the better end is the best score a prompt
    could still reach); ``unit`` and ``fmt`` are display hints (``format(value, fmt)`` followed
    by ``unit``). ``video_only`` metrics compare frames with each other and have no value for a
    single image, so only ``Scorer.score_video`` computes them.
    """

    name: str
    higher_is_better: bool
    low: float
    high: float
    unit: str = ""
    fmt: str = ".4f"
    video_only: bool = False

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
    # Optional, vLLM-Omni's trajectory-comparison definitions. Pixel vectors are non-negative, so
    # their cosine cannot go below 0; relative L2 is unbounded (infinite on a black reference).
    "cosine": MetricInfo("cosine", higher_is_better=True, low=0.0, high=1.0, fmt=".5f"),
    "mae": MetricInfo("mae", higher_is_better=False, low=0.0, high=255.0, fmt=".3f"),
    "rel_l2": MetricInfo("rel_l2", higher_is_better=False, low=0.0, high=math.inf, fmt=".4f"),
    # Video only: the per-pixel error changes by at most 2 x 255 between two frames.
    "temporal": MetricInfo("temporal", higher_is_better=False, low=0.0, high=510.0, fmt=".3f",
                           video_only=True),
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


def worst_value(metric: str, values: Sequence[float]) -> float:
    """The worst of ``values`` for ``metric``: the lowest where higher is better, else the highest."""
    return min(values) if METRICS[metric].higher_is_better else max(values)


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
        worst[name] = worst_value(name, values)
    return MetricSummary(per_prompt=[dict(s) for s in per_prompt], mean=mean, worst=worst)


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
        check_net(lpips_net)
        try:
            check_lpips_weights(lpips_net)
        except LpipsWeightsMissing:
            if not allow_missing_lpips:
                raise
            names.remove("lpips")
            if not names:
                raise
    return names


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


def _check_videos(video: np.ndarray, reference: np.ndarray, need_pairs: bool) -> None:
    """Both TxHxWx3 uint8 of one shape; at least one frame, two when a metric compares frames.

    vLLM-Omni scores the first ``min(len(a), len(b))`` frames of videos of different lengths;
    layerscan generates candidate and baseline with the same settings, so a mismatch is a bug
    upstream of scoring and is reported instead of being truncated away.
    """
    for label, arr in (("video", video), ("reference", reference)):
        if not isinstance(arr, np.ndarray):
            raise ValueError(f"{label} must be a numpy array, got {type(arr).__name__}")
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"{label} must be TxHxWx3, got shape {arr.shape}")
        if arr.dtype != np.uint8:
            raise ValueError(f"{label} must be uint8 (0..255), got dtype {arr.dtype}")
    if video.shape != reference.shape:
        raise ValueError(
            f"video shape {video.shape} differs from reference shape {reference.shape}; "
            "videos must be generated with the baseline's frame count and resolution"
        )
    frames = video.shape[0]
    if frames == 0:
        raise ValueError("got a video of 0 frames")
    if need_pairs and frames < 2:
        raise ValueError(f"got a video of {frames} frame; metric 'temporal' compares "
                         "consecutive frames and needs at least 2")


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
    """skimage SSIM over RGB (channel_axis=-1, data_range=255), window shrunk for tiny images.

    skimage scores the channels one after another and averages them; here the three run on
    threads (its filters release the GIL), the same number bit for bit: on the H100 host of
    benchmarks/RESULTS.md scoring went from 0.62 s to 0.24 s per 1024x1024 output, on two idle
    cores here from 0.47 s to 0.25 s.
    """
    from skimage.metrics import structural_similarity

    win = _ssim_win_size(image.shape[0], image.shape[1])

    def channel(c: int) -> float:
        return structural_similarity(reference[..., c], image[..., c], data_range=_PSNR_DATA_RANGE,
                                     win_size=win)

    channels = list(_channel_pool().map(channel, range(image.shape[-1])))
    return float(np.array(channels, dtype=np.float64).mean())


@functools.cache
def _channel_pool():
    """Three threads for SSIM's channels, made on first use and kept."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(3, thread_name_prefix="layerscan-ssim")


def _cosine(image: np.ndarray, reference: np.ndarray) -> float:
    """Cosine similarity of the flattened float64 0-255 pixel vectors, clamped to [-1, 1].

    vLLM-Omni computes ``F.cosine_similarity`` on the same vectors, which returns 0 when either
    vector is all zero. That is kept for one black picture against a non-black one, but two
    identical pictures (black ones included) score 1 here: identical must never look dissimilar.
    """
    if np.array_equal(image, reference):
        return 1.0
    ref = reference.reshape(-1).astype(np.float64)
    img = image.reshape(-1).astype(np.float64)
    norms = float(np.linalg.norm(ref)) * float(np.linalg.norm(img))
    if norms == 0.0:
        return 0.0
    return float(np.clip(np.dot(ref, img) / norms, -1.0, 1.0))


def _mae(image: np.ndarray, reference: np.ndarray) -> float:
    """Mean absolute difference in grey levels (0-255); exact integer sum, then one division."""
    diff = np.abs(reference.astype(np.int16) - image.astype(np.int16))
    return int(diff.sum(dtype=np.int64)) / diff.size


def _rel_l2(image: np.ndarray, reference: np.ndarray) -> float:
    """``||reference - image||_2 / ||reference||_2`` on float64 0-255 values, as vLLM-Omni defines
    it: 0 when both are all black (identical), ``inf`` when only the reference is."""
    diff_l2 = float(np.linalg.norm((reference.astype(np.float64) - image).reshape(-1)))
    ref_l2 = float(np.linalg.norm(reference.reshape(-1).astype(np.float64)))
    if ref_l2 == 0.0:
        return 0.0 if diff_l2 == 0.0 else math.inf
    return diff_l2 / ref_l2


def _temporal(video: np.ndarray, reference: np.ndarray) -> float:
    """Flicker relative to the baseline: mean over consecutive frame pairs and pixels of
    ``|(f[t+1] - f[t]) - (g[t+1] - g[t])|`` in grey levels (f the candidate, g the baseline).

    Written per pixel, that is ``|e[t+1] - e[t]|`` with ``e = f - g`` the error of frame t: how
    much FP8's error changes from one frame to the next. An error that stays put (a constant
    colour shift, a consistently softer texture) scores 0 however large it is -- the per-frame
    metrics already count it -- while an error that comes and goes, i.e. flicker or jitter the
    BF16 video did not have, scores in proportion to its size. Motion the two videos share
    cancels out. It is deliberately absolute, in grey levels like ``mae``, not relative to the
    baseline's own frame-to-frame change: that change is zero on still shots, where a ratio is
    undefined, and a ratio would forgive the same flicker more in busy scenes than in calm ones,
    where it is more visible.
    """
    error_prev = video[0].astype(np.int16) - reference[0].astype(np.int16)
    per_pair: list[float] = []
    for t in range(1, video.shape[0]):
        error = video[t].astype(np.int16) - reference[t].astype(np.int16)
        change = np.abs(error - error_prev)  # |e| <= 255, so |change| <= 510 fits int16
        per_pair.append(int(change.sum(dtype=np.int64)) / change.size)
        error_prev = error
    return math.fsum(per_pair) / len(per_pair)


_PIXEL_METRICS = {"ssim": _ssim, "psnr": _psnr, "cosine": _cosine, "mae": _mae,
                  "rel_l2": _rel_l2}
"""Metrics computed from one image (or frame) pair alone, the same way for images and frames."""


def lpips_image_input(image: np.ndarray) -> torch.Tensor:
    """An HxWx3 uint8 image as vLLM-Omni hands it to LPIPS: 1x3x256x256 float32 in [-1, 1].

    Step for step what ``transforms.Compose([Resize((256, 256)), ToTensor(), Normalize(0.5,
    0.5)])`` does to a PIL RGB image (as read in torchvision 0.29: the resize is skipped when
    the image already has that size, where PIL would return an identical copy anyway), written
    out so the protocol is visible here and checked against torchvision by the tests. The
    resize happens on uint8 pixels, as in PIL, before any conversion to float; torchvision's
    operation order (``/255``, ``-0.5``, ``/0.5``) is kept, though for the 256 uint8 levels it
    gives the same float32 values as ``x/127.5 - 1``.
    """
    import torch
    from PIL import Image

    height, width = LPIPS_IMAGE_SIZE
    picture = Image.fromarray(np.ascontiguousarray(image))  # HxWx3 uint8 -> mode "RGB"
    if picture.size != (width, height):
        picture = picture.resize((width, height), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.array(picture, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    tensor = pixels.to(torch.float32).div(255)
    return tensor.sub(0.5).div(0.5).unsqueeze(0)


def _lpips_frame_input(frame: np.ndarray) -> torch.Tensor:
    """An HxWx3 uint8 video frame as vLLM-Omni scales frames: ``[0, 1] * 2 - 1`` at native size."""
    import torch

    pixels = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).unsqueeze(0)
    return pixels.float().div(255) * 2 - 1


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
    """Scores images (``score_pair``/``score``) or videos (``score_video``/``score_videos``)
    against references with a fixed set of metrics.

    LPIPS is built eagerly in ``__init__`` so a missing or broken backbone checkpoint fails
    before any (expensive) generation, never later in a search. LPIPS follows vLLM-Omni (see the
    module docstring): images are resized to ``LPIPS_IMAGE_SIZE``, video frames are scored at
    native size (upsampled only below ``LPIPS_MIN_SIDE``); all other metrics always see the
    original pixels. Video-only metrics (``temporal``) may be among ``metrics``; scoring an image
    pair with them is an error.

    ``video``: what ``score_output`` scores, so that callers holding one generated output (an
    image or a clip) never decide by its shape which it is; a session sets it from the pipeline.
    """

    def __init__(
        self,
        metrics: Sequence[str] = ("lpips", "ssim", "psnr"),
        lpips_net: str = "alex",
        device: str = "cpu",
        video: bool = False,
    ) -> None:
        if isinstance(metrics, str):
            metrics = metrics.split(",")
        self.metrics: tuple[str, ...] = tuple(_metric_names(metrics))
        self.lpips_net = lpips_net
        self.device = device
        self.video = video
        self._lpips: torch.nn.Module | None = None
        if "lpips" in self.metrics:
            check_net(lpips_net)
            self._lpips = build_lpips(lpips_net, device)

    @property
    def lpips_model(self) -> torch.nn.Module | None:
        """The loaded LPIPS module (``None`` when LPIPS is not among the metrics)."""
        return self._lpips

    def _lpips_call(self, reference: torch.Tensor, image: torch.Tensor) -> float:
        """One ``loss_fn(baseline, candidate)`` call, batch 1, as vLLM-Omni makes it."""
        import torch

        assert self._lpips is not None
        with torch.inference_mode():
            distance = self._lpips(reference.to(self.device), image.to(self.device))
        return float(distance.reshape(-1)[0].item())

    def _lpips_distance(self, image: np.ndarray, reference: np.ndarray) -> float:
        """Image LPIPS: both pictures resized to 256x256 the way vLLM-Omni's benchmark does."""
        return self._lpips_call(lpips_image_input(reference), lpips_image_input(image))

    def _lpips_frame_distance(self, frame: np.ndarray, reference: np.ndarray) -> float:
        """Video-frame LPIPS at native size; frames below ``LPIPS_MIN_SIDE`` are upsampled."""
        import torch.nn.functional as F

        ref, img = _lpips_frame_input(reference), _lpips_frame_input(frame)
        h, w = ref.shape[-2:]
        if min(h, w) < LPIPS_MIN_SIDE:
            scale = LPIPS_MIN_SIDE / min(h, w)
            size = (max(LPIPS_MIN_SIDE, round(h * scale)), max(LPIPS_MIN_SIDE, round(w * scale)))
            ref, img = (F.interpolate(x, size=size, mode="bilinear", align_corners=False)
                        for x in (ref, img))
        return self._lpips_call(ref, img)

    def _frame_metric(self, name: str, image: np.ndarray, reference: np.ndarray,
                      prompt: str | None, *, frame: bool) -> float:
        """One per-image metric of one image or video-frame pair."""
        if name == "lpips":
            return (self._lpips_frame_distance(image, reference) if frame
                    else self._lpips_distance(image, reference))
        if name == "accuracy":
            return _prompt_accuracy(image, prompt)
        return _PIXEL_METRICS[name](image, reference)

    def score_pair(self, image: np.ndarray, reference: np.ndarray,
                   prompt: str | None = None) -> dict[str, float]:
        """Score one generated image against its baseline (and, for ``accuracy``, its prompt);
        keys in the order of ``metrics``."""
        _check_pair(image, reference)
        video_only = [name for name in self.metrics if METRICS[name].video_only]
        if video_only:
            raise ValueError(f"metric(s) {video_only} compare video frames; an image has none: "
                             "score videos with score_video, or drop them for images")
        return {name: self._frame_metric(name, image, reference, prompt, frame=False)
                for name in self.metrics}

    def score_output(self, output: np.ndarray, reference: np.ndarray,
                     prompt: str | None = None) -> dict[str, float]:
        """Score one generated output against its baseline: a video (``score_video``) when this
        scorer scores videos, else an image (``score_pair``)."""
        with CLOCK.phase(SCORE):
            if self.video:
                return self.score_video(output, reference, prompt)
            return self.score_pair(output, reference, prompt)

    def score_video(self, video: np.ndarray, reference: np.ndarray,
                    prompt: str | None = None) -> dict[str, float]:
        """Score a TxHxWx3 uint8 video against its baseline video; keys in the order of ``metrics``.

        Every per-image metric is computed on each frame pair and averaged over all frames, as
        vLLM-Omni does for LPIPS (LPIPS on frames uses the frame protocol: native size, see
        the module docstring; ``accuracy`` is then the fraction of frames that show the prompt).
        ``temporal`` compares consecutive frames and needs at least two.
        """
        _check_videos(video, reference, need_pairs="temporal" in self.metrics)
        scores: dict[str, float] = {}
        for name in self.metrics:
            if name == "temporal":
                scores[name] = _temporal(video, reference)
                continue
            per_frame = [self._frame_metric(name, frame, ref, prompt, frame=True)
                         for frame, ref in zip(video, reference)]
            scores[name] = math.fsum(per_frame) / len(per_frame)
        return scores

    @staticmethod
    def _check_counts(n_items: int, n_refs: int, prompts: Sequence[str] | None,
                      kind: str) -> list[str | None]:
        if n_items != n_refs or (prompts is not None and len(prompts) != n_items):
            raise ValueError(
                f"got {n_items} {kind} but {n_refs} references"
                f"{'' if prompts is None else f' and {len(prompts)} prompts'}; "
                f"need one baseline (and prompt) per generated {kind.rstrip('s')}"
            )
        return list(prompts) if prompts is not None else [None] * n_items

    def score(
        self, images: Sequence[np.ndarray], references: Sequence[np.ndarray],
        prompts: Sequence[str] | None = None,
    ) -> MetricSummary:
        """Score prompt i's image against reference i for every i, then summarize."""
        prompt_list = self._check_counts(len(images), len(references), prompts, "images")
        return summarize([self.score_pair(img, ref, prompt)
                          for img, ref, prompt in zip(images, references, prompt_list)])

    def score_videos(
        self, videos: Sequence[np.ndarray], references: Sequence[np.ndarray],
        prompts: Sequence[str] | None = None,
    ) -> MetricSummary:
        """Score prompt i's video against reference video i for every i, then summarize."""
        prompt_list = self._check_counts(len(videos), len(references), prompts, "videos")
        return summarize([self.score_video(vid, ref, prompt)
                          for vid, ref, prompt in zip(videos, references, prompt_list)])
