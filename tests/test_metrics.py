"""Tests for layerscan.metrics.

No LPIPS ImageNet weights exist offline, so the LPIPS tests write a *randomly initialised*
torchvision AlexNet checkpoint into a temporary TORCH_HOME. That exercises the real loading path
(file on disk -> torch.load -> LPIPS backbone); the backbone-equality test proves the file, not
a fresh random init, ended up in the model. Every test sets TORCH_HOME so a user's real cache
never leaks in.
"""

from __future__ import annotations

import math
from pathlib import Path

import lpips
import numpy as np
import pytest
import torch
import torchvision

from layerscan.errors import UserError
from layerscan.metrics import (
    METRICS,
    PSNR_IDENTICAL_DB,
    LpipsWeightsMissing,
    MetricSummary,
    Scorer,
    check_lpips_weights,
    lpips_weights_path,
    resolve_metrics,
    summarize,
)

ALEX_FILE = Path(torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url).name
VGG_FILE = Path(torchvision.models.VGG16_Weights.IMAGENET1K_V1.url).name


class NotATensor:
    """A picklable non-tensor object: torch.load(weights_only=True) must refuse it."""


@pytest.fixture(scope="module")
def alex_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TORCH_HOME holding a (random-weight) AlexNet checkpoint under torchvision's file name."""
    home = tmp_path_factory.mktemp("torch_home")
    ckpt_dir = home / "hub" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    torch.manual_seed(1234)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), ckpt_dir / ALEX_FILE)
    return home


@pytest.fixture()
def empty_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def module_scorer(alex_home: Path) -> Scorer:
    """One LPIPS+SSIM+PSNR scorer shared by the value tests (building it costs about a second)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCH_HOME", str(alex_home))
    # A seed other than the checkpoint's: if loading were skipped, LPIPS's own random init
    # could otherwise reproduce the very tensors saved in the file.
    torch.manual_seed(999)
    try:
        return Scorer(("lpips", "ssim", "psnr"))
    finally:
        mp.undo()


@pytest.fixture()
def scorer(module_scorer: Scorer, alex_home: Path, monkeypatch: pytest.MonkeyPatch) -> Scorer:
    monkeypatch.setenv("TORCH_HOME", str(alex_home))
    return module_scorer


def _image(seed: int, h: int = 64, w: int = 64) -> np.ndarray:
    # Smooth content plus texture, so SSIM/LPIPS behave like on real images, not pure noise.
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 100 * np.sin(xx / 7 + c) * np.cos(yy / 9 - c) for c in range(3)], -1)
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def _noisy(img: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(img.astype(np.float64) + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8)


def _numpy_psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


# ----------------------------------------------------------------------------- values


def test_identical_images(scorer: Scorer) -> None:
    img = _image(0)
    scores = scorer.score_pair(img, img.copy())
    assert list(scores) == ["lpips", "ssim", "psnr"]
    assert scores["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert scores["ssim"] == pytest.approx(1.0, abs=1e-9)
    assert scores["psnr"] == PSNR_IDENTICAL_DB


def test_noise_moves_every_metric_the_right_way(scorer: Scorer) -> None:
    ref = _image(1)
    light, heavy = _noisy(ref, 5, seed=2), _noisy(ref, 40, seed=3)
    s_light, s_heavy = scorer.score_pair(light, ref), scorer.score_pair(heavy, ref)

    assert 0 < s_light["lpips"] < s_heavy["lpips"]
    assert 1 > s_light["ssim"] > s_heavy["ssim"]
    assert PSNR_IDENTICAL_DB > s_light["psnr"] > s_heavy["psnr"]
    assert s_light["psnr"] == pytest.approx(_numpy_psnr(light, ref), rel=1e-12)
    assert s_heavy["psnr"] == pytest.approx(_numpy_psnr(heavy, ref), rel=1e-12)


def test_psnr_never_exceeds_cap() -> None:
    # One grey level off on one pixel of 256x256x3: true PSNR ~101 dB, above the cap.
    ref = np.full((256, 256, 3), 100, np.uint8)
    img = ref.copy()
    img[0, 0, 0] += 1
    assert _numpy_psnr(img, ref) > PSNR_IDENTICAL_DB
    assert Scorer(("psnr",)).score_pair(img, ref)["psnr"] == PSNR_IDENTICAL_DB


@pytest.mark.parametrize("shape", [(8, 8), (4, 5), (3, 40), (31, 200)])
def test_tiny_images_are_scored(scorer: Scorer, shape: tuple[int, int]) -> None:
    """Below AlexNet's 31 px minimum LPIPS upsamples; SSIM shrinks its window."""
    ref = _image(4, *shape)
    same = scorer.score_pair(ref, ref.copy())
    assert same["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert same["ssim"] == pytest.approx(1.0, abs=1e-9)
    diff = scorer.score_pair(255 - ref, ref)
    assert diff["lpips"] > 0
    assert diff["ssim"] < 1
    assert all(math.isfinite(v) for v in diff.values())


def test_too_small_for_ssim() -> None:
    img = np.zeros((2, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="at least 3x3"):
        Scorer(("ssim",)).score_pair(img, img)


def test_shape_mismatch_is_value_error() -> None:
    scorer = Scorer(("ssim", "psnr"))
    with pytest.raises(ValueError, match=r"\(32, 32, 3\).*\(32, 48, 3\)"):
        scorer.score_pair(np.zeros((32, 32, 3), np.uint8), np.zeros((32, 48, 3), np.uint8))
    with pytest.raises(ValueError, match="HxWx3"):
        scorer.score_pair(np.zeros((32, 32), np.uint8), np.zeros((32, 32), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        scorer.score_pair(np.zeros((32, 32, 3), np.float32), np.zeros((32, 32, 3), np.float32))


def test_score_summarizes_pairs() -> None:
    scorer = Scorer(("ssim", "psnr"))
    refs = [_image(5), _image(6)]
    imgs = [_noisy(refs[0], 10, seed=7), refs[1].copy()]
    summary = scorer.score(imgs, refs)
    assert isinstance(summary, MetricSummary)
    assert summary.per_prompt == [scorer.score_pair(i, r) for i, r in zip(imgs, refs)]
    assert summary.per_prompt[1]["psnr"] == PSNR_IDENTICAL_DB
    assert summary.mean["psnr"] == pytest.approx((summary.per_prompt[0]["psnr"] + 100.0) / 2)
    assert summary.worst["psnr"] == summary.per_prompt[0]["psnr"]
    with pytest.raises(ValueError, match="2 images but 1 references"):
        scorer.score(imgs, refs[:1])


# ----------------------------------------------------------------------------- summarize


def test_summarize_mean_and_worst() -> None:
    per_prompt = [
        {"lpips": 0.10, "ssim": 0.90, "psnr": 30.0},
        {"lpips": 0.30, "ssim": 0.70, "psnr": 20.0},
        {"lpips": 0.05, "ssim": 0.95, "psnr": 40.0},
    ]
    s = summarize(per_prompt)
    assert s.per_prompt == per_prompt
    assert s.mean == pytest.approx({"lpips": 0.15, "ssim": 0.85, "psnr": 30.0})
    # lpips: lower is better -> worst is the max; ssim/psnr: higher is better -> the min.
    assert s.worst == {"lpips": 0.30, "ssim": 0.70, "psnr": 20.0}
    assert not METRICS["lpips"].higher_is_better
    assert METRICS["ssim"].higher_is_better and METRICS["psnr"].higher_is_better


def test_summarize_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError, match="same metrics"):
        summarize([{"ssim": 1.0}, {"psnr": 30.0}])
    with pytest.raises(ValueError, match="unknown metric"):
        summarize([{"fid": 1.0}])


# ----------------------------------------------------------------------------- missing weights


def test_check_lpips_weights_missing(empty_home: Path) -> None:
    expected = empty_home / "hub" / "checkpoints" / ALEX_FILE
    assert lpips_weights_path("alex") == expected
    with pytest.raises(LpipsWeightsMissing) as info:
        check_lpips_weights()
    message = str(info.value)
    assert str(expected) in message
    assert f"https://download.pytorch.org/models/{ALEX_FILE}" in message
    assert "--metrics ssim,psnr" in message and "--allow-missing-lpips" in message
    assert "\n" not in message
    assert isinstance(info.value, UserError)

    with pytest.raises(LpipsWeightsMissing, match=VGG_FILE):
        check_lpips_weights("vgg")


def test_scorer_refuses_to_build_without_weights(empty_home: Path) -> None:
    with pytest.raises(LpipsWeightsMissing, match=ALEX_FILE):
        Scorer(("lpips",))
    # Nothing was downloaded as a side effect.
    assert not (empty_home / "hub" / "checkpoints" / ALEX_FILE).exists()
    # Without LPIPS the scorer needs no weights at all.
    assert Scorer(("ssim", "psnr")).lpips_model is None


def test_resolve_metrics(empty_home: Path, alex_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    everything = ["lpips", "ssim", "psnr"]
    assert resolve_metrics(everything, "alex", allow_missing_lpips=True) == ["ssim", "psnr"]
    with pytest.raises(LpipsWeightsMissing):
        resolve_metrics(everything, "alex", allow_missing_lpips=False)
    with pytest.raises(LpipsWeightsMissing):  # nothing would be left to score
        resolve_metrics(["lpips"], "alex", allow_missing_lpips=True)
    assert resolve_metrics("ssim, PSNR,ssim", "alex", allow_missing_lpips=False) == ["ssim", "psnr"]
    with pytest.raises(UserError, match="unknown metric"):
        resolve_metrics(["fid"], "alex", allow_missing_lpips=True)
    with pytest.raises(UserError, match="unknown LPIPS network"):
        resolve_metrics(["lpips"], "squeeze", allow_missing_lpips=True)

    monkeypatch.setenv("TORCH_HOME", str(alex_home))
    assert resolve_metrics(everything, "alex", allow_missing_lpips=False) == everything


def test_corrupt_checkpoint_is_not_replaced_by_random_weights(empty_home: Path) -> None:
    path = empty_home / "hub" / "checkpoints" / ALEX_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(LpipsWeightsMissing, match="corrupt"):
        Scorer(("lpips",))


def test_checkpoint_with_code_objects_is_refused(empty_home: Path) -> None:
    """weights_only=True: a pickle carrying arbitrary objects must not be unpickled."""
    path = empty_home / "hub" / "checkpoints" / ALEX_FILE
    path.parent.mkdir(parents=True)
    torch.save({"features.0.weight": torch.zeros(1), "extra": NotATensor()}, path)
    with pytest.raises(LpipsWeightsMissing, match="corrupt or not a plain tensor"):
        Scorer(("lpips",))


def test_incomplete_or_wrong_checkpoint_is_refused(empty_home: Path, alex_home: Path) -> None:
    path = empty_home / "hub" / "checkpoints" / ALEX_FILE
    path.parent.mkdir(parents=True)
    full = torch.load(alex_home / "hub" / "checkpoints" / ALEX_FILE, weights_only=True, mmap=True)
    features = {k[len("features."):]: v for k, v in full.items() if k.startswith("features.")}
    partial = {f"features.{k}": v for k, v in features.items() if k != "10.bias"}
    torch.save(partial, path)
    with pytest.raises(LpipsWeightsMissing, match="features.10.bias"):
        Scorer(("lpips",))

    wrong = {f"features.{k}": v for k, v in features.items()}
    wrong["features.3.weight"] = torch.zeros(5, 5, 1, 1)
    torch.save(wrong, path)
    with pytest.raises(LpipsWeightsMissing, match="do not fit alexnet"):
        Scorer(("lpips",))


# ----------------------------------------------------------------------------- real loading path


def test_lpips_backbone_comes_from_the_checkpoint_file(scorer: Scorer) -> None:
    saved = torch.load(lpips_weights_path("alex"), map_location="cpu", weights_only=True)
    model = scorer.lpips_model
    assert model is not None

    # LPIPS keeps torchvision's feature indices inside its slices: net.slice2.3.weight is
    # features.3.weight. All 5 AlexNet convs (weight + bias) must equal the file's tensors.
    backbone = dict(model.net.named_parameters())
    assert len(backbone) == 10
    for key, param in backbone.items():
        source = "features." + key.split(".", 1)[1]
        assert torch.equal(param.detach().cpu(), saved[source]), key

    # The linear layers are the ones shipped in the lpips package.
    lin_file = Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"
    lins = torch.load(lin_file, map_location="cpu", weights_only=True)
    for i, lin in enumerate(model.lins):
        assert torch.equal(lin.model[1].weight.detach().cpu(), lins[f"lin{i}.model.1.weight"])


def test_lpips_only_scorer(scorer: Scorer) -> None:
    lpips_only = Scorer(("lpips",))
    img = _image(8)
    noisy = _noisy(img, 20, seed=9)
    scores = lpips_only.score_pair(noisy, img)
    assert list(scores) == ["lpips"]
    assert scores["lpips"] > 0
    # Same checkpoint file -> same model -> same distance as the shared scorer.
    assert scores["lpips"] == pytest.approx(scorer.score_pair(noisy, img)["lpips"], rel=1e-6)
