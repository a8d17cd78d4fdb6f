"""Cheap sensitivity proxies: replay recorded DiT calls instead of generating images.

A full evaluation generates every prompt (``steps`` DiT calls each, twice with true CFG) and
scores the images.  The proxies instead replay a few DiT calls of the BF16 denoising trajectory:

* the trajectory: while the BF16 reference row is generated, a forward pre-hook on the
  transformer records its inputs (positional and keyword: latents, timestep, text embeddings,
  masks, shapes: whatever the architecture takes) and a forward hook its output, for a handful
  of (prompt, step) samples spread over prompts and steps.  Nothing architecture-specific: the
  replay is ``transformer(*args, **kwargs)``.  Cached under ``$LAYERSCAN_CACHE/proxy/`` as
  safetensors plus JSON (no pickles), keyed by the evaluation settings.
* layer-local: one BF16 replay per sample with a hook on every quantizable Linear that also
  runs that layer in FP8 on the same input; the relative error ``|y8 - y|^2 / |y|^2`` of every
  layer at once, no error propagation.  Costs about two DiT calls per sample.
* end-to-end: the DiT with one configuration applied (e.g. everything FP8 but one group),
  replayed on the samples; the relative error of its output against the recorded BF16 output.
  One DiT call per sample and configuration.

Costs are counted in DiT calls and reported in full-evaluation equivalents: one full evaluation
is ``calls_per_image x images`` DiT calls (measured while recording, so true CFG counts double).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from layerscan.fp8 import fp8_linear, quantize_per_tensor
from layerscan.generate import default_cache_root, generate_image

PROXY_FORMAT = 1
MAX_SAMPLES = 8  # DiT calls per replay pass, at most
STEP_IMAGES_PER_SAMPLE = 8  # one sample per this many (step, image) pairs: about 1/16 of an evaluation with CFG
LAYER_LOCAL_CALLS = 2  # a BF16 call plus every quantizable layer once more in FP8


# --- sampling plan ---------------------------------------------------------------------------

def sample_plan(steps: int, images: int) -> list[tuple[int, int]]:
    """(image, step) of every recorded sample, spread over the prompts and over the schedule."""
    count = min(MAX_SAMPLES, max(1, steps * images // STEP_IMAGES_PER_SAMPLE))
    return [((k * images) // count, ((2 * k + 1) * steps) // (2 * count)) for k in range(count)]


@dataclass
class Sample:
    image: int
    step: int
    args: tuple
    kwargs: dict
    output: torch.Tensor  # the BF16 DiT output for these inputs


@dataclass
class Trajectory:
    """The recorded samples and what a full evaluation costs in DiT calls."""

    samples: list[Sample]
    calls_per_image: int
    images: int
    steps: int
    record_calls: int = 0  # DiT calls spent recording outside the BF16 reference row

    @property
    def full_evaluation_calls(self) -> int:
        return self.calls_per_image * self.images


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return _first_tensor(output[0])
    sample = getattr(output, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise TypeError(f"cannot find the DiT output tensor in {type(output).__name__}")


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``obj`` (a call argument: tensors nested in tuples, lists and dicts) with ``fn`` applied
    to every tensor."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_tensors(v, fn) for v in obj)
    if isinstance(obj, list):
        return [_map_tensors(v, fn) for v in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _copy(obj: Any, memo: dict[int, Any]) -> Any:
    """Detached CPU copy of a nested call argument; one copy per distinct tensor (memo)."""
    def copy(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in memo:
            memo[id(t)] = (t, t.detach().to("cpu", copy=True))
        return memo[id(t)][1]

    return _map_tensors(obj, copy)


class _Recorder:
    """Hooks that keep the planned DiT calls of a generation run.

    A new image starts at the first DiT call after any other component (text encoder, VAE)
    ran; each image's calls are buffered until it ends, then the planned steps are kept (the
    first call of a step: the conditional branch under true CFG).
    """

    def __init__(self, pipe, transformer: nn.Module, plan: list[tuple[int, int]], steps: int) -> None:
        self.transformer, self.plan, self.steps = transformer, plan, steps
        self.others = [m for name, m in getattr(pipe, "components", {}).items()
                       if isinstance(m, nn.Module) and m is not transformer]
        self.image = -1
        self.boundary = True
        self.buffer: list[list] = []
        self.memo: dict[int, Any] = {}
        self.samples: list[Sample] = []
        self.calls: list[int] = []
        self.handles: list = []

    def attach(self) -> None:
        self.handles.append(self.transformer.register_forward_pre_hook(self._pre, with_kwargs=True))
        self.handles.append(self.transformer.register_forward_hook(self._post))
        for module in self.others:
            for sub in (module, *module.children()):
                self.handles.append(sub.register_forward_pre_hook(self._other))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self._finish_image()

    def _other(self, module, args) -> None:
        self.boundary = True

    def _pre(self, module, args, kwargs) -> None:
        if self.boundary:
            self._finish_image()
            self.image += 1
            self.boundary = False
        self.buffer.append([_copy(args, self.memo), _copy(kwargs, self.memo), None])

    def _post(self, module, args, output) -> None:
        if self.buffer:
            self.buffer[-1][2] = _first_tensor(output).detach().to("cpu", copy=True)

    def _finish_image(self) -> None:
        if self.image < 0 or not self.buffer:
            return
        calls = len(self.buffer)
        self.calls.append(calls)
        for image, step in self.plan:
            if image == self.image:
                args, kwargs, output = self.buffer[(step * calls) // self.steps]
                if output is not None:
                    self.samples.append(Sample(image, step, args, kwargs, output))
        self.buffer, self.memo = [], {}

    def trajectory(self, images: int, record_calls: int = 0) -> Trajectory | None:
        """The trajectory when every planned sample was seen with one call count per image."""
        if len(self.samples) != len(self.plan) or not self.calls or len(set(self.calls)) != 1:
            return None
        return Trajectory(self.samples, self.calls[0], images, self.steps, record_calls)


# --- cache -------------------------------------------------------------------------------------

_MEMORY: dict[str, Trajectory] = {}  # this process's trajectories, also those not serializable


def _key(session) -> str:
    spec = session.spec
    fields = dict(format=PROXY_FORMAT, eval_key=session.eval_key,
                  plan=sample_plan(spec.steps, len(spec.items())))
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


def _cache_dir(session) -> Path:
    return default_cache_root() / "proxy" / _key(session)


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
        samples = [dict(image=s.image, step=s.step, args=_encode(s.args, tensors),
                        kwargs=_encode(s.kwargs, tensors), output=_encode(s.output, tensors))
                   for s in traj.samples]
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
                    aliases=aliases, sha256=digest)
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
                          _decode(s["kwargs"], tensors), _decode(s["output"], tensors))
                   for s in meta["samples"]]
        return Trajectory(samples, int(meta["calls_per_image"]), int(meta["images"]),
                          int(meta["steps"]), int(meta.get("record_calls", 0)))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cached_trajectory(session) -> Trajectory | None:
    key = _key(session)
    if key not in _MEMORY:
        traj = _load(_cache_dir(session))
        if traj is not None:
            _MEMORY[key] = traj
    return _MEMORY.get(key)


@contextlib.contextmanager
def capture_trajectory(session, enabled: bool = True) -> Iterator[None]:
    """Record the trajectory from whatever BF16 generation runs inside the block.

    A no-op when disabled or already cached.  Nothing is kept unless every planned sample was
    seen, so a block in which nothing is generated (the BF16 row was on record) records nothing.
    """
    if not enabled or cached_trajectory(session) is not None:
        yield
        return
    spec = session.spec
    recorder = _Recorder(session.loaded.pipe, session.loaded.transformer,
                         sample_plan(spec.steps, len(spec.items())), spec.steps)
    recorder.attach()
    try:
        yield
    finally:
        recorder.detach()
    _store(session, recorder.trajectory(len(spec.items())))


def _store(session, traj: Trajectory | None) -> None:
    if traj is not None:
        _MEMORY[_key(session)] = traj
        _save(_cache_dir(session), traj)


def record_trajectory(session) -> Trajectory:
    """The trajectory from the cache, or from generating the sampled prompts in BF16 now.

    The generation is counted as proxy cost (``record_calls``).  The engine is left in BF16.
    """
    traj = cached_trajectory(session)
    if traj is not None:
        return traj
    spec = session.spec
    plan = sample_plan(spec.steps, len(spec.items()))
    recorder = _Recorder(session.loaded.pipe, session.loaded.transformer, plan, spec.steps)
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
    _store(session, traj)
    return traj


# --- the proxies -------------------------------------------------------------------------------

@dataclass
class ProxyCost:
    """DiT calls the proxies used, and the wall time of those measured in this process."""

    calls: float = 0.0
    seconds: float = 0.0
    cached_calls: float = 0.0  # part of ``calls`` answered from the score cache

    def as_dict(self, full_evaluation_calls: int) -> dict:
        return dict(calls=self.calls, full_evaluations=self.calls / full_evaluation_calls,
                    seconds=round(self.seconds, 3), cached_calls=self.cached_calls)


def relative_error(error: float, reference: float) -> float:
    return error / reference if reference > 0 else (0.0 if error == 0 else math.inf)


class Proxies:
    """Layer-local and end-to-end proxies over one session's recorded trajectory.

    Scores are cached next to the trajectory, so a rerun answers them without DiT calls; the
    cost reported counts every score used, cached or not (``cached_calls`` says which part was
    not spent now).
    """

    def __init__(self, session) -> None:
        self.session = session
        self.trajectory = record_trajectory(session)
        self.cost = ProxyCost(calls=float(self.trajectory.record_calls))
        self._scores_path = _cache_dir(session) / "scores.json"
        self._scores = self._read_scores()
        self._all_bf16 = [g.pattern for g in session.loaded.index.groups("family")]

    @property
    def full_evaluation_calls(self) -> int:
        return self.trajectory.full_evaluation_calls

    def _read_scores(self) -> dict:
        try:
            data = json.loads(self._scores_path.read_text())
            if data.get("format") == PROXY_FORMAT:
                return data
        except (OSError, ValueError):
            pass
        return {"format": PROXY_FORMAT, "layer_local": None, "e2e": {}}

    def _write_scores(self) -> None:
        try:
            self._scores_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._scores_path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self._scores))
            os.replace(tmp, self._scores_path)
        except OSError:
            pass

    def _replay(self) -> list[torch.Tensor]:
        device = self.session.loaded.device
        transformer = self.session.loaded.transformer
        outputs = []
        with torch.inference_mode():
            for s in self.trajectory.samples:
                out = transformer(*_map_tensors(s.args, lambda t: t.to(device)),
                                  **_map_tensors(s.kwargs, lambda t: t.to(device)))
                outputs.append(_first_tensor(out))
        return outputs

    def layer_local(self) -> dict[str, float]:
        """Relative FP8 error of every quantizable layer, engine name -> error."""
        n = len(self.trajectory.samples)
        if self._scores["layer_local"] is not None:
            self.cost.calls += LAYER_LOCAL_CALLS * n
            self.cost.cached_calls += LAYER_LOCAL_CALLS * n
            return self._scores["layer_local"]
        start = time.perf_counter()
        loaded, scheme = self.session.loaded, self.session.engine.activation_scheme
        # Every DiT layer in BF16 through the public switch; text encoder and VAE stay as they
        # are (a DiT replay does not use them, and switching them is slow on large models).
        self.session.engine.apply(self._all_bf16)
        modules = dict(loaded.transformer.named_modules())
        sums: dict[str, list[float]] = {}
        handles = []

        def hook_for(name: str):
            acc = sums.setdefault(name, [0.0, 0.0])

            def hook(module, args, output) -> None:
                weight_fp8 = module.weight_fp8
                if weight_fp8.numel() != module.weight.numel():  # FP8 copy not resident
                    weight_fp8 = quantize_per_tensor(module.weight.data, module.weight_scale)[0]
                y8 = fp8_linear(args[0], weight_fp8, module.weight_scale, module.bias, scheme)
                ref = output.float()
                acc[0] += float((y8.float() - ref).pow(2).sum())
                acc[1] += float(ref.pow(2).sum())
            return hook

        try:
            for layer in loaded.index.layers:
                for module_name in layer.modules:
                    handles.append(modules[module_name].register_forward_hook(hook_for(layer.engine_name)))
            # Eagerly even when the DiT is compiled: dynamo does not guard on hooks added after
            # compilation, so compiled blocks would run their cached graphs without calling
            # these hooks and every layer would score 0.
            with torch.compiler.set_stance("force_eager"):
                self._replay()
        finally:
            for handle in handles:
                handle.remove()
        scores = {name: relative_error(e, r) for name, (e, r) in sums.items()}
        self._scores["layer_local"] = scores
        self._write_scores()
        self.cost.calls += LAYER_LOCAL_CALLS * n
        self.cost.seconds += time.perf_counter() - start
        return scores

    def end_to_end(self, kept: Sequence[str]) -> float:
        """Relative error of the DiT output with ``kept`` in BF16 and every other layer in FP8."""
        key = "|".join(sorted(kept))
        n = len(self.trajectory.samples)
        self.cost.calls += n
        if key in self._scores["e2e"]:
            self.cost.cached_calls += n
            return self._scores["e2e"][key]
        start = time.perf_counter()
        self.session.engine.apply(list(kept))
        error = reference = 0.0
        for out, s in zip(self._replay(), self.trajectory.samples):
            ref = s.output.to(out.device).float()
            error += float((out.float() - ref).pow(2).sum())
            reference += float(ref.pow(2).sum())
        value = relative_error(error, reference)
        self._scores["e2e"][key] = value
        self._write_scores()
        self.cost.seconds += time.perf_counter() - start
        return value

    def score(self, layers: Iterable[str]) -> float:
        """Layer-local score of a set of layers: the sum of their relative errors."""
        local = self.layer_local_cached()
        return math.fsum(local.get(name, 0.0) for name in layers)

    def layer_local_cached(self) -> dict[str, float]:
        return self._scores["layer_local"] if self._scores["layer_local"] is not None \
            else self.layer_local()

    def describe_cost(self) -> dict:
        traj = self.trajectory
        return dict(samples=len(traj.samples), calls_per_image=traj.calls_per_image,
                    images=traj.images, steps=traj.steps,
                    full_evaluation_calls=traj.full_evaluation_calls, record_calls=traj.record_calls,
                    **self.cost.as_dict(traj.full_evaluation_calls))


# --- rank correlation and the report section ---------------------------------------------------

def _ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (Pearson on average ranks); None below three points or
    when either side is constant."""
    if len(a) != len(b) or len(a) < 3:
        return None
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    return None if va == 0 or vb == 0 else cov / math.sqrt(va * vb)


@dataclass
class RankRow:
    pattern: str
    layer_local: float | None = None
    e2e: float | None = None
    full: float | None = None  # quality loss with this group alone in BF16 (complete records)
    ranks: dict = field(default_factory=dict)


def ranking_rows(entries: list[dict], records, criterion) -> list[RankRow]:
    """Proxy scores next to the full evaluation of each group alone in BF16, when on record.

    Every ranking sorts the most helpful group first: the largest layer-local error, the
    smallest end-to-end error with the group kept, the smallest quality loss with it kept.
    """
    full = {}
    for r in records:
        if r.config is not None and len(r.config) == 1 and r.status == "complete" \
                and criterion.metric in r.mean:
            full[r.config[0]] = criterion.loss(r.mean[criterion.metric])
    rows = [RankRow(e["pattern"], e.get("layer_local"), e.get("e2e"), full.get(e["pattern"]))
            for e in entries]
    for attr, sign in (("layer_local", -1.0), ("e2e", 1.0), ("full", 1.0)):
        known = [r for r in rows if getattr(r, attr) is not None]
        for row, rank in zip(known, _ranks([sign * getattr(r, attr) for r in known])):
            row.ranks[attr] = rank
    return rows


def correlations(rows: list[RankRow]) -> dict[str, float | None]:
    out = {}
    for proxy in ("layer_local", "e2e"):
        both = [r for r in rows if proxy in r.ranks and "full" in r.ranks]
        out[proxy] = spearman([r.ranks[proxy] for r in both], [r.ranks["full"] for r in both])
    return out


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def _rank(row: RankRow, attr: str) -> str:
    rank = row.ranks.get(attr)
    return "" if rank is None else f" ({rank:g})"


def report_section(notes: dict, records, criterion) -> list[str]:
    """Markdown lines: the proxy rankings, their rank correlation with full evaluations, costs."""
    proxy = notes.get("proxy")
    if not proxy:
        return []
    decisions = ["Decisions:", ""] + [f"- {line}" for line in proxy["log"]] + [""] if proxy.get("log") else []
    cost = proxy.get("cost")
    if cost is None:  # FP8 everywhere passed (or there were no groups): nothing to rank
        return ["## Proxy sensitivity", "", "No proxy was measured: with FP8 everywhere meeting the "
                "criterion there is no group to rank.", ""] + decisions
    out = ["## Proxy sensitivity", "",
           f"Strategy `auto` replayed {cost['samples']} recorded BF16 DiT call(s) (of "
           f"{cost['full_evaluation_calls']} per full evaluation: {cost['images']} image(s) × "
           f"{cost['calls_per_image']} calls) instead of generating images. Layer-local: relative "
           "FP8 error of every quantizable layer on its BF16 input (higher = more sensitive); "
           "end-to-end: relative DiT output error with that group alone in BF16 and the rest in "
           "FP8 (lower = keeping it helps more); full: "
           f"{criterion.metric} of the full evaluation with that group alone in BF16, where one is "
           "on record. Ranks in parentheses, most helpful first.", ""]
    for title, key in (("Groups", "groups"), ("Refinement cells", "cells")):
        entries = proxy.get(key) or []
        if not entries:
            continue
        rows = ranking_rows(entries, records, criterion)
        out += [f"**{title}**", "",
                f"| pattern | layer-local | end-to-end | full ({criterion.metric} mean) |",
                "|---|---|---|---|"]
        for row in rows:
            full = None if row.full is None else -row.full if criterion.loss(1.0) < 0 else row.full
            out.append(f"| `{row.pattern}` | {_num(row.layer_local)}{_rank(row, 'layer_local')} | "
                       f"{_num(row.e2e)}{_rank(row, 'e2e')} | {_num(full)}{_rank(row, 'full')} |")
        rho = correlations(rows)
        text = "; ".join(f"{name}: {'n/a (fewer than 3 groups with both)' if v is None else f'{v:+.2f}'}"
                         for name, v in (("layer-local", rho["layer_local"]), ("end-to-end", rho["e2e"])))
        out += ["", f"Spearman rank correlation with the full-evaluation ranking — {text}.", ""]
    out += [f"Proxy cost: {cost['calls']:g} DiT calls = **{cost['full_evaluations']:.3f} full-evaluation "
            f"equivalents** ({cost['seconds']:.1f} s measured now"
            + (f"; {cost['record_calls']:g} of the calls recorded the trajectory, the BF16 reference "
               "row being on record already" if cost.get("record_calls") else "")
            + (f"; {cost['cached_calls']:g} calls answered from the proxy cache" if cost["cached_calls"] else "")
            + ").", ""]
    return out + decisions


def evaluation_cost(records, images: int) -> dict:
    """Configurations evaluated and their cost in full evaluations (a stopped one counts the
    prompts it generated)."""
    fp8 = [r for r in records if r.config is not None]
    # A failed configuration also spent the prompt it failed on.
    generated = sum(min(images, len(r.per_prompt) + (r.status == "failed")) for r in fp8)
    return dict(configurations=len(fp8), stopped=sum(r.status == "stopped" for r in fp8),
                full_evaluations=generated / images if images else 0.0)
