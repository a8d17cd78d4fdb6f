"""Load any diffusers DiT pipeline, by hub id, local directory or built-in tiny name.

The built-in tiny pipelines go through the same ``from_pretrained`` call as a user's model: they
are real pipeline directories written with ``save_pretrained``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from layerscan.errors import UserError
from layerscan.layers import LayerIndex
from layerscan.profiles import Profile, make_profile

DEMO_MODEL = "demo"  # the trained pipeline shipped in layerscan/demo/pipeline
DIT_ATTRS = ("transformer", "transformer_2")  # Wan 2.2's second expert is a DiT like the first
TEXT_ENCODER_ATTRS = ("text_encoder", "text_encoder_2", "text_encoder_3")
COMPONENT_ATTRS = (*DIT_ATTRS, *TEXT_ENCODER_ATTRS, "vae")
_HASH_WHOLE_FILE_BELOW = 64 << 20
_HASH_EDGE_BYTES = 4 << 20


@dataclass
class LoadedPipeline:
    """A pipeline plus what layerscan needs to know about it."""

    pipe: object
    model: str  # what the user asked for: hub id, directory or tiny name
    path: Path  # the directory the weights came from
    fingerprint: str  # changes whenever the weights or configs change
    device: torch.device
    dtype: torch.dtype
    profile: Profile
    index: LayerIndex
    # Whether the pipeline makes videos: decided once, here (``is_video_pipeline``); generation,
    # caching, scoring and the report all follow it.
    video: bool = False

    @property
    def transformer(self) -> nn.Module:
        return self.pipe.transformer

    @property
    def dits(self) -> dict[str, nn.Module]:
        """The denoisers by pipeline attribute: the DiT, and Wan 2.2's second expert."""
        return {a: getattr(self.pipe, a) for a in DIT_ATTRS
                if isinstance(getattr(self.pipe, a, None), nn.Module)}

    @property
    def text_encoders(self) -> dict[str, nn.Module]:
        return {a: getattr(self.pipe, a) for a in TEXT_ENCODER_ATTRS
                if isinstance(getattr(self.pipe, a, None), nn.Module)}

    @property
    def vae(self) -> nn.Module | None:
        return getattr(self.pipe, "vae", None)

    @property
    def components(self) -> dict[str, nn.Module]:
        """Every model component by pipeline attribute: DiT(s), text encoder(s), VAE."""
        return {a: getattr(self.pipe, a) for a in COMPONENT_ATTRS
                if isinstance(getattr(self.pipe, a, None), nn.Module)}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_device(device: str | None, said: str | None = None) -> None:
    """Refuse a device this machine does not have before any model loads (a torch traceback
    after minutes of loading otherwise).  ``said``: how the user asked for it, for the message."""
    if device is None:
        return
    said = said or f"--device {device}"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"{said}: not a device (cpu, cuda, cuda:1 ...)") from None
    if parsed.type == "cpu":
        return
    if parsed.type != "cuda":
        raise UserError(f"{said}: layerscan runs on cpu or cuda devices")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise UserError(f"{said}: no CUDA GPU is visible here; use --device cpu")
    if parsed.index is not None and parsed.index >= count:
        raise UserError(f"{said}: this machine has {count} CUDA GPU(s), numbered 0 to {count - 1}")


def resolve_model_dir(model: str, revision: str | None = None, cache_root: Path | None = None) -> Path:
    """A local pipeline directory for ``model``, downloading hub ids (only) when needed."""
    local = local_model_dir(model, cache_root)
    if local is not None:
        return local
    from diffusers import DiffusionPipeline

    try:
        return Path(DiffusionPipeline.download(model, revision=revision))
    except Exception as exc:  # the hub client raises many types for the same user-facing fact
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"could not fetch {model!r} from the hub: {first_line}") from None


def local_model_dir(model: str, cache_root: Path | None = None) -> Path | None:
    """The directory of a built-in or local ``model``; None for a hub id.  Never downloads, so
    a mistyped path is reported before anything slow happens."""
    from layerscan.tiny import TINY_ARCHITECTURES, tiny_pipeline_dir

    if model in TINY_ARCHITECTURES:
        return tiny_pipeline_dir(model, cache_root)
    if model == DEMO_MODEL:
        from layerscan.demo import DEMO_PIPELINE_DIR

        return DEMO_PIPELINE_DIR
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{model} is a file, not a diffusers pipeline directory")
        if not (path / "model_index.json").is_file():
            raise UserError(f"{model} is not a diffusers pipeline: no model_index.json in it")
        return path
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise UserError(f"model directory not found: {model}")
    if model.count("/") != 1:
        raise UserError(f"model not found: {model!r} is neither a directory, a built-in tiny "
                        f"pipeline ({', '.join(TINY_ARCHITECTURES)}) nor a hub id (org/name)")
    return None


def fingerprint_dir(path: Path) -> str:
    """Content fingerprint of a pipeline directory: names, sizes and file hashes.

    Files above 64 MiB are hashed by their size plus first and last 4 MiB, so fingerprinting a
    40 GB checkpoint stays fast; safetensors headers sit at the start, so changed shapes or
    dtypes still change the fingerprint.
    """
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue
        size = file.stat().st_size
        digest.update(f"{rel}\0{size}\0".encode())
        with open(file, "rb") as fh:
            if size <= _HASH_WHOLE_FILE_BELOW:
                digest.update(fh.read())
            else:
                digest.update(fh.read(_HASH_EDGE_BYTES))
                fh.seek(size - _HASH_EDGE_BYTES)
                digest.update(fh.read())
    return digest.hexdigest()[:16]


def _quiet_libraries() -> None:
    """Loading bars and warnings of diffusers/transformers would drown layerscan's own progress."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):
        lib.disable_progress_bar()
        lib.set_verbosity_error()


def load_pipeline(
    model: str,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.bfloat16,
    trust_remote_code: bool = False,
    revision: str | None = None,
    profile: str | None = None,
    target: str | None = None,
    components: tuple[str, ...] | None = None,
    match: str | None = None,
    cache_root: Path | None = None,
) -> LoadedPipeline:
    """Load ``model`` in ``dtype`` on ``device`` and index the layers ``target`` quantizes.

    ``profile`` names the architecture (default: chosen from the DiT's class); ``components``
    restricts the quantized components; ``match`` overrides how the target matches
    ``ignored_layers`` (default: the target's).
    """
    from diffusers import DiffusionPipeline

    path = resolve_model_dir(model, revision, cache_root)
    index = json.loads((path / "model_index.json").read_text())
    if "transformer" not in index:
        raise UserError(f"{model} has no DiT: layerscan needs a pipeline with a 'transformer' "
                        f"component (found: {', '.join(k for k in index if not k.startswith('_'))})")
    device = torch.device(device) if device else default_device()
    _quiet_libraries()
    try:
        pipe = DiffusionPipeline.from_pretrained(
            str(path), dtype=dtype, trust_remote_code=trust_remote_code
        )
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise UserError(f"{model} ships its own code; rerun with --trust-remote-code "
                            "if you trust it") from None
        raise UserError(f"could not load {model}: {str(exc).splitlines()[0]}") from None
    except (OSError, KeyError) as exc:
        raise UserError(f"could not load {model}: {str(exc).splitlines()[0]}") from None
    pipe.to(device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    loaded = wrap_pipeline(pipe, model, path, fingerprint_dir(path), device, dtype, profile, target,
                           components, match)
    if device.type == "cpu" and loaded.vae is not None and loaded.profile.component("vae") is None:
        # CPUs without BF16 units run BF16 convolutions through a slow reference kernel (the
        # demo's 64x64 decode: 4.5 s in BF16, 0.05 s in FP32).  A VAE the target does not
        # quantize is outside the FP8 question and shared by every configuration and the
        # baseline, so on the CPU it decodes in FP32; the baseline key records it.
        _decode_in_fp32(loaded.vae, dtype)
    return loaded


SERVING_ELEMENT_SIZE = "_layerscan_serving_element_size"  # bytes per element where served


def _decode_in_fp32(vae: nn.Module, dtype: torch.dtype) -> None:
    """Run ``vae``'s decoder in FP32, its encoder as loaded.

    Only the decode path: pipelines hand the decoder latents in the transformer's dtype (FLUX.1
    without casting them), so its input is cast here; encoded latents go on into the BF16
    transformer (image editing), so the encoder keeps its dtype.  Weight bytes are a property
    of serving, not of this CPU: each cast parameter remembers the size it is served at.
    """
    parts = [m for m in (getattr(vae, "post_quant_conv", None), getattr(vae, "decoder", None))
             if isinstance(m, nn.Module)]
    decode = getattr(vae, "decode", None)
    if not parts or decode is None:
        return
    served = torch.empty(0, dtype=dtype).element_size()
    for part in parts:
        part.to(torch.float32)
        for param in part.parameters():
            setattr(param, SERVING_ELEMENT_SIZE, served)

    def decode_in_fp32(z, *args, **kwargs):
        if isinstance(z, torch.Tensor) and z.is_floating_point():
            z = z.to(torch.float32)
        return decode(z, *args, **kwargs)

    vae.decode = decode_in_fp32


def is_video_pipeline(pipe) -> bool:
    """A pipeline makes videos when its call takes a frame count (``num_frames``: Wan,
    HunyuanVideo, LTX, CogVideoX, Mochi); no image pipeline in diffusers has one.  Read from the
    signature, so it is known before anything is generated and cannot disagree between runs."""
    call = getattr(type(pipe), "__call__", None)  # a bare holder of a transformer has none
    return call is not None and "num_frames" in inspect.signature(call).parameters


def wrap_pipeline(pipe, model: str, path: Path, fingerprint: str, device: torch.device,
                  dtype: torch.dtype, profile: str | None = None, target: str | None = None,
                  components: tuple[str, ...] | None = None, match: str | None = None) -> LoadedPipeline:
    """A pipeline already on ``device`` with its profile and layer index."""
    present = {a: getattr(pipe, a) for a in COMPONENT_ATTRS
               if isinstance(getattr(pipe, a, None), nn.Module)}
    chosen = make_profile(type(pipe.transformer).__name__, profile, target, components, match,
                          present=tuple(present))
    return LoadedPipeline(pipe, model, path, fingerprint, device, dtype, chosen,
                          LayerIndex.discover(present, chosen), is_video_pipeline(pipe))
