"""Record the BF16 denoising trajectory: a few DiT calls with their inputs and outputs, cached.

Every denoiser of the pipeline is recorded the same way: Wan 2.2 runs its high-noise expert
(``transformer``) for the first steps and its low-noise expert (``transformer_2``) for the rest,
and each expert gets its own samples, spread over its own part of the schedule, so the proxies
can score the layers of both.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from layerscan.generate import baseline_key, generate_image

PROXY_FORMAT = 3  # 2: text-encoder calls recorded too; 3: samples name their DiT (Wan's experts)
MAX_SAMPLES = 8  # DiT calls per replay pass, at most
STEP_IMAGES_PER_SAMPLE = 8  # one sample per this many (step, image) pairs: about 1/16 of an evaluation with CFG


# --- sampling plan ---------------------------------------------------------------------------

def sample_plan(steps: int, images: int) -> list[tuple[int, int]]:
    """(image, step) of every recorded sample of one DiT, spread over the prompts and over the
    schedule (a DiT that runs only part of it, one Wan expert, reads ``step`` as a position in its
    own part)."""
    count = min(MAX_SAMPLES, max(1, steps * images // STEP_IMAGES_PER_SAMPLE))
    return [((k * images) // count, ((2 * k + 1) * steps) // (2 * count)) for k in range(count)]


@dataclass
class Sample:
    image: int
    step: int
    args: tuple
    kwargs: dict
    output: torch.Tensor  # the BF16 DiT output for these inputs
    component: str = "transformer"  # which DiT made the call (Wan 2.2: or ``transformer_2``)


@dataclass
class Trajectory:
    """The recorded samples and what a full evaluation costs in DiT calls."""

    samples: list[Sample]
    calls_per_image: int  # DiT calls of every denoiser together (true CFG counts double)
    images: int
    steps: int
    record_calls: int = 0  # DiT calls spent recording outside the BF16 reference row
    # The text encoder's first calls (positional and keyword inputs): it runs once per prompt,
    # so replaying them is cheap next to any DiT call.
    text_calls: list[tuple[tuple, dict]] = field(default_factory=list)

    @property
    def full_evaluation_calls(self) -> int:
        return self.calls_per_image * self.images

    @property
    def components(self) -> list[str]:
        """The DiTs with samples, in the order they first ran."""
        return list(dict.fromkeys(s.component for s in self.samples))


def first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return first_tensor(output[0])
    sample = getattr(output, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise TypeError(f"cannot find the DiT output tensor in {type(output).__name__}")


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``obj`` (a call argument: tensors nested in tuples, lists and dicts) with ``fn`` applied
    to every tensor."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_tensors(v, fn) for v in obj)
    if isinstance(obj, list):
        return [map_tensors(v, fn) for v in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _copy(obj: Any, memo: dict[int, Any]) -> Any:
    """Detached CPU copy of a nested call argument; one copy per distinct tensor (memo)."""
    def copy(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in memo:
            memo[id(t)] = (t, t.detach().to("cpu", copy=True))
        return memo[id(t)][1]

    return map_tensors(obj, copy)


class _Recorder:
    """Hooks that keep the planned DiT calls of a generation run.

    A new image starts at the first DiT call after any other component (text encoder, VAE)
    ran; each image's calls (of every DiT, in call order) are buffered until it ends, then each
    DiT's planned steps are kept: the first call of a step (the conditional branch under CFG),
    at the planned position within the steps that DiT ran.
    """

    def __init__(self, pipe, dits: dict[str, nn.Module], plan: list[tuple[int, int]], steps: int) -> None:
        self.dits, self.plan, self.steps = dits, plan, steps
        self.others = [m for name, m in getattr(pipe, "components", {}).items()
                       if isinstance(m, nn.Module) and all(m is not d for d in dits.values())]
        self.text_encoder = getattr(pipe, "text_encoder", None)
        self.text_calls: list[tuple[tuple, dict]] = []
        self.image = -1
        self.boundary = True
        self.buffer: list[list] = []  # [component, args, kwargs, output] per DiT call
        self.memo: dict[int, Any] = {}
        self.samples: list[Sample] = []
        self.calls: list[int] = []
        self.missing = 0  # planned samples whose output was never seen
        self.handles: list = []

    def attach(self) -> None:
        for component, dit in self.dits.items():
            self.handles.append(dit.register_forward_pre_hook(
                lambda module, args, kwargs, c=component: self._pre(c, args, kwargs), with_kwargs=True))
            self.handles.append(dit.register_forward_hook(self._post))
        for module in self.others:
            for sub in (module, *module.children()):
                self.handles.append(sub.register_forward_pre_hook(self._other))
        if isinstance(self.text_encoder, nn.Module):
            self.handles.append(self.text_encoder.register_forward_pre_hook(self._text, with_kwargs=True))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self._finish_image()

    def _other(self, module, args) -> None:
        self.boundary = True

    def _text(self, module, args, kwargs) -> None:
        if len(self.text_calls) < MAX_SAMPLES:
            memo: dict[int, Any] = {}
            self.text_calls.append((_copy(args, memo), _copy(kwargs, memo)))

    def _pre(self, component: str, args, kwargs) -> None:
        if self.boundary:
            self._finish_image()
            self.image += 1
            self.boundary = False
        # References only: copying every call's inputs to the host would stall the device on
        # each call and slow the very generation the BF16 row's time is measured on.  The few
        # planned calls are copied when the image ends; the tensors themselves are kept (no new
        # views) so the copy's memo shares what calls share (prompt embeddings, masks).
        self.buffer.append([component, tuple(args), dict(kwargs), None])

    def _post(self, module, args, output) -> None:
        if self.buffer:
            self.buffer[-1][3] = first_tensor(output).detach()

    def _finish_image(self) -> None:
        if self.image < 0 or not self.buffer:
            return
        calls = len(self.buffer)
        self.calls.append(calls)
        per_step = max(1, calls // self.steps)  # 2 under CFG: a conditional and an unconditional call
        for component in self.dits:
            mine = [entry for entry in self.buffer if entry[0] == component]
            own_steps = len(mine) // per_step
            if not own_steps:
                continue  # this DiT ran no step of this image
            for image, step in self.plan:
                if image == self.image:
                    _, args, kwargs, output = mine[((step * own_steps) // self.steps) * per_step]
                    if output is None:
                        self.missing += 1
                    else:
                        self.samples.append(Sample(image, step, _copy(args, self.memo),
                                                   _copy(kwargs, self.memo),
                                                   output.to("cpu", copy=True), component))
        self.buffer, self.memo = [], {}

    def trajectory(self, images: int, record_calls: int = 0) -> Trajectory | None:
        """The trajectory when every planned sample of every DiT that ran was seen, with one call
        count per image."""
        if self.missing or not self.samples or not self.calls or len(set(self.calls)) != 1:
            return None
        seen = {s.component for s in self.samples}
        if len(self.samples) != len(self.plan) * len(seen):
            return None
        return Trajectory(self.samples, self.calls[0], images, self.steps, record_calls,
                          self.text_calls)


# --- cache -------------------------------------------------------------------------------------

_MEMORY: dict[str, Trajectory] = {}  # this process's trajectories, also those not serializable


def _key(loaded, spec) -> str:
    """The trajectory is the baseline's: keyed by the baseline's key and the sampling plan."""
    fields = dict(format=PROXY_FORMAT, baseline=baseline_key(loaded, spec),
                  plan=sample_plan(spec.steps, len(spec.items())))
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


def cache_dir(loaded, spec, cache_root: Path) -> Path:
    return cache_root / "proxy" / _key(loaded, spec)


class _Unserializable(Exception):
    pass


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.contiguous()
        return {"__tensor__": name}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise _Unserializable("dict with non-string keys")
        return {"__dict__": {k: _encode(v, tensors) for k, v in obj.items()}}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise _Unserializable(type(obj).__name__)


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        return {k: _decode(v, tensors) for k, v in obj["__dict__"].items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def _save(directory: Path, traj: Trajectory) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    try:
        samples = [dict(image=s.image, step=s.step, component=s.component,
                        args=_encode(s.args, tensors), kwargs=_encode(s.kwargs, tensors),
                        output=_encode(s.output, tensors))
                   for s in traj.samples]
        text_calls = [[_encode(a, tensors), _encode(k, tensors)] for a, k in traj.text_calls]
    except _Unserializable:
        return  # kept in memory for this process only
    # Tensors shared between samples (one text embedding per prompt) are stored once.
    unique: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in list(tensors.items()):
        first = unique.setdefault(id(tensor), name)
        if first != name:
            aliases[name] = first
            del tensors[name]
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        save_file(tensors, str(tmp / "trajectory.safetensors"))
        digest = hashlib.sha256((tmp / "trajectory.safetensors").read_bytes()).hexdigest()
        meta = dict(format=PROXY_FORMAT, calls_per_image=traj.calls_per_image, images=traj.images,
                    steps=traj.steps, record_calls=traj.record_calls, samples=samples,
                    text_calls=text_calls, aliases=aliases, sha256=digest)
        (tmp / "trajectory.json").write_text(json.dumps(meta))
        if directory.exists():
            shutil.rmtree(directory)
        os.rename(tmp, directory)
    except OSError:
        pass  # another process won the race, or the cache is read-only: nothing is lost
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(directory: Path) -> Trajectory | None:
    from safetensors.torch import load_file

    try:
        meta = json.loads((directory / "trajectory.json").read_text())
        path = directory / "trajectory.safetensors"
        if meta["format"] != PROXY_FORMAT or hashlib.sha256(path.read_bytes()).hexdigest() != meta["sha256"]:
            return None
        tensors = load_file(str(path))
        tensors.update({alias: tensors[name] for alias, name in meta["aliases"].items()})
        samples = [Sample(s["image"], s["step"], _decode(s["args"], tensors),
                          _decode(s["kwargs"], tensors), _decode(s["output"], tensors), s["component"])
                   for s in meta["samples"]]
        text_calls = [(_decode(a, tensors), _decode(k, tensors)) for a, k in meta["text_calls"]]
        return Trajectory(samples, int(meta["calls_per_image"]), int(meta["images"]),
                          int(meta["steps"]), int(meta.get("record_calls", 0)), text_calls)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cached_trajectory(loaded, spec, cache_root: Path) -> Trajectory | None:
    key = _key(loaded, spec)
    if key not in _MEMORY:
        traj = _load(cache_dir(loaded, spec, cache_root))
        if traj is not None:
            _MEMORY[key] = traj
    return _MEMORY.get(key)


@contextlib.contextmanager
def capture_trajectory(loaded, spec, cache_root: Path) -> Iterator[None]:
    """Record the trajectory from the BF16 generation of every image of ``spec`` inside the block
    (the baseline's, which is generated anyway, so recording costs only the copies).

    A no-op when already cached.  Nothing is kept unless every planned sample was seen.
    """
    if cached_trajectory(loaded, spec, cache_root) is not None:
        yield
        return
    recorder = _Recorder(loaded.pipe, loaded.dits, sample_plan(spec.steps, len(spec.items())),
                         spec.steps)
    recorder.attach()
    try:
        yield
    finally:
        recorder.detach()
    _store(loaded, spec, recorder.trajectory(len(spec.items())), cache_root)


def _store(loaded, spec, traj: Trajectory | None, cache_root: Path) -> None:
    if traj is not None:
        _MEMORY[_key(loaded, spec)] = traj
        _save(cache_dir(loaded, spec, cache_root), traj)


def record_trajectory(session) -> Trajectory:
    """The trajectory from the cache, or from generating the sampled prompts in BF16 now.

    The generation is counted as proxy cost (``record_calls``).  The engine is left in BF16.
    """
    spec = session.proxy_spec
    traj = cached_trajectory(session.loaded, spec, session.cache_root)
    if traj is not None:
        return traj
    plan = sample_plan(spec.steps, len(spec.items()))
    recorder = _Recorder(session.loaded.pipe, session.loaded.dits, plan, spec.steps)
    session.engine.apply(None)
    recorder.attach()
    try:
        for index, prompt, seed in spec.items():
            if any(image == index for image, _ in plan):
                generate_image(session.loaded, spec, prompt, seed)
    finally:
        recorder.detach()
    images = len(spec.items())
    generated = len({image for image, _ in plan})
    traj = recorder.trajectory(images)
    if traj is None:
        raise RuntimeError("could not record the DiT calls of the BF16 trajectory")
    traj.record_calls = traj.calls_per_image * generated
    _store(session.loaded, spec, traj, session.cache_root)
    return traj
