"""Tests for layerscan.metrics.

No LPIPS ImageNet weights exist offline, so the LPIPS tests write a *randomly initialised*
torchvision AlexNet checkpoint into a temporary TORCH_HOME. That exercises the real loading path
(file on disk -> torch.load -> LPIPS backbone); the backbone-equality test proves the file, not
a fresh random init, ended up in the model. Every test sets TORCH_HOME so a user's real cache
never leaks in. The same file also serves the vLLM-Omni parity tests: a plain
``lpips.LPIPS(net="alex")`` (what vLLM-Omni builds) finds it in torchvision's cache and loads it
instead of downloading, so both sides run with identical weights.
"""

from __future__ import annotations

import inspect
import math
import warnings
from pathlib import Path

import lpips
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw
from torchvision import transforms

from layerscan.errors import UserError
from layerscan.lpips_weights import LpipsWeightsMissing, check_lpips_weights, lpips_weights_path
from layerscan.metrics import (
    LPIPS_MIN_SIDE,
    METRICS,
    PSNR_IDENTICAL_DB,
    MetricSummary,
    Scorer,
    lpips_image_input,
    resolve_metrics,
    summarize,
)
from layerscan.study import Study

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
    """Images below AlexNet's 31 px minimum still get an LPIPS (every image is resized to
    256x256 first, as vLLM-Omni does); SSIM shrinks its window."""
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
    assert "--metrics ssim,psnr --criterion-metric psnr" in message
    assert "\n" not in message
    assert isinstance(info.value, UserError)

    with pytest.raises(LpipsWeightsMissing, match=VGG_FILE):
        check_lpips_weights("vgg")


@pytest.fixture()
def weights_server(alex_home: Path, tmp_path: Path):
    """A local HTTP server with the AlexNet checkpoint under two names: one with its true
    SHA-256 prefix, as torchvision names its files, and one with a wrong prefix."""
    import hashlib
    import http.server
    import shutil
    import threading
    from functools import partial

    source = alex_home / "hub" / "checkpoints" / ALEX_FILE
    prefix = hashlib.sha256(source.read_bytes()).hexdigest()[:8]
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(source, served / f"alexnet-owt-{prefix}.pth")
    shutil.copy(source, served / "alexnet-owt-00000000.pth")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", prefix
    server.shutdown()


def test_lpips_weights_are_fetched_on_first_use(weights_server, empty_home, monkeypatch) -> None:
    import layerscan.lpips_weights as weights

    base, prefix = weights_server
    monkeypatch.delenv(weights.OFFLINE_ENV)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(weights, "lpips_weights_url", lambda net: f"{base}/alexnet-owt-{prefix}.pth")
    path = lpips_weights_path("alex")
    assert path == empty_home / "hub" / "checkpoints" / f"alexnet-owt-{prefix}.pth"
    assert not path.exists()
    check_lpips_weights()
    assert path.is_file()
    scorer = Scorer(("lpips",))  # the real loading path, from the downloaded file
    image = np.full((32, 32, 3), 128, np.uint8)
    assert scorer.score_pair(image, image)["lpips"] == pytest.approx(0.0, abs=1e-6)


def test_a_download_that_fails_or_mismatches_its_hash_leaves_nothing(
        weights_server, empty_home, monkeypatch) -> None:
    import socket

    import layerscan.lpips_weights as weights

    base, _ = weights_server
    monkeypatch.delenv(weights.OFFLINE_ENV)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(weights, "lpips_weights_url", lambda net: f"{base}/alexnet-owt-00000000.pth")
    with pytest.raises(LpipsWeightsMissing, match="does not start with 00000000"):
        check_lpips_weights()
    checkpoints = empty_home / "hub" / "checkpoints"
    assert list(checkpoints.iterdir()) == []  # no partial file, no temporary file
    with socket.socket() as closed:  # a port nobody listens on: the connection is refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setattr(weights, "lpips_weights_url", lambda net: f"http://127.0.0.1:{port}/alexnet-owt-7be5be79.pth")
    with pytest.raises(LpipsWeightsMissing, match="downloading it failed") as info:
        check_lpips_weights()
    assert "--metrics ssim,psnr --criterion-metric psnr" in str(info.value)
    assert list(checkpoints.iterdir()) == []


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


# ----------------------------------------------------------------------------- vLLM-Omni parity


def _no_download(*args: object, **kwargs: object) -> None:
    raise AssertionError("a test tried to download weights")


@pytest.fixture(scope="module")
def upstream_lpips(alex_home: Path) -> torch.nn.Module:
    """``lpips.LPIPS(net="alex")`` built the way vLLM-Omni's benchmark builds it (library defaults:
    ImageNet trunk via torchvision, v0.1 linear layers), its trunk read from ``alex_home``."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCH_HOME", str(alex_home))
    mp.setattr(torch.hub, "download_url_to_file", _no_download)
    try:
        with warnings.catch_warnings():  # torchvision deprecates lpips's pretrained=True
            warnings.simplefilter("ignore", UserWarning)
            return lpips.LPIPS(net="alex", verbose=False).eval()
    finally:
        mp.undo()


def _upstream_image_lpips(model: torch.nn.Module, baseline: Image.Image,
                          candidate: Image.Image) -> float:
    """The image LPIPS protocol of vLLM-Omni's quantization_quality benchmark, on PIL images:
    torchvision Resize((256, 256)) + ToTensor + Normalize(0.5, 0.5), then
    model(baseline, candidate)."""
    to_input = transforms.Compose([
        transforms.Resize((256, 256)),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
    ])
    with torch.no_grad():
        return model(to_input(baseline.convert("RGB")).unsqueeze(0),
                     to_input(candidate.convert("RGB")).unsqueeze(0)).item()


def _upstream_frame_lpips(model: torch.nn.Module, baseline: np.ndarray,
                          candidate: np.ndarray) -> list[float]:
    """vLLM-Omni's video LPIPS per frame: float [0, 1] HxWx3 frames -> [-1, 1], native size."""
    scores = []
    for bl, qt in zip(baseline, candidate):
        as_input = [torch.from_numpy(f).permute(2, 0, 1).unsqueeze(0).float() * 2 - 1
                    for f in (bl, qt)]
        with torch.no_grad():
            scores.append(model(*as_input).item())
    return scores


def _scene(width: int, height: int, jitter: int = 0, tint: int = 0, noise: float = 0.0,
           seed: int = 0) -> Image.Image:
    """A drawn picture (gradient sky, sun, house, tree, fence); ``jitter``/``tint``/``noise``
    make the small shifts, colour changes and grain that FP8 introduces."""
    yy, xx = np.mgrid[0:height, 0:width]
    sky = np.stack([90 + 100 * yy / height, 140 + 60 * xx / width, 230 - 80 * yy / height], -1)
    picture = Image.fromarray(np.clip(sky, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    w, h, j = width, height, jitter

    def box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
        return [x0 * w + j, y0 * h + j, x1 * w + j, y1 * h + j]

    draw.ellipse(box(0.70, 0.08, 0.88, 0.08 + 0.18 * w / h), fill=(250, 210 + tint, 60))
    draw.rectangle(box(0.15, 0.45, 0.55, 0.85), fill=(180 + tint, 70, 50), outline=(40, 20, 10))
    draw.polygon([(0.10 * w + j, 0.45 * h), (0.35 * w, 0.20 * h + j), (0.60 * w, 0.45 * h)],
                 fill=(110, 40 + tint, 30))
    draw.rectangle(box(0.30, 0.62, 0.40, 0.85), fill=(60, 40, 20 + tint))
    draw.ellipse(box(0.65, 0.40, 0.90, 0.70), fill=(30, 120 + tint, 40))
    draw.rectangle([0, int(0.85 * h), w, h], fill=(70 + tint, 150, 60))
    for x in range(0, w, max(2, w // 12)):
        draw.line([(x + j, 0.78 * h), (x + j, 0.92 * h)], fill=(230, 230, 230),
                  width=max(1, w // 100))
    pixels = np.asarray(picture).astype(np.float64)
    if noise:
        pixels += np.random.default_rng(seed).normal(0, noise, pixels.shape)
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))


# (width, height): square, wide, the 256x256 size (no resize), odd and tall, a
# large 16:9 picture, and one below AlexNet's minimum (the resize to 256 makes it scorable).
PARITY_SIZES = [(64, 64), (300, 200), (256, 256), (97, 513), (1024, 576), (20, 12)]


@pytest.mark.parametrize("size", PARITY_SIZES, ids=[f"{w}x{h}" for w, h in PARITY_SIZES])
def test_image_lpips_equals_vllm_omni(scorer: Scorer, upstream_lpips: torch.nn.Module,
                                      size: tuple[int, int]) -> None:
    """Same picture pair -> the same LPIPS as vLLM-Omni's benchmark prints (bit-identical on
    CPU; asserted to 1e-6 relative, a float32 ulp or so)."""
    width, height = size
    baseline = _scene(width, height)
    candidates = [_scene(width, height, jitter=1, tint=6, noise=3.0, seed=1),
                  _scene(width, height, jitter=3, tint=-15, noise=8.0, seed=2)]
    ref = np.asarray(baseline)
    to_input = transforms.Compose([transforms.Resize((256, 256)), transforms.ToTensor(),
                                   transforms.Normalize([0.5] * 3, [0.5] * 3)])
    assert torch.equal(lpips_image_input(ref), to_input(baseline).unsqueeze(0))

    ours = [scorer.score_pair(np.asarray(c), ref)["lpips"] for c in candidates]
    theirs = [_upstream_image_lpips(upstream_lpips, baseline, c) for c in candidates]
    assert ours == pytest.approx(theirs, rel=1e-6, abs=0)
    assert 0 < ours[0] < ours[1]  # the larger perturbation is the larger distance


def test_square_resize_squashes_aspect_ratio() -> None:
    """Non-square pictures are squashed to 256x256, not cropped or padded (as upstream)."""
    wide = np.asarray(_scene(300, 100))
    tensor = lpips_image_input(wide)
    assert tensor.shape == (1, 3, 256, 256) and tensor.dtype == torch.float32
    expected = np.asarray(Image.fromarray(wide).resize((256, 256), Image.Resampling.BILINEAR))
    back = torch.round((tensor[0].permute(1, 2, 0) * 0.5 + 0.5) * 255).to(torch.uint8).numpy()
    assert np.array_equal(back, expected)
    assert -1.0 <= float(tensor.min()) and float(tensor.max()) <= 1.0


# ----------------------------------------------------------------------------- videos


def _video(frames: int, height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """A scene panning right one pixel per frame, values kept within 40..215 so that offsets
    of a few grey levels never clip."""
    wide = np.asarray(_scene(width + frames, height, noise=2.0, seed=seed)).astype(np.int16)
    clip = np.stack([wide[:, t:t + width] for t in range(frames)])
    return (40 + clip * 175 // 255).astype(np.uint8)


def test_video_lpips_equals_vllm_omni(scorer: Scorer, upstream_lpips: torch.nn.Module) -> None:
    """Per-frame LPIPS at native size, [-1, 1], mean over frames: vLLM-Omni's compute_lpips_video.

    vLLM-Omni gets float [0, 1] frames from the pipeline; given the uint8 frames layerscan saves,
    their float version is ``u8 / 255`` in float32, which both sides then see identically."""
    reference = _video(4)
    noise = np.random.default_rng(3).integers(-6, 7, reference.shape)
    video = np.clip(reference.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    as_float = [v.astype(np.float32) / np.float32(255) for v in (reference, video)]
    theirs = _upstream_frame_lpips(upstream_lpips, *as_float)
    per_frame = [scorer.score_video(video[t:t + 1], reference[t:t + 1])["lpips"] for t in range(4)]
    assert per_frame == pytest.approx(theirs, rel=1e-6, abs=0)
    scores = scorer.score_video(video, reference)
    assert scores["lpips"] == pytest.approx(float(np.mean(theirs)), rel=1e-12)
    # Frames are not resized: the same frame scored as an image (resized to 256) differs.
    as_image = scorer.score_pair(video[0], reference[0])["lpips"]
    assert as_image != pytest.approx(per_frame[0], rel=1e-3)


def test_video_metrics_are_per_frame_means(scorer: Scorer) -> None:
    reference = _video(5)
    rng = np.random.default_rng(4)
    video = np.clip(reference.astype(np.int16) + rng.integers(-10, 11, reference.shape),
                    0, 255).astype(np.uint8)
    full = Scorer(("ssim", "psnr", "cosine", "mae", "rel_l2", "temporal"))
    scores = full.score_video(video, reference)
    assert list(scores) == ["ssim", "psnr", "cosine", "mae", "rel_l2", "temporal"]
    for name in ("ssim", "psnr", "cosine", "mae", "rel_l2"):
        frames = [Scorer((name,)).score_pair(f, r)[name] for f, r in zip(video, reference)]
        assert scores[name] == pytest.approx(np.mean(frames), rel=1e-12), name
    assert scores["temporal"] > 0


def test_identical_videos_score_perfectly(scorer: Scorer) -> None:
    reference = _video(3)
    everything = Scorer([name for name in METRICS if name != "accuracy"])  # lpips via alex_home
    scores = everything.score_video(reference.copy(), reference)
    for name, value in scores.items():
        assert value == pytest.approx(METRICS[name].best, abs=1e-6), name


def test_temporal_punishes_flicker_not_a_constant_offset() -> None:
    """Same per-frame error size (MAE 10) either way; only flicker changes from frame to frame."""
    reference = _video(6)
    offset = reference + np.uint8(10)
    signs = np.array([1 if t % 2 == 0 else -1 for t in range(6)], np.int16)[:, None, None, None]
    flicker = (reference.astype(np.int16) + 10 * signs).astype(np.uint8)
    scorer = Scorer(("mae", "temporal"))
    s_offset = scorer.score_video(offset, reference)
    s_flicker = scorer.score_video(flicker, reference)
    assert s_offset["mae"] == s_flicker["mae"] == 10.0
    assert s_offset["temporal"] == 0.0
    assert s_flicker["temporal"] == 20.0  # the error jumps from +10 to -10 and back
    assert METRICS["temporal"].higher_is_better is False  # so the flicker scores worse

    # Flicker on a single frame pair: e[3] - e[2] = 4 on a quarter of the pixels, and back.
    blip = reference.copy()
    blip[3, :24, :32] += 4
    assert scorer.score_video(blip, reference)["temporal"] == pytest.approx(4 * 0.25 * 2 / 5)


def test_tiny_video_frames_are_upsampled(scorer: Scorer) -> None:
    """Frames below LPIPS_MIN_SIDE are scaled up (vLLM-Omni would fail on them); larger ones not."""
    reference = _video(2, height=12, width=20)
    assert min(reference.shape[1:3]) < LPIPS_MIN_SIDE
    assert scorer.score_video(reference.copy(), reference)["lpips"] == pytest.approx(0, abs=1e-6)
    different = scorer.score_video(255 - reference, reference)
    assert different["lpips"] > 0 and all(math.isfinite(v) for v in different.values())


def test_video_input_errors() -> None:
    scorer = Scorer(("psnr", "temporal"))
    one_frame = _video(1)
    with pytest.raises(ValueError, match="at least 2"):
        scorer.score_video(one_frame, one_frame)
    assert Scorer(("psnr",)).score_video(one_frame, one_frame)["psnr"] == PSNR_IDENTICAL_DB
    with pytest.raises(ValueError, match="frame count and resolution"):
        scorer.score_video(_video(3), _video(4))
    with pytest.raises(ValueError, match="TxHxWx3"):
        scorer.score_video(one_frame[0], one_frame[0])
    with pytest.raises(ValueError, match="score_video"):
        scorer.score_pair(one_frame[0], one_frame[0])


def test_score_videos_summarizes() -> None:
    scorer = Scorer(("mae", "temporal"))
    refs = [_video(3, seed=1), _video(3, seed=2)]
    vids = [refs[0] + np.uint8(2), refs[1].copy()]
    summary = scorer.score_videos(vids, refs)
    assert summary.per_prompt == [{"mae": 2.0, "temporal": 0.0}, {"mae": 0.0, "temporal": 0.0}]
    assert summary.mean["mae"] == 1.0 and summary.worst["mae"] == 2.0
    with pytest.raises(ValueError, match="2 videos but 1 references"):
        scorer.score_videos(vids, refs[:1])


# ----------------------------------------------------------------------------- optional metrics


def _pixel(*rgb: int) -> np.ndarray:
    return np.array([[rgb]], np.uint8)  # a 1x1 RGB image


def test_optional_metrics_known_values() -> None:
    scorer = Scorer(("cosine", "mae", "rel_l2"))
    # ref (3, 0, 0), image (3, 4, 0): cos = 9 / (3 * 5), |diff| = 4 on one of 3 values.
    scores = scorer.score_pair(_pixel(3, 4, 0), _pixel(3, 0, 0))
    assert scores == pytest.approx({"cosine": 0.6, "mae": 4 / 3, "rel_l2": 4 / 3}, rel=1e-12)
    # Orthogonal colours; the relative L2 is sqrt(2) when both have the same norm.
    scores = scorer.score_pair(_pixel(0, 200, 0), _pixel(200, 0, 0))
    expected = {"cosine": 0.0, "mae": 400 / 3, "rel_l2": math.sqrt(2)}
    assert scores == pytest.approx(expected, abs=1e-12)
    # A brighter copy (x2) points the same way: cosine 1, but relative L2 1 and MAE 100/3.
    scores = scorer.score_pair(_pixel(100, 60, 40), _pixel(50, 30, 20))
    assert scores == pytest.approx({"cosine": 1.0, "mae": 100 / 3, "rel_l2": 1.0}, rel=1e-12)
    # Uniform offset of 3 grey levels on a bigger image: MAE exactly 3.
    ref = np.full((16, 16, 3), 100, np.uint8)
    assert scorer.score_pair(ref + np.uint8(3), ref)["mae"] == 3.0


def test_optional_metrics_edge_cases() -> None:
    scorer = Scorer(("cosine", "mae", "rel_l2"))
    black = np.zeros((4, 4, 3), np.uint8)
    assert scorer.score_pair(black, black.copy()) == {"cosine": 1.0, "mae": 0.0, "rel_l2": 0.0}
    grey = np.full((4, 4, 3), 10, np.uint8)
    # A black reference has no norm: relative L2 is infinite, cosine 0 (as F.cosine_similarity).
    assert scorer.score_pair(grey, black) == {"cosine": 0.0, "mae": 10.0, "rel_l2": math.inf}
    assert scorer.score_pair(black, grey) == {"cosine": 0.0, "mae": 10.0, "rel_l2": 1.0}


def test_optional_metrics_match_vllm_omni_definitions() -> None:
    """The trajectory-comparison tool's formulas (float64 torch, reference first), on drawn
    pictures."""
    ref = np.asarray(_scene(120, 80))
    img = np.asarray(_scene(120, 80, jitter=2, tint=9, noise=5.0, seed=5))
    lhs, rhs = torch.tensor(ref).double(), torch.tensor(img).double()
    diff = lhs - rhs
    expected = {
        "cosine": float(F.cosine_similarity(lhs.reshape(-1), rhs.reshape(-1), dim=0).clamp(-1, 1)),
        "mae": float(diff.abs().mean()),
        "rel_l2": float(torch.linalg.vector_norm(diff) / torch.linalg.vector_norm(lhs)),
    }
    scores = Scorer(("cosine", "mae", "rel_l2")).score_pair(img, ref)
    assert scores == pytest.approx(expected, rel=1e-12)


def test_optional_metric_info() -> None:
    cosine, mae, rel_l2, temporal = (METRICS[m] for m in ("cosine", "mae", "rel_l2", "temporal"))
    assert cosine.higher_is_better and (cosine.low, cosine.high) == (0, 1)
    assert not mae.higher_is_better and (mae.low, mae.high) == (0, 255)
    assert not rel_l2.higher_is_better and (rel_l2.low, rel_l2.high) == (0, math.inf)
    assert not temporal.higher_is_better and (temporal.low, temporal.high) == (0, 510)
    assert [m for m, info in METRICS.items() if info.video_only] == ["temporal"]
    scorer_default = inspect.signature(Scorer).parameters["metrics"].default
    for name in ("cosine", "mae", "rel_l2", "temporal"):
        assert METRICS[name].best == (METRICS[name].high if METRICS[name].higher_is_better else 0.0)
        assert name not in scorer_default and name not in Study().metrics  # opt-in only
    assert METRICS["mae"].format(3.14159) == "3.142"
    optional = ["cosine", "mae", "rel_l2", "temporal"]
    assert resolve_metrics(",".join(optional), "alex", allow_missing_lpips=False) == optional


@pytest.mark.parametrize("size", [(5, 9), (64, 48), (256, 256)])
def test_ssim_on_threads_is_skimages_number_bit_for_bit(size) -> None:
    from skimage.metrics import structural_similarity

    from layerscan.metrics import _ssim, _ssim_win_size

    rng = np.random.default_rng(sum(size))
    reference = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    image = np.clip(reference.astype(int) + rng.integers(-20, 21, reference.shape), 0, 255).astype(np.uint8)
    expected = structural_similarity(reference, image, channel_axis=-1, data_range=255,
                                     win_size=_ssim_win_size(*size))
    assert _ssim(image, reference) == float(expected)
