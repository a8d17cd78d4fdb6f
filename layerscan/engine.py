"""Move one loaded pipeline between BF16 and any FP8 ``ignored_layers`` configuration in place.

The DiT is quantized once (every quantizable layer gets its FP8 copy next to the BF16 weight);
after that a switch only flips per-layer flags, so a search never reloads the pipeline.
``ignored_layers=None`` means BF16 everywhere and reproduces BF16 outputs bit for bit.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from layerscan.fp8 import (
    SCALE_BYTES,
    STORAGE_TYPES,
    Fp8Linear,
    SharedInput,
    apply_fp8_weight_storage,
    per_tensor_scale,
    remove_fp8_weight_storage,
)
from layerscan.pipeline import LoadedPipeline

Ignored = tuple[str, ...] | None  # None: the BF16 baseline


def normalize(ignored: Sequence[str] | None) -> Ignored:
    """Canonical form of a configuration: sorted, deduplicated patterns (None stays BF16)."""
    return None if ignored is None else tuple(sorted(set(ignored)))


def describe(ignored: Ignored) -> str:
    if ignored is None:
        return "BF16"
    return "FP8 all" if not ignored else "FP8, BF16 kept: " + ", ".join(ignored)


RESIDENCIES = ("auto", "both", "requantize")
# Room left for activations, the text encoder's and VAE's work and the allocator when deciding
# whether the BF16 and FP8 copies of the DiT fit side by side.
_HEADROOM_FRACTION = 0.25


class Fp8Engine:
    """Owns the FP8 state of one pipeline; ``apply`` is the only way to change it.

    ``residency``: ``both`` keeps BF16 and FP8 copies of every quantizable DiT weight on the
    device (a switch flips flags); ``requantize`` keeps only what the configuration needs and
    re-quantizes from a CPU master copy on switch; ``auto`` picks ``both`` when it fits.
    """

    def __init__(self, loaded: LoadedPipeline, activation_scheme: str = "token",
                 residency: str = "auto") -> None:
        if residency not in RESIDENCIES:
            raise ValueError(f"residency must be one of {RESIDENCIES}")
        self.loaded = loaded
        self.activation_scheme = activation_scheme
        modules = dict(loaded.transformer.named_modules())
        self._layers: dict[str, list[Fp8Linear]] = {}
        for layer in loaded.index.layers:
            shards = [modules[name] for name in layer.modules]
            scale = per_tensor_scale(*(m.weight for m in shards))
            shared = SharedInput(len(shards)) if len(shards) > 1 else None
            self._layers[layer.engine_name] = [
                Fp8Linear.convert(m, activation_scheme, scale, shared) for m in shards
            ]
        self._sizes = {"transformer": _param_sizes(loaded.transformer)}
        self._sizes.update({attr: _param_sizes(c) for attr, c in self._components()})
        self.residency = self._choose_residency() if residency == "auto" else residency
        self.current: Ignored = None

    def _choose_residency(self) -> str:
        device = self.loaded.device
        if device.type != "cuda":
            return "both"
        fp8_copies = sum(s.weight.numel() for shards in self._layers.values() for s in shards)
        free, total = torch.cuda.mem_get_info(device)
        return "both" if fp8_copies < free - _HEADROOM_FRACTION * total else "requantize"

    def _storage_components(self) -> list[nn.Module]:
        profile = self.loaded.profile
        components = list(self.loaded.text_encoders.values()) if profile.text_encoder_fp8 else []
        if profile.vae_fp8 and self.loaded.vae is not None:
            components.append(self.loaded.vae)
        return components

    def apply(self, ignored: Sequence[str] | None) -> Ignored:
        """Switch to a configuration; patterns must each select at least one layer."""
        config = normalize(ignored)
        if config:
            self.loaded.index.validate(config)
        skipped = set() if config is None else self.loaded.index.skipped(config)
        keep_bf16 = self.residency == "both"
        for name, shards in self._layers.items():
            for module in shards:
                module.set_precision(config is not None and name not in skipped, keep_bf16)
        for component in self._storage_components():
            if config is None:
                remove_fp8_weight_storage(component)
            else:
                apply_fp8_weight_storage(component)
        self.current = config
        return config

    def quantized_layers(self) -> list[str]:
        return [n for n, shards in self._layers.items() if shards[0].fp8_enabled]

    def weight_bytes(self, ignored: Sequence[str] | None) -> dict[str, int]:
        """Exact weight bytes per component as the engine would hold them for ``ignored``.

        Quantized layers: one byte per weight plus one float32 scale per (fused) layer; biases
        and everything else at the model dtype's size.  Computed from sizes recorded at load,
        so the answer does not depend on what is resident right now.
        """
        config = normalize(ignored)
        skipped = set() if config is None else self.loaded.index.skipped(config)
        fp8_params: set[int] = set()
        scales = 0
        if config is not None:
            for name, shards in self._layers.items():
                if name not in skipped:
                    fp8_params.update(id(m.weight) for m in shards)
                    scales += 1
        result = {"transformer": _bytes(self._sizes["transformer"], fp8_params)
                  + scales * SCALE_BYTES}
        storage = self._storage_components() if config is not None else []
        for attr, component in self._components():
            if component in storage:
                weights = {id(m.weight) for m in component.modules() if isinstance(m, STORAGE_TYPES)}
                result[attr] = _bytes(self._sizes[attr], weights) + len(weights) * SCALE_BYTES
            else:
                result[attr] = _bytes(self._sizes[attr], set())
        return result

    def _components(self) -> list[tuple[str, nn.Module]]:
        vae = [("vae", self.loaded.vae)] if self.loaded.vae is not None else []
        return [*self.loaded.text_encoders.items(), *vae]


def _param_sizes(module: nn.Module) -> dict[int, tuple[int, int]]:
    """(elements, bytes per element) of every parameter, taken while all are in their BF16 form."""
    return {id(p): (p.numel(), p.element_size()) for p in module.parameters()}


def _bytes(sizes: dict[int, tuple[int, int]], fp8_param_ids: set[int]) -> int:
    """Total bytes with the given parameters counted at one byte per element."""
    return sum(n if pid in fp8_param_ids else n * size for pid, (n, size) in sizes.items())
