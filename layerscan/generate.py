"""Image generation over a fixed prompt set and fixed seeds, and the cached BF16 baseline.

The baseline is the reference every configuration is scored against, so it is cached on disk
under a key made of everything that changes its pixels; entries are verified against their
manifest's hashes on every load and rebuilt when anything is off.  Images are PNG, nothing is
pickled.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from layerscan.errors import NonFiniteOutput, UserError
from layerscan.pipeline import LoadedPipeline

BASELINE_FORMAT = 1


@dataclass(frozen=True)
class GenerationSpec:
    """Everything besides the model and the FP8 configuration that decides the pixels."""

    prompts: tuple[str, ...]
    seeds: tuple[int, ...] = (0,)
    steps: int = 4
    height: int = 32
    width: int = 32
    guidance: float = 4.0
    image: str | None = None  # input image for editing pipelines (Qwen-Image-Edit)
    extra: tuple[tuple[str, object], ...] = ()  # further pipeline arguments, e.g. num_frames

    def items(self) -> list[tuple[int, str, int]]:
        """(index, prompt, seed) for every image, in the fixed order all results use."""
        return [(i * len(self.seeds) + j, p, s)
                for i, p in enumerate(self.prompts) for j, s in enumerate(self.seeds)]

    def image_name(self, index: int) -> str:
        prompt_index, seed_index = divmod(index, len(self.seeds))
        return f"p{prompt_index:03d}_s{self.seeds[seed_index]}.png"


def read_prompts(path: str | Path) -> tuple[str, ...]:
    """One prompt per non-empty line; lines starting with '#' are comments."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt file not found: {path}")
    prompts = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and not line.lstrip().startswith("#"))
    if not prompts:
        raise UserError(f"prompt file {path} has no prompts")
    return prompts


def _call_kwargs(pipe, spec: GenerationSpec) -> dict:
    """Map the spec's guidance onto whichever knob this pipeline class has.

    Qwen-Image's ``guidance_scale`` is a distillation input that its base model ignores; its
    classifier-free guidance is ``true_cfg_scale`` with a negative prompt.
    """
    params = inspect.signature(pipe.__call__).parameters
    kwargs = dict(height=spec.height, width=spec.width, num_inference_steps=spec.steps,
                  output_type="np")
    if "true_cfg_scale" in params:
        kwargs.update(true_cfg_scale=spec.guidance, negative_prompt=" ")
    elif "guidance_scale" in params:
        kwargs["guidance_scale"] = spec.guidance
    if spec.image is not None:
        if "image" not in params:
            raise UserError(f"{type(pipe).__name__} takes no input image; remove 'image' from the study")
        with Image.open(spec.image) as img:
            kwargs["image"] = img.convert("RGB")
    kwargs.update(dict(spec.extra))
    return kwargs


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate_image(loaded: LoadedPipeline, spec: GenerationSpec, prompt: str, seed: int) -> np.ndarray:
    """One HxWx3 uint8 image; raises NonFiniteOutput when the pipeline produced NaN or inf."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.inference_mode():
        out = loaded.pipe(prompt=prompt, generator=generator, **_call_kwargs(loaded.pipe, spec))
    batch = out.images if hasattr(out, "images") else out.frames
    image = np.asarray(batch[0], dtype=np.float32)
    if image.ndim == 4:  # video pipelines: the middle frame stands for the clip
        image = image[image.shape[0] // 2]
    if not np.isfinite(image).all():
        raise NonFiniteOutput(f"non-finite pixels (NaN/inf) for prompt {prompt!r}, seed {seed}")
    return (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def iter_images(
    loaded: LoadedPipeline, spec: GenerationSpec
) -> Iterator[tuple[int, np.ndarray, float]]:
    """Yield (index, image, seconds) per image so callers can stop early or show progress."""
    for index, prompt, seed in spec.items():
        synchronize(loaded.device)
        start = time.perf_counter()
        image = generate_image(loaded, spec, prompt, seed)
        synchronize(loaded.device)
        yield index, image, time.perf_counter() - start


def save_png(image: np.ndarray, path: Path) -> None:
    Image.fromarray(image).save(path, format="PNG")


def load_png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def baseline_key(loaded: LoadedPipeline, spec: GenerationSpec) -> str:
    import diffusers

    device = loaded.device.type
    if device == "cuda":
        device += ":" + torch.cuda.get_device_name(loaded.device)
    fields = dict(format=BASELINE_FORMAT, model=loaded.model, content=loaded.fingerprint,
                  spec=asdict(spec), dtype=str(loaded.dtype), device=device,
                  image=_sha256(Path(spec.image)) if spec.image else None,
                  torch=torch.__version__, diffusers=diffusers.__version__)
    if getattr(loaded.transformer, "_layerscan_compiled", False):
        # Compiled BF16 differs from eager BF16 by a few pixel levels (inductor fuses ops and
        # keeps their intermediates in float32): a compiled run needs its own reference, or BF16
        # compiled would not score as identical to it.  Eager keys stay as they were.
        fields["execution_mode"] = "compiled"
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


def default_cache_root() -> Path:
    return Path(os.environ.get("LAYERSCAN_CACHE", Path.home() / ".cache" / "layerscan"))


@dataclass
class Baseline:
    images: list[np.ndarray]
    seconds_per_image: float
    directory: Path
    cached: bool  # True when loaded from disk rather than generated now


def _load_verified(directory: Path, key: str, count: int) -> Baseline | None:
    """The cached entry if it is complete and every file matches its recorded hash."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
        if manifest["key"] != key or len(manifest["files"]) != count:
            return None
        images = []
        for name, digest in manifest["files"]:
            if _sha256(directory / name) != digest:
                return None
            images.append(load_png(directory / name))
        return Baseline(images, float(manifest["seconds_per_image"]), directory, cached=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_or_build_baseline(
    loaded: LoadedPipeline,
    spec: GenerationSpec,
    cache_root: Path | None = None,
    on_image: Callable[[int, float], None] | None = None,
) -> Baseline:
    """The BF16 baseline for (model, spec), generated once and reused across runs.

    The caller must have put the pipeline in BF16.  A half-written entry never replaces a good
    one: images go to a temporary directory that is renamed into place when complete.
    """
    key = baseline_key(loaded, spec)
    directory = (cache_root or default_cache_root()) / "baselines" / key
    cached = _load_verified(directory, key, len(spec.items()))
    if cached is not None:
        return cached
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=directory.parent))
    try:
        images, files, seconds = [], [], []
        for index, image, elapsed in iter_images(loaded, spec):
            name = spec.image_name(index)
            save_png(image, tmp / name)
            images.append(image)
            files.append((name, _sha256(tmp / name)))
            seconds.append(elapsed)
            if on_image:
                on_image(index, elapsed)
        manifest = dict(key=key, model=loaded.model, spec=asdict(spec), files=files,
                        seconds_per_image=float(np.mean(seconds)))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if directory.exists():
            shutil.rmtree(directory)  # the corrupt or stale entry that failed verification
        tmp.rename(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Baseline(images, manifest["seconds_per_image"], directory, cached=False)
