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


class Fp8Engine:
    """Owns the FP8 state of one pipeline; ``apply`` is the only way to change it."""

    def __init__(self, loaded: LoadedPipeline, activation_scheme: str = "token") -> None:
        self.loaded = loaded
        self.activation_scheme = activation_scheme
        modules = dict(loaded.transformer.named_modules())
        self._layers: dict[str, list[Fp8Linear]] = {}
        for layer in loaded.index.layers:
            shards = [modules[name] for name in layer.modules]
            scale = per_tensor_scale(*(m.weight for m in shards))
            self._layers[layer.engine_name] = [
                Fp8Linear.convert(m, activation_scheme, scale) for m in shards
            ]
        self.current: Ignored = None

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
        for name, shards in self._layers.items():
            for module in shards:
                module.fp8_enabled = config is not None and name not in skipped
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
        and everything else at the model dtype's size.
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
        result = {"transformer": _bytes(self.loaded.transformer, fp8_params) + scales * SCALE_BYTES}
        storage = self._storage_components() if config is not None else []
        for attr, component in [*self.loaded.text_encoders.items(), ("vae", self.loaded.vae)]:
            if component is None:
                continue
            if component in storage:
                weights = {id(m.weight) for m in component.modules() if isinstance(m, STORAGE_TYPES)}
                result[attr] = _bytes(component, weights) + len(weights) * SCALE_BYTES
            else:
                result[attr] = _bytes(component, set())
        return result


def _bytes(module: nn.Module, fp8_param_ids: set[int]) -> int:
    """Bytes of ``module``'s parameters with the given ones counted at one byte per element."""
    total = 0
    for p in module.parameters():
        if id(p) in fp8_param_ids:
            total += p.numel()
        else:
            # A weight currently at rest in FP8 still counts at its compute dtype when unquantized.
            dtype = getattr(module, "_layerscan_compute_dtype", None) or p.dtype
            total += p.numel() * (torch.empty((), dtype=dtype).element_size()
                                  if p.dtype == torch.float8_e4m3fn else p.element_size())
    return total
