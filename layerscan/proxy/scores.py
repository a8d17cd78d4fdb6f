"""The proxies over a recorded trajectory: layer-local and end-to-end FP8 error of the DiT."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from layerscan.clock import CLOCK, PROXIES
from layerscan.fp8 import fp8_linear, quantize_per_tensor
from layerscan.layers import qualify
from layerscan.profiles import W8A8
from layerscan.proxy.capture import (
    PROXY_FORMAT, cache_dir, first_tensor, map_tensors, record_trajectory,
)

LAYER_LOCAL_CALLS = 2  # a BF16 call plus every quantizable layer once more in FP8


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
        with CLOCK.phase(PROXIES, session.loaded.device):
            self.trajectory = record_trajectory(session)
        self.cost = ProxyCost(calls=float(self.trajectory.record_calls))
        self._scores_path = cache_dir(session.loaded, session.proxy_spec, session.cache_root) / f"scores-{session.eval_key}.json"
        self._scores = self._read_scores()

    @property
    def full_evaluation_calls(self) -> int:
        """DiT calls of one full evaluation: the recorded setting's, and under a settings matrix
        every setting's (calls scale with steps; a larger setting's calls cost more, which a
        count of calls does not say)."""
        parts = self.session.spec.parts()
        return round(self.trajectory.full_evaluation_calls * sum(p.steps for p in parts) / parts[0].steps)

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

    def dit_components(self) -> list[str]:
        """The quantized W8A8 DiTs with recorded samples: the DiT, and Wan 2.2's second expert."""
        index = self.session.loaded.index
        return [c for c in self.trajectory.components
                if c in index.components and index.method(c) == W8A8]

    def _samples(self, components: Sequence[str] | None) -> list:
        chosen = self.dit_components() if components is None else components
        return [s for s in self.trajectory.samples if s.component in chosen]

    def _replay(self, samples: list) -> list[torch.Tensor]:
        """Each sample's DiT called on its recorded inputs, in the engine's current state."""
        device = self.session.loaded.device
        dits = self.session.loaded.dits
        outputs = []
        with torch.inference_mode():
            for s in samples:
                out = dits[s.component](*map_tensors(s.args, lambda t: t.to(device)),
                                        **map_tensors(s.kwargs, lambda t: t.to(device)))
                outputs.append(first_tensor(out))
        return outputs

    def layer_local(self) -> dict[str, float]:
        """Relative FP8 error of every quantizable W8A8 layer, qualified name -> error.

        DiT layers from replaying each DiT's recorded calls (both experts of Wan 2.2, each on
        its own samples), text-encoder layers from replaying the recorded text-encoder calls;
        each on its own BF16 input, all at once.  DiT and text encoder are not on one scale
        (their errors reach the picture through different paths): strategies compare scores
        within a component.
        """
        n = len(self._samples(None))
        if self._scores["layer_local"] is not None:
            self.cost.calls += LAYER_LOCAL_CALLS * n
            self.cost.cached_calls += LAYER_LOCAL_CALLS * n
            return self._scores["layer_local"]
        start = time.perf_counter()
        loaded = self.session.loaded
        with CLOCK.phase(PROXIES, loaded.device):
            # Everything in BF16 through the public switch: each layer sees its BF16 input.
            self.session.engine.apply([qualify(c, "") for c in loaded.index.components])
            scores = {}
            for component in self.dit_components():
                samples = self._samples([component])
                scores.update(self._measure(component, lambda: self._replay(samples)))
            if "text_encoder" in loaded.index.components and loaded.index.method("text_encoder") == W8A8 \
                    and self.trajectory.text_calls:
                scores.update(self._measure("text_encoder", self._replay_text_encoder))
        self._scores["layer_local"] = scores
        self._write_scores()
        self.cost.calls += LAYER_LOCAL_CALLS * n
        self.cost.seconds += time.perf_counter() - start
        return scores

    def _replay_text_encoder(self) -> None:
        device = self.session.loaded.device
        text_encoder = self.session.loaded.components["text_encoder"]
        with torch.inference_mode():
            for args, kwargs in self.trajectory.text_calls:
                text_encoder(*map_tensors(args, lambda t: t.to(device)),
                             **map_tensors(kwargs, lambda t: t.to(device)))

    def _measure(self, component: str, replay) -> dict[str, float]:
        """Layer-local errors of one component's layers while ``replay`` runs it in BF16."""
        loaded, scheme = self.session.loaded, self.session.engine.activation_scheme
        modules = dict(loaded.components[component].named_modules())
        # Squared error and squared reference per layer, summed on the device: reading each
        # back per call would stall the GPU twice per layer and sample.
        sums: dict[str, list] = {}
        handles = []

        def hook_for(name: str):
            acc = sums.setdefault(name, [0.0, 0.0])

            def hook(module, args, output) -> None:
                weight_fp8 = module.weight_fp8
                if weight_fp8.numel() != module.weight.numel():  # FP8 copy not resident
                    weight_fp8 = quantize_per_tensor(module.weight.data, module.weight_scale)[0]
                y8 = fp8_linear(args[0], weight_fp8, module.weight_scale, module.bias, scheme)
                ref = output.float()
                acc[0] = acc[0] + (y8.float() - ref).pow(2).sum().double()
                acc[1] = acc[1] + ref.pow(2).sum().double()
            return hook

        try:
            for layer in loaded.index.of(component):
                for module_name in layer.modules:
                    handles.append(modules[module_name].register_forward_hook(hook_for(layer.name)))
            # Eagerly even when the DiT is compiled: dynamo does not guard on hooks added after
            # compilation, so compiled blocks would run their cached graphs without calling
            # these hooks and every layer would score 0.
            with torch.compiler.set_stance("force_eager"):
                replay()
        finally:
            for handle in handles:
                handle.remove()
        return {name: relative_error(float(e), float(r)) for name, (e, r) in sums.items()}

    def end_to_end(self, kept: Sequence[str], components: Sequence[str] | None = None) -> float:
        """Relative error of the DiT output with ``kept`` in BF16 and every other layer in FP8,
        over the samples of ``components`` (default: every quantized DiT's).  Ranking one expert's
        groups, the samples of that expert alone: the other expert's error would only dilute."""
        samples = self._samples(components)
        key = "|".join(sorted(kept)) + ("" if components is None else "@" + ",".join(sorted(components)))
        n = len(samples)
        self.cost.calls += n
        if key in self._scores["e2e"]:
            self.cost.cached_calls += n
            return self._scores["e2e"][key]
        start = time.perf_counter()
        with CLOCK.phase(PROXIES, self.session.loaded.device):
            self.session.engine.apply(list(kept))
            error = reference = 0.0
            for out, s in zip(self._replay(samples), samples):
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
                    full_evaluation_calls=self.full_evaluation_calls, record_calls=traj.record_calls,
                    **self.cost.as_dict(self.full_evaluation_calls))
