"""Generation over a fixed prompt set and fixed seeds, and the cached BF16 baseline.

One generated *output* is an HxWx3 uint8 image, or for a video pipeline (``LoadedPipeline.video``)
all T of its frames, TxHxWx3: every frame is scored, so a video is never reduced to one frame.
Names say "image" for either (``generate_image``, ``Baseline.images``).

The baseline is the reference every configuration is scored against, so it is cached on disk
under a key made of everything that changes its pixels; entries are verified against their
manifest's hashes on every load and rebuilt when anything is off.  Outputs are PNG (a video is
one PNG strip, its frames side by side), nothing is pickled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fcntl
import hashlib
import inspect
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from layerscan.cache import cache_root_or_default
from layerscan.clock import CLOCK, COMPILE, GENERATE, SAVE, synchronize
from layerscan.errors import NonFiniteOutput, UserError
from layerscan.pipeline import LoadedPipeline

BASELINE_FORMAT = 2  # 2: noise-floor variants, peak memory and median time


@dataclass(frozen=True)
class Setting:
    """One generation setting of a matrix: a name and the call arguments it changes."""

    name: str
    steps: int
    height: int
    width: int
    guidance: float
    image: str | None = None
    extra: tuple[tuple[str, object], ...] = ()


@dataclass(frozen=True)
class GenerationSpec:
    """Everything besides the model and the FP8 configuration that decides the pixels.

    ``settings``: a matrix of generation settings (resolutions, frame counts, steps...).  Every
    prompt and seed is generated under each setting, one setting after another in the order
    given (the study puts the cheapest first, so early stopping tries it first); the spec's own
    steps, size, guidance, image and extra are then unused.  Without settings the spec is one
    setting, and everything is as it always was (its cache keys included).
    """

    prompts: tuple[str, ...]
    seeds: tuple[int, ...] = (0,)
    steps: int = 4
    height: int = 32
    width: int = 32
    guidance: float = 4.0
    image: str | None = None  # input image for editing pipelines (Qwen-Image-Edit)
    extra: tuple[tuple[str, object], ...] = ()  # further pipeline arguments, e.g. num_frames
    settings: tuple[Setting, ...] = ()

    def parts(self) -> list["GenerationSpec"]:
        """One spec per setting (itself when it has no matrix), each without a matrix."""
        if not self.settings:
            return [self]
        return [dataclasses.replace(self, steps=s.steps, height=s.height, width=s.width,
                                    guidance=s.guidance, image=s.image, extra=s.extra, settings=())
                for s in self.settings]

    @property
    def per_setting(self) -> int:
        """Outputs under each setting: every prompt with every seed."""
        return len(self.prompts) * len(self.seeds)

    def setting_names(self) -> list[str]:
        return [s.name for s in self.settings] or [""]

    def part_of(self, index: int) -> tuple[int, "GenerationSpec", int]:
        """(setting number, that setting's spec, index within it) of output ``index``."""
        setting, local = divmod(index, self.per_setting)
        return setting, self.parts()[setting], local

    def items(self) -> list[tuple[int, str, int]]:
        """(index, prompt, seed) for every output, in the fixed order all results use: setting
        by setting, within one prompt by prompt, within one seed by seed."""
        return [(k * self.per_setting + i * len(self.seeds) + j, p, s)
                for k in range(len(self.settings) or 1)
                for i, p in enumerate(self.prompts) for j, s in enumerate(self.seeds)]

    def image_name(self, index: int) -> str:
        setting, local = divmod(index, self.per_setting)
        prompt_index, seed_index = divmod(local, len(self.seeds))
        prefix = f"{self.settings[setting].name}_" if self.settings else ""
        return f"{prefix}p{prompt_index:03d}_s{self.seeds[seed_index]}.png"


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


def generate_image(loaded: LoadedPipeline, spec: GenerationSpec, prompt: str, seed: int) -> np.ndarray:
    """One output: an HxWx3 uint8 image, or every frame of a video pipeline's clip (TxHxWx3);
    raises NonFiniteOutput when the pipeline produced NaN or inf.  ``spec`` is one setting
    (a matrix's ``part_of(index)``)."""
    if spec.settings:
        raise ValueError("generate_image takes one setting; pass spec.part_of(index)[1]")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.inference_mode():
        out = loaded.pipe(prompt=prompt, generator=generator, **_call_kwargs(loaded.pipe, spec))
    output = np.asarray((out.frames if loaded.video else out.images)[0], dtype=np.float32)
    if output.ndim != (4 if loaded.video else 3) or output.shape[-1] != 3:
        kind = "TxHxWx3 frames" if loaded.video else "an HxWx3 image"
        raise TypeError(f"{type(loaded.pipe).__name__} returned an array of shape {output.shape}, "
                        f"not {kind}")
    if not np.isfinite(output).all():
        raise NonFiniteOutput(f"non-finite pixels (NaN/inf) for prompt {prompt!r}, seed {seed}")
    return (np.clip(output, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def iter_images(
    loaded: LoadedPipeline, spec: GenerationSpec, start: int = 0, only: set[int] | None = None
) -> Iterator[tuple[int, np.ndarray, float, bool]]:
    """Yield (index, image, seconds, compiled) per image from index ``start`` on (and of those
    only the indices in ``only``, when given), so callers can stop early, resume, or show
    progress; ``compiled``: torch.compile built a graph while this image was generated, so its
    seconds include compilation."""
    parts = spec.parts()
    for index, prompt, seed in spec.items()[start:]:
        if only is not None and index not in only:
            continue
        graphs = _graphs_compiled()
        with CLOCK.phase(GENERATE, loaded.device) as phase:
            began = time.perf_counter()
            image = generate_image(loaded, parts[index // spec.per_setting], prompt, seed)
            synchronize(loaded.device)
            elapsed = time.perf_counter() - began
            compiled = _graphs_compiled() != graphs
            if compiled:
                phase.name = COMPILE
        yield index, image, elapsed, compiled


def compile_free_seconds(timings: list[tuple[float, bool]]) -> list[float]:
    """The seconds of the images that compiled nothing: what serving the configuration costs."""
    return [seconds for seconds, compiled in timings if not compiled]


def seconds_per_output(by_setting: dict[int, list[float]]) -> float:
    """Seconds per output: the median, or under a settings matrix the mean of each setting's
    median (a setting's outputs may take twice another's: one pooled median would land between)."""
    return float(np.mean([np.median(values) for values in by_setting.values()]))


def typical_seconds(timings: list[tuple[float, bool]]) -> float | None:
    """Median seconds per image over the images that compiled nothing (all, if every one did):
    what an image costs once the configuration's graphs exist, as users running it would see."""
    chosen = compile_free_seconds(timings) or [seconds for seconds, _ in timings]
    return float(np.median(chosen)) if chosen else None


# zlib level 1 (PNG is lossless at any level): a 1024x1024 output is written in a fifth of the
# default level's time (0.09 s vs 0.43 s on one CPU core), 20 % larger.
PNG_COMPRESSION = 1
FRAMES_KEY = "layerscan-frames"  # PNG text chunk: the frame count of a video strip


def save_png(image: np.ndarray, path: Path) -> None:
    """Write an image, or a video (TxHxWx3) as one strip of its frames side by side.

    One file per output keeps the cache's manifest (one hash per output) and the trial images
    the same for videos and images, and the strip is what a person opening it wants to see.
    The frame count goes into a PNG text chunk, so the file alone gives the clip back.
    """
    with CLOCK.phase(SAVE):
        if image.ndim == 4:
            info = PngImagePlugin.PngInfo()
            info.add_text(FRAMES_KEY, str(image.shape[0]))
            Image.fromarray(np.concatenate(list(image), axis=1)).save(
                path, format="PNG", pnginfo=info, compress_level=PNG_COMPRESSION)
        else:
            Image.fromarray(image).save(path, format="PNG", compress_level=PNG_COMPRESSION)


@contextlib.contextmanager
def _own_file() -> Iterator[None]:
    """Lift Pillow's decompression-bomb limit while reading a file layerscan wrote itself: an
    81-frame 720p strip has 75 M pixels and a longer clip passes Pillow's 179 M refusal line,
    a guard meant for files from strangers."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def load_png(path: Path) -> np.ndarray:
    """An image, or the TxHxWx3 frames of a strip ``save_png`` wrote for a video."""
    with _own_file(), Image.open(path) as img:
        frames = img.info.get(FRAMES_KEY)
        pixels = np.asarray(img.convert("RGB"))
    if frames is None:
        return pixels
    height, width = pixels.shape[0], pixels.shape[1] // int(frames)
    return np.ascontiguousarray(pixels.reshape(height, int(frames), width, 3).transpose(1, 0, 2, 3))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _decoder_dtype(vae) -> str | None:
    """The dtype the VAE decodes in (on the CPU its decoder runs in FP32, see load_pipeline)."""
    if vae is None:
        return None
    decoder = getattr(vae, "decoder", vae)
    return str(next(decoder.parameters()).dtype)


def baseline_key(loaded: LoadedPipeline, spec: GenerationSpec) -> str:
    """Everything that changes the baseline's pixels, hashed.  A settings matrix's key is made of
    its settings' keys (each with its input image's content), in order."""
    import diffusers

    if spec.settings:
        keys = [baseline_key(loaded, part) for part in spec.parts()]
        return hashlib.sha256(json.dumps({"matrix": keys}).encode()).hexdigest()[:20]

    device = loaded.device.type
    if device == "cuda":
        device += ":" + torch.cuda.get_device_name(loaded.device)
    spec_fields = asdict(spec)
    del spec_fields["settings"]  # one setting (a matrix's are keyed above): keyed as ever
    fields = dict(format=BASELINE_FORMAT, model=loaded.model, content=loaded.fingerprint,
                  spec=spec_fields, dtype=str(loaded.dtype), device=device,
                  vae_decoder_dtype=_decoder_dtype(loaded.vae),
                  image=_sha256(Path(spec.image)) if spec.image else None,
                  torch=torch.__version__, diffusers=diffusers.__version__)
    if getattr(loaded.transformer, "_layerscan_compiled", False):
        # Compiled BF16 differs from eager BF16 by a few pixel levels (inductor fuses ops and
        # keeps their intermediates in float32): a compiled run needs its own reference, or BF16
        # compiled would not score as identical to it.  Eager keys stay as they were.
        fields["execution_mode"] = "compiled"
    if loaded.video:
        # Videos were once cached as their middle frame under the same fields: whole clips are
        # keyed apart, so such an entry is never read as a clip (image keys stay as they were).
        fields["output"] = "video"
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


# Numerically equivalent changes to a BF16 run, whose distance to the baseline is the noise
# floor: the part of any distance to BF16 that is not FP8's fault (diffusion sampling amplifies
# one-ULP differences).  Generated with the baseline, on the same prompts and seeds.
FLOOR_VARIANTS = {
    "latents+1ulp": "initial latents moved by one BF16 ULP away from zero",
    "attention-math": "attention through PyTorch's math SDPA kernel instead of the default one",
}


@dataclass
class Baseline:
    images: list[np.ndarray]  # one output per (prompt, seed): images, or videos' TxHxWx3 frames
    seconds_per_image: float  # median over the baseline's outputs
    peak_memory_bytes: int | None  # GPU peak while the baseline was generated (None on CPU)
    directory: Path
    cached: bool  # True when loaded from disk rather than generated now
    created_at: str = ""
    floor_images: dict[str, list[np.ndarray]] = field(default_factory=dict)  # variant -> images
    image_seconds: list[float] = field(default_factory=list)  # per output, compilation left out
    parts: list["Baseline"] = field(default_factory=list)  # a matrix's: one per setting (join_baselines)
    image_settings: list[int] = field(default_factory=list)  # the setting of each image_seconds entry


def join_baselines(parts: list[Baseline]) -> Baseline:
    """A matrix's baseline: every setting's outputs in the spec's order.  Each setting is built
    and cached on its own (under the key it has alone, so a setting shared with another study is
    generated once); the noise floor is measured per setting (``parts``)."""
    if len(parts) == 1:
        return parts[0]
    seconds = [s for part in parts for s in part.image_seconds]
    by_setting = {k: part.image_seconds for k, part in enumerate(parts) if part.image_seconds}
    peaks = [part.peak_memory_bytes for part in parts if part.peak_memory_bytes is not None]
    # As every record's seconds_per_image under a matrix (every output compiled: the parts' own).
    typical = seconds_per_output(by_setting) if by_setting else \
        float(np.mean([part.seconds_per_image for part in parts]))
    return Baseline([image for part in parts for image in part.images], typical,
                    max(peaks) if peaks else None, parts[0].directory,
                    cached=all(part.cached for part in parts),
                    created_at=max(part.created_at for part in parts), image_seconds=seconds,
                    parts=list(parts),
                    image_settings=[k for k, part in enumerate(parts) for _ in part.image_seconds])


def bf16_ulp_away_from_zero(x: torch.Tensor) -> torch.Tensor:
    """``x`` with every element moved by one BF16 unit in the last place away from zero.

    BF16 is sign-magnitude, so adding one to the bit pattern's magnitude is the next
    representable value of larger magnitude; tensors in another dtype get the same step.
    """
    rounded = x.to(torch.bfloat16)
    nudged = (rounded.view(torch.int16) + 1).view(torch.bfloat16)
    return (x + (nudged.to(x.dtype) - rounded.to(x.dtype))).to(x.dtype)


@contextlib.contextmanager
def floor_variant(loaded: LoadedPipeline, variant: str) -> Iterator[None]:
    """Run the pipeline under one of ``FLOOR_VARIANTS`` inside the block."""
    pipe = loaded.pipe
    if variant == "latents+1ulp":
        original = pipe.prepare_latents

        def nudged(*args, **kwargs):
            out = original(*args, **kwargs)
            if isinstance(out, tuple):  # Flux and editing pipelines return extras after the latents
                return (bf16_ulp_away_from_zero(out[0]), *out[1:])
            return bf16_ulp_away_from_zero(out)

        pipe.prepare_latents = nudged
        try:
            yield
        finally:
            del pipe.prepare_latents  # the class's method again
    elif variant == "attention-math":
        from diffusers.models.attention_dispatch import attention_backend

        with attention_backend("_native_math"):
            yield
    else:
        raise ValueError(f"unknown floor variant {variant!r}")


def _load_verified(directory: Path, key: str, count: int) -> tuple[Baseline | None, str | None]:
    """The cached entry if it is complete and every file matches its recorded hash, else None
    and what is wrong with it (None when there is no entry at all)."""
    if not directory.exists():
        return None, None
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
        if manifest["key"] != key or len(manifest["files"]) != count \
                or set(manifest["floor"]) != set(FLOOR_VARIANTS):
            return None, "its manifest is for other settings or incomplete"

        def read(files) -> list[np.ndarray]:
            images = []
            for name, digest in files:
                if _sha256(directory / name) != digest:
                    raise ValueError(f"{name} does not match its recorded hash")
                images.append(load_png(directory / name))
            return images

        images = read(manifest["files"])
        floors = {v: read(files) for v, files in manifest["floor"].items()}
        return Baseline(images, float(manifest["seconds_per_image"]), manifest["peak_memory_bytes"],
                        directory, cached=True, created_at=manifest["created_at"],
                        floor_images=floors, image_seconds=manifest.get("image_seconds", [])), None
    except FileNotFoundError as exc:
        return None, f"{Path(exc.filename or '?').name} is missing"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, str(exc) or type(exc).__name__


class _Progress:
    """The outputs of an unfinished baseline build, one fsynced JSON line per output, so a build
    cut short (Ctrl-C, a kill, a crash) resumes from the outputs already made.  An output whose
    file no longer matches its line (a PNG cut short) is made again."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "progress.jsonl"
        self.done: dict[str, dict] = {}
        if self.path.exists():
            for line in self.path.read_bytes().splitlines():
                try:
                    entry = json.loads(line)
                    if _sha256(directory / entry["name"]) == entry["sha256"]:
                        self.done[entry["name"]] = entry
                except (OSError, ValueError, KeyError, TypeError):
                    continue  # a line or a file cut short: that output is made again

    def add(self, name: str, image: np.ndarray, seconds: float, compiled: bool,
            peak: int | None) -> dict:
        save_png(image, self.directory / name)
        entry = dict(name=name, sha256=_sha256(self.directory / name), seconds=seconds,
                     compiled=compiled, peak_memory_bytes=peak)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write("\n" + json.dumps(entry) + "\n")  # never glued to a line cut short
            fh.flush()
            os.fsync(fh.fileno())
        self.done[name] = entry
        return entry


def _generate_set(loaded: LoadedPipeline, spec: GenerationSpec, progress: _Progress, prefix: str,
                  on_image: Callable[[int, float], None] | None,
                  reference: list[np.ndarray] | None = None):
    """One set of outputs (the baseline's, or a floor variant's): those on record are read back,
    the rest generated and recorded one by one.

    ``reference``: the baseline's outputs, for a floor variant.  When the variant's first output
    is bit-identical to the baseline's, the variant changes nothing here (under compilation the
    attention-math variant runs the very kernel the baseline ran) and the rest is not generated:
    the set is that one output, and the noise floor flags it and leaves it out.
    """
    names = [prefix + spec.image_name(i) for i in range(len(spec.items()))]
    device = loaded.device

    resumed = [i for i, name in enumerate(names) if name in progress.done]
    made: dict[int, np.ndarray] = {}  # generated now: kept, not read back from their PNGs

    def make(indices: set[int]) -> None:
        for index, image, elapsed, compiled in iter_images(loaded, spec, only=indices):
            peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
            progress.add(names[index], image, elapsed, compiled, peak)
            made[index] = image
            if on_image:
                on_image(index, elapsed)

    def output(index: int) -> np.ndarray:
        return made[index] if index in made else load_png(progress.directory / names[index])

    make({0} - set(resumed))
    if reference is not None and np.array_equal(output(0), reference[0]):
        names = names[:1]
    make(set(range(len(names))) - set(resumed) - set(made))
    for index in resumed:
        if on_image and index < len(names):
            on_image(index, progress.done[names[index]]["seconds"])
    entries = [progress.done[name] for name in names]
    images = [output(i) for i in range(len(names))]
    files = [(e["name"], e["sha256"]) for e in entries]
    return images, files, entries


def load_or_build_baseline(
    loaded: LoadedPipeline,
    spec: GenerationSpec,
    cache_root: Path | None = None,
    on_image: Callable[[int, float], None] | None = None,
    capture: contextlib.AbstractContextManager | None = None,
    warn: Callable[[str], None] | None = None,
) -> Baseline:
    """The BF16 baseline and its noise-floor variants for (model, spec), generated once and
    reused across runs.

    The caller must have put the pipeline in BF16 and hold ``baseline_lock``.  ``capture`` is
    entered around the baseline's own generation (not the variants'), e.g. to record the
    denoising trajectory.  Time and peak memory are measured on the baseline's generation: they
    are the BF16 row's.  Outputs go to ``.<key>.partial`` as they are made, so an interrupted
    build resumes there; the directory is renamed into place when complete, so a half-built
    entry never replaces a good one.  A cached entry that fails verification is rebuilt, and
    ``warn`` says so in one line.
    """
    warn = warn or (lambda message: print(message, file=sys.stderr))
    key = baseline_key(loaded, spec)
    directory = cache_root_or_default(cache_root) / "baselines" / key
    cached, problem = _load_verified(directory, key, len(spec.items()))
    if cached is not None:
        return cached
    if problem is not None:
        warn(f"baseline cache entry {directory} is damaged ({problem}); rebuilding it")
    partial = directory.parent / f".{key}.partial"
    partial.mkdir(parents=True, exist_ok=True)
    progress = _Progress(partial)
    total = len(spec.items()) * (1 + len(FLOOR_VARIANTS))
    if progress.done:
        warn(f"resuming the BF16 baseline: {len(progress.done)} of {total} outputs already made")
    if loaded.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(loaded.device)
    with capture or contextlib.nullcontext():
        images, files, entries = _generate_set(loaded, spec, progress, "", on_image)
    floors, floor_files = {}, {}
    for variant in FLOOR_VARIANTS:
        with floor_variant(loaded, variant):
            floors[variant], floor_files[variant], _ = _generate_set(
                loaded, spec, progress, f"floor-{variant}-", on_image, reference=images)
    peaks = [e["peak_memory_bytes"] for e in entries if e["peak_memory_bytes"] is not None]
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    timings = [(e["seconds"], e["compiled"]) for e in entries]
    manifest = dict(key=key, model=loaded.model, spec=asdict(spec), files=files,
                    floor=floor_files, seconds_per_image=typical_seconds(timings),
                    image_seconds=compile_free_seconds(timings),
                    peak_memory_bytes=max(peaks) if peaks else None, created_at=created)
    (partial / "manifest.json").write_text(json.dumps(manifest, indent=1))
    (partial / "progress.jsonl").unlink()
    if directory.exists():
        shutil.rmtree(directory)  # the damaged or stale entry that failed verification
    partial.rename(directory)
    return Baseline(images, manifest["seconds_per_image"], manifest["peak_memory_bytes"], directory,
                    cached=False, created_at=created, floor_images=floors,
                    image_seconds=manifest["image_seconds"])


@contextlib.contextmanager
def baseline_lock(loaded, spec, cache_root: Path | None = None):
    """Hold an exclusive lock on this baseline's cache entry while it is loaded or built.

    A second process on the same cache (this host, or a shared filesystem with working
    ``flock``) waits here, then finds the finished entry and loads it.
    """
    root = cache_root_or_default(cache_root) / "baselines"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{baseline_key(loaded, spec)}.lock", "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("waiting for another process to finish this BF16 baseline", file=sys.stderr)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
