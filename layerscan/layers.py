"""Which DiT layers the target engine quantizes, how they are named there, and how they group.

Everything user-facing speaks the engine's (vLLM-Omni's) names: ``attn.to_qkv`` rather than
diffusers' three ``to_q/to_k/to_v`` shards.  A group *is* a pattern: its layers are exactly the
layers that pattern selects under vLLM's substring rule, so what layerscan evaluates is what the
engine would do with the same ``ignored_layers`` list.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from torch import nn

from layerscan.errors import UserError

GRANULARITIES = ("family", "block", "module")

# diffusers' attention shard names and the fused layer vLLM builds from them.  Shards of one fused
# layer must share a precision (vLLM raises otherwise), so they travel as one layer here.
DIFFUSERS_TO_ENGINE = {
    "to_q": "to_qkv", "to_k": "to_qkv", "to_v": "to_qkv",
    "add_q_proj": "add_kv_proj", "add_k_proj": "add_kv_proj", "add_v_proj": "add_kv_proj",
}
# diffusers wraps the attention output projection in a ModuleList (to_out.0); vLLM does not.
_TO_OUT_INDEX = re.compile(r"\.to_out\.0$")
_BLOCK_PREFIX = re.compile(r"^((?:[A-Za-z_][\w]*\.)*?[A-Za-z_]\w*)\.(\d+)\.")


def is_layer_skipped(engine_name: str, patterns: Iterable[str]) -> bool:
    """vLLM's rule with substring matching on: skipped when any pattern occurs in the name."""
    return any(p in engine_name for p in patterns)


def engine_name(diffusers_name: str) -> str:
    """Map a diffusers module name to the name vLLM-Omni gives the (possibly fused) layer."""
    name = _TO_OUT_INDEX.sub(".to_out", diffusers_name)
    head, _, leaf = name.rpartition(".")
    fused = DIFFUSERS_TO_ENGINE.get(leaf)
    return f"{head}.{fused}" if fused and head else (fused or name)


def split_block(name: str) -> tuple[str, str] | None:
    """``transformer_blocks.7.img_mlp.net.2`` -> (``transformer_blocks.7.``, ``img_mlp.net.2``)."""
    m = _BLOCK_PREFIX.match(name)
    return (m.group(0), name[m.end():]) if m else None


def family_key(name: str) -> str | None:
    """The block-independent family of a layer: ``img_mlp``, ``to_qkv``, ``ff``, ``proj_out``."""
    parts = split_block(name)
    if parts is None:
        return None
    rest = parts[1].split(".")
    return rest[1] if rest[0] == "attn" and len(rest) > 1 else rest[0]


@dataclass(frozen=True)
class Profile:
    """What one engine does with one architecture.

    ``families`` lists the families the engine quantizes (None: every Linear inside repeated
    blocks, the default for architectures nobody has described yet).  The three booleans are the
    supported-models table's columns.
    """

    name: str
    transformer_classes: tuple[str, ...] = ()
    families: tuple[str, ...] | None = None
    dit_fp8: bool = True
    text_encoder_fp8: bool = False
    vae_fp8: bool = False
    display_name: str = ""

    def quantizes(self, diffusers_name: str) -> bool:
        family = family_key(engine_name(diffusers_name))
        return family is not None and (self.families is None or family in self.families)


PROFILES = (
    # vLLM-Omni builds these six families as vLLM parallel linears (img_mod/txt_mod, img_in,
    # txt_in, norm_out and the timestep embedder stay plain nn.Linear).  Some versions also build
    # proj_out as a vLLM linear; it is top-level, outside the blocks, and left out here.
    Profile("qwen-image", ("QwenImageTransformer2DModel",),
            ("to_qkv", "add_kv_proj", "to_out", "to_add_out", "img_mlp", "txt_mlp"),
            text_encoder_fp8=True, vae_fp8=True, display_name="Qwen-Image"),
    Profile("z-image", ("ZImageTransformer2DModel",), text_encoder_fp8=True, display_name="Z-Image"),
    Profile("flux", ("FluxTransformer2DModel",), display_name="Flux"),
    Profile("wan", ("WanTransformer3DModel",), display_name="Wan 2.2"),
)
DEFAULT_PROFILE = Profile("default")


def profile_for(transformer: nn.Module, name: str | None = None) -> Profile:
    """The profile named ``name``, else the one registered for the transformer's class."""
    if name:
        for profile in PROFILES + (DEFAULT_PROFILE,):
            if profile.name == name:
                return profile
        known = ", ".join(p.name for p in PROFILES + (DEFAULT_PROFILE,))
        raise UserError(f"unknown architecture profile {name!r}; known: {known}")
    cls = type(transformer).__name__
    return next((p for p in PROFILES if cls in p.transformer_classes), DEFAULT_PROFILE)


@dataclass(frozen=True)
class Layer:
    """One quantizable layer as the engine sees it; fused shards are one Layer."""

    engine_name: str
    modules: tuple[str, ...]  # the diffusers module names behind it
    shape: tuple[int, int]  # (out_features, in_features) of the fused layer
    params: int  # weights and biases


@dataclass(frozen=True)
class Group:
    pattern: str
    granularity: str
    layers: tuple[str, ...]  # engine names
    params: int


@dataclass
class LayerIndex:
    """The DiT's quantizable layers under one profile, and pattern resolution over them."""

    profile: Profile
    layers: list[Layer]
    total_params: int  # all DiT parameters, quantizable or not
    _by_name: dict[str, Layer] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_name = {layer.engine_name: layer for layer in self.layers}

    @classmethod
    def discover(cls, transformer: nn.Module, profile: Profile) -> "LayerIndex":
        fused: dict[str, list[tuple[str, nn.Linear]]] = {}
        for name, module in transformer.named_modules():
            if isinstance(module, nn.Linear) and profile.quantizes(name):
                fused.setdefault(engine_name(name), []).append((name, module))
        layers = []
        for ename, shards in fused.items():
            out_features = sum(m.out_features for _, m in shards)
            params = sum(sum(p.numel() for p in m.parameters(recurse=False)) for _, m in shards)
            layers.append(Layer(ename, tuple(n for n, _ in shards),
                                (out_features, shards[0][1].in_features), params))
        total = sum(p.numel() for p in transformer.parameters())
        return cls(profile, layers, total)

    @property
    def quantizable_params(self) -> int:
        return sum(layer.params for layer in self.layers)

    def match(self, pattern: str) -> list[Layer]:
        return [layer for layer in self.layers if pattern in layer.engine_name]

    def skipped(self, patterns: Sequence[str]) -> set[str]:
        """Engine names the engine would leave in BF16 for this ``ignored_layers`` list."""
        return {l.engine_name for l in self.layers if is_layer_skipped(l.engine_name, patterns)}

    def validate(self, patterns: Sequence[str]) -> None:
        """Raise a one-line UserError for the first pattern that selects no quantizable layer."""
        for pattern in patterns:
            if not pattern or not self.match(pattern):
                near = self.nearest(pattern)
                raise UserError(f"pattern {pattern!r} matches no quantizable layer; " + (
                    f"nearest: {', '.join(near)}" if near else "the families are: "
                    + ", ".join(g.pattern for g in self.groups("family"))))

    def nearest(self, pattern: str, n: int = 5) -> list[str]:
        candidates = sorted({p for g in ("family", "block") for p in
                             (grp.pattern for grp in self.groups(g))}
                            | set(self._by_name))
        return difflib.get_close_matches(pattern, candidates, n=n, cutoff=0.3)

    def groups(self, granularity: str) -> list[Group]:
        """Groups in model order.  Family patterns are chosen so they select exactly the family."""
        if granularity not in GRANULARITIES:
            raise UserError(f"granularity must be one of {', '.join(GRANULARITIES)}")
        members: dict[str, list[Layer]] = {}
        for layer in self.layers:
            if granularity == "module":
                key = layer.engine_name
            elif granularity == "block":
                key = split_block(layer.engine_name)[0]
            else:
                key = family_key(layer.engine_name)
            members.setdefault(key, []).append(layer)
        groups = []
        for key, layers in members.items():
            pattern = self._exact_pattern(key, {l.engine_name for l in layers})
            matched = self.match(pattern)
            groups.append(Group(pattern, granularity, tuple(l.engine_name for l in matched),
                                sum(l.params for l in matched)))
        return groups

    def _exact_pattern(self, key: str, wanted: set[str]) -> str:
        # "ff" would also select "ff_context"; a dot on either side pins the component down.
        # Where no substring is exact (Flux's "transformer_blocks.3." also occurs inside
        # "single_transformer_blocks.3."), the plain key is kept: the group then is what the
        # engine would skip for that pattern, which is the honest thing to evaluate.
        for candidate in (key, f"{key}.", f".{key}", f".{key}."):
            if {l.engine_name for l in self.match(candidate)} == wanted:
                return candidate
        return key
