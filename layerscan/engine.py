"""Move one loaded pipeline between BF16 and any FP8 configuration in place.

Every W8A8 layer of every quantized component (the DiT, a second expert, the text encoder under
``vllm-omni``) is converted once: it keeps its BF16 weight next to the FP8 copy, so a switch
only flips per-layer flags and a search never reloads the pipeline.  Components quantized by
weight storage (the ``seed`` target's text encoder and VAE) are switched as a whole.
``ignored_layers=None`` means BF16 everywhere and reproduces BF16 outputs bit for bit.
"""

from __future__ import annotations

import atexit
import threading
from typing import Sequence

import torch
from torch import nn

from layerscan.clock import CLOCK, PREPARE, SWITCH
from layerscan.fp8 import (
    SCALE_BYTES,
    STORAGE_TYPES,
    Fp8Linear,
    SharedInput,
    apply_fp8_weight_storage,
    per_tensor_scale,
    remove_fp8_weight_storage,
)
from layerscan.configs import Ignored, normalize
from layerscan.layers import qualify, split_pattern
from layerscan.pipeline import SERVING_ELEMENT_SIZE, LoadedPipeline
from layerscan.profiles import STORAGE

RESIDENCIES = ("auto", "both", "requantize")
# Room left for activations, the other components' work and the allocator when deciding whether
# the BF16 and FP8 copies of the quantized layers fit side by side.
_HEADROOM_FRACTION = 0.25


class Fp8Engine:
    """Owns the FP8 state of one pipeline; ``apply`` is the only way to change it.

    ``residency``: ``both`` keeps BF16 and FP8 copies of every W8A8 weight on the device (a
    switch flips flags); ``requantize`` keeps only what the configuration needs and re-quantizes
    from a CPU master copy on switch; ``auto`` picks ``both`` when it fits.
    """

    def __init__(self, loaded: LoadedPipeline, activation_scheme: str = "token",
                 residency: str = "auto") -> None:
        if residency not in RESIDENCIES:
            raise ValueError(f"residency must be one of {RESIDENCIES}")
        self.loaded = loaded
        self.index = loaded.index
        self.activation_scheme = activation_scheme
        with CLOCK.phase(PREPARE, loaded.device):
            self._convert(loaded, activation_scheme)
        self._sizes = {attr: _param_sizes(module) for attr, module in loaded.components.items()}
        self.residency = self._choose_residency() if residency == "auto" else residency
        self.current: Ignored = None
        self._masters: MasterCopies | None = None  # requantize: the BF16 weights' CPU copies

    def _convert(self, loaded: LoadedPipeline, activation_scheme: str) -> None:
        self._layers: dict[str, list[Fp8Linear]] = {}  # qualified name -> shards
        self._storage: dict[str, nn.Module] = {}  # component -> module, for weight storage
        for component in self.index.components:
            module = loaded.components[component]
            if self.index.method(component) == STORAGE:
                self._storage[component] = module
                continue
            modules = dict(module.named_modules())
            for layer in self.index.of(component):
                shards = [modules[name] for name in layer.modules]
                scale = per_tensor_scale(*(m.weight for m in shards))
                shared = SharedInput(len(shards)) if len(shards) > 1 else None
                self._layers[layer.name] = [
                    Fp8Linear.convert(m, activation_scheme, scale, shared) for m in shards]

    def _choose_residency(self) -> str:
        device = self.loaded.device
        if device.type != "cuda":
            return "both"
        fp8_copies = sum(s.weight.numel() for shards in self._layers.values() for s in shards)
        free, total = torch.cuda.mem_get_info(device)
        # A process capped below the card (torch.cuda.set_per_process_memory_fraction) can use
        # only its share, whatever the card has free.
        index = device.index if device.index is not None else torch.cuda.current_device()
        fraction = getattr(torch.cuda.memory, "get_per_process_memory_fraction", lambda d: 1.0)(index)
        total = min(total, int(fraction * total))
        free = min(free, total - torch.cuda.memory_reserved(device))
        return "both" if fp8_copies < free - _HEADROOM_FRACTION * total else "requantize"

    def apply(self, ignored: Sequence[str] | None) -> Ignored:
        """Switch to a configuration; patterns must each select at least one layer."""
        config = normalize(ignored)
        if config:
            self.index.validate(config)
        device = self.loaded.device
        requantize = self.residency == "requantize"
        copied = self._masters is not None and self._masters.done
        if requantize and config is not None and not copied:
            self.start_master_copies()
            self.finish_master_copies()  # no BF16 weight is freed before its CPU copy exists
        # BF16 everywhere while every layer is BF16: nothing to switch, and the CPU copies
        # (which set_precision would make on the spot) can be made in the background instead.
        unchanged = requantize and config is None and self.current is None and not copied
        with CLOCK.phase(SWITCH, device):
            self._switch(config, layers=not unchanged)
        self.current = config
        return config

    def start_master_copies(self) -> None:
        """Start making the requantize residency's CPU copies of the BF16 weights in the
        background (idempotent; nothing to do for the ``both`` residency).

        Only beside an output no timing counts: measured on a full-size Qwen-Image (H100), the
        copies slowed the output they overlapped from 6 s to 29 s.  Sessions start them before
        a compiled pipeline's first output (which compiles its graphs: 30 s became 49 s) and
        ``finish_master_copies`` once it exists."""
        if self.residency == "requantize" and self._masters is None:
            self._masters = MasterCopies([m for shards in self._layers.values() for m in shards])

    def finish_master_copies(self) -> None:
        """Wait for copies started in the background, if any (what is left of them shows as
        preparation)."""
        if self._masters is not None and not self._masters.done:
            with CLOCK.phase(PREPARE, self.loaded.device):
                self._masters.wait()

    def _switch(self, config: Ignored, layers: bool = True) -> None:
        skipped = set() if config is None else self.index.skipped(config)
        keep_bf16 = self.residency == "both"
        for name, shards in self._layers.items():
            for module in shards if layers else ():
                module.set_precision(config is not None and name not in skipped, keep_bf16)
        for component, module in self._storage.items():
            if config is None or qualify(component, "") in skipped:
                remove_fp8_weight_storage(module)
            else:
                apply_fp8_weight_storage(module)

    def quantized_layers(self) -> list[str]:
        return [n for n, shards in self._layers.items() if shards[0].fp8_enabled]

    def weight_bytes(self, ignored: Sequence[str] | None) -> dict[str, int]:
        """Exact weight bytes per pipeline component as the engine would hold them for ``ignored``.

        Quantized layers: one byte per weight plus one float32 scale per (fused) layer; biases
        and everything else at the model dtype's size.  Computed from sizes recorded at load,
        so the answer does not depend on what is resident right now.
        """
        config = normalize(ignored)
        skipped = set() if config is None else self.index.skipped(config)
        fp8: dict[str, set[int]] = {attr: set() for attr in self._sizes}
        scales: dict[str, int] = {attr: 0 for attr in self._sizes}
        if config is not None:
            for name, shards in self._layers.items():
                if name not in skipped:
                    component = split_pattern(name)[0]
                    fp8[component].update(id(m.weight) for m in shards)
                    scales[component] += 1
            for component, module in self._storage.items():
                if qualify(component, "") not in skipped:
                    weights = {id(m.weight) for m in module.modules() if isinstance(m, STORAGE_TYPES)}
                    fp8[component] |= weights
                    scales[component] += len(weights)
        return {attr: _bytes(sizes, fp8[attr]) + scales[attr] * SCALE_BYTES
                for attr, sizes in self._sizes.items()}

    def bf16_kept_bytes(self, ignored: Sequence[str] | None) -> int:
        """Weight bytes this configuration keeps above FP8 everywhere (0 for BF16 itself)."""
        if ignored is None:
            return 0
        return sum(self.weight_bytes(ignored).values()) - sum(self.weight_bytes(()).values())


class MasterCopies:
    """CPU copies of the W8A8 layers' BF16 weights, made in the background.

    The requantize residency frees a layer's BF16 weight while it runs in FP8 and restores it
    from a CPU copy.  Copying 40 GB (a 20 B DiT) into page-locked memory took 41 s up front on a
    full-size Qwen-Image, and nothing needs the copies before the first FP8 configuration: a
    thread makes them on a stream of its own while the baseline's first output compiles its
    graphs on the weights they copy (which nothing writes meanwhile).  ``wait`` hands them to the
    layers; the engine calls it before any switch that could free a weight.

    A process leaving while the thread is inside CUDA calls would abort at interpreter shutdown,
    so every unfinished copier is stopped between layers and joined at exit (``_stop_all``).
    """

    def __init__(self, modules: list[Fp8Linear]) -> None:
        self.modules = modules
        self.copies: list[torch.Tensor] = []
        self.error: BaseException | None = None
        self.done = False
        self._stop = threading.Event()
        device = modules[0].weight.device if modules else torch.device("cpu")
        self._stream = None
        if device.type == "cuda":
            self._stream = torch.cuda.Stream(device)
            self._stream.wait_stream(torch.cuda.current_stream(device))  # the weights as they are now
        self._thread = threading.Thread(target=self._copy, name="layerscan-master-copies", daemon=True)
        _RUNNING.add(self)
        self._thread.start()

    def _copy(self) -> None:
        try:
            if self._stream is None:
                for module in self.modules:
                    if self._stop.is_set():
                        return
                    self.copies.append(module.weight.data.to("cpu", copy=True))
                return
            with torch.cuda.stream(self._stream):
                for module in self.modules:
                    if self._stop.is_set():
                        return
                    weight = module.weight.data
                    copy = torch.empty(weight.shape, dtype=weight.dtype, pin_memory=True)
                    copy.copy_(weight, non_blocking=True)
                    # Should the weight be freed before the copy ran, its memory waits for it.
                    weight.record_stream(self._stream)
                    self.copies.append(copy)
        except BaseException as exc:  # raised in the caller's thread by wait()
            self.error = exc

    def wait(self) -> None:
        self._thread.join()
        _RUNNING.discard(self)
        if self.error is not None:
            raise RuntimeError(f"could not keep CPU copies of the BF16 weights for the requantize "
                               f"residency: {self.error}") from self.error
        if self._stream is not None:
            self._stream.synchronize()
        for module, copy in zip(self.modules, self.copies):
            module.bf16_master = copy
        self.done = True

    def stop(self) -> None:
        """Stop after the layer being copied and let its copy land (at exit)."""
        self._stop.set()
        self._thread.join()
        if self._stream is not None:
            self._stream.synchronize()
        _RUNNING.discard(self)


_RUNNING: set[MasterCopies] = set()


@atexit.register
def _stop_all() -> None:
    for copier in list(_RUNNING):
        copier.stop()


def _param_sizes(module: nn.Module) -> dict[int, tuple[int, int]]:
    """(elements, bytes per element) of every parameter, taken while all are in their BF16 form;
    a parameter widened for this device's sake (the CPU's FP32 VAE decoder) counts as served."""
    return {id(p): (p.numel(), getattr(p, SERVING_ELEMENT_SIZE, p.element_size()))
            for p in module.parameters()}


def _bytes(sizes: dict[int, tuple[int, int]], fp8_param_ids: set[int]) -> int:
    """Total bytes with the given parameters counted at one byte per element."""
    return sum(n if pid in fp8_param_ids else n * size for pid, (n, size) in sizes.items())
