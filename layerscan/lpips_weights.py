"""The LPIPS backbone checkpoint: where torchvision keeps it, fetching it once, and building an
LPIPS model whose every learned tensor comes from a file on disk.

The checkpoint is fetched on first use into torchvision's own cache (checked against the hash in
its file name), unless ``LAYERSCAN_OFFLINE`` or ``HF_HUB_OFFLINE`` is set; it is never replaced
by random weights, because an LPIPS built on a random backbone still returns plausible-looking
numbers and would silently corrupt every search decision made from it.

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

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from layerscan.errors import UserError

if TYPE_CHECKING:
    import torch

__all__ = [
    "LPIPS_NETS",
    "LpipsWeightsMissing",
    "build_lpips",
    "check_lpips_weights",
    "check_net",
    "lpips_weights_path",
    "lpips_weights_url",
]

LPIPS_NETS: dict[str, str] = {"alex": "alexnet", "vgg": "vgg16"}
"""LPIPS backbone names accepted here -> torchvision architecture names."""


class LpipsWeightsMissing(UserError):
    """The torchvision backbone checkpoint LPIPS needs is absent or unreadable.

    A ``UserError`` because the user fixes it by copying a file (or by dropping LPIPS); the
    message is one line naming the path, the download URL and the flags to continue without it.
    """


def check_net(net: str) -> str:
    """The torchvision architecture of LPIPS backbone ``net``; a ``UserError`` for an unknown one."""
    if net not in LPIPS_NETS:
        raise UserError(f"unknown LPIPS network {net!r}; choose one of: {', '.join(LPIPS_NETS)}")
    return LPIPS_NETS[net]


def lpips_weights_url(net: str = "alex") -> str:
    """Download URL of the torchvision ImageNet checkpoint for an LPIPS backbone.

    Read from torchvision's weights enums at runtime so the name always matches what the
    installed torchvision would itself look for.
    """
    arch = check_net(net)
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
        f"{path.name}), or {WITHOUT_LPIPS_ADVICE}{' '.join(WITHOUT_LPIPS_FLAGS)}"
    )


# What the missing-weights message tells users to add; tests run exactly these flags.
WITHOUT_LPIPS_ADVICE = "continue without LPIPS: "
WITHOUT_LPIPS_FLAGS = ("--metrics", "ssim,psnr", "--criterion-metric", "psnr")


OFFLINE_ENV = "LAYERSCAN_OFFLINE"  # "1": never download the LPIPS backbone
DOWNLOAD_TIMEOUT_S = 30


def _offline() -> str | None:
    """The variable that forbids downloads, if one is set (ours, or the Hugging Face hub's)."""
    for name in (OFFLINE_ENV, "HF_HUB_OFFLINE"):
        if os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off"):
            return name
    return None


def check_lpips_weights(net: str = "alex") -> None:
    """Make sure the backbone checkpoint file exists locally: download it on first use (once,
    about 233 MB for AlexNet), or raise ``LpipsWeightsMissing`` (offline, or the download failed).

    ``Scorer`` additionally loads and validates the file and raises the same error if it is
    corrupt or of the wrong architecture.
    """
    import http.client

    path = lpips_weights_path(net)
    if path.is_file():
        return
    if (variable := _offline()) is not None:
        raise LpipsWeightsMissing(_missing_message(net, path, f"the file does not exist "
                                                   f"({variable} is set)"))
    try:
        _download(lpips_weights_url(net), path)
    # URLError and timeouts are OSErrors; a cut-off transfer is an HTTPException.
    except (OSError, ValueError, http.client.HTTPException) as exc:
        problem = f"the file does not exist and downloading it failed ({exc})"
        raise LpipsWeightsMissing(_missing_message(net, path, problem)) from exc


def _download(url: str, path: Path) -> None:
    """Fetch ``url`` to ``path`` through a temporary file; where the file name carries a hash
    prefix (torchvision's ``alexnet-owt-7be5be79.pth``), the SHA-256 must start with it."""
    import hashlib
    import re
    import sys
    import tempfile
    import urllib.request

    from tqdm import tqdm

    expected = re.search(r"-([a-f0-9]{6,})\.", os.path.basename(url))
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, \
            tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
        try:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, file=sys.stderr,
                      desc=f"downloading {os.path.basename(url)}") as bar:
                while chunk := response.read(1 << 20):
                    tmp.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            tmp.close()
            if expected and not digest.hexdigest().startswith(expected.group(1)):
                raise ValueError(f"SHA-256 {digest.hexdigest()[:12]}... does not start with "
                                 f"{expected.group(1)}")
            os.replace(tmp.name, path)
        finally:
            if os.path.exists(tmp.name):
                os.unlink(tmp.name)


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


def build_lpips(net: str, device: str) -> torch.nn.Module:
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
