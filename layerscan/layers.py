"""The quantizable layers of every quantized component, named as the engine names them, and
how they group.

A layer is identified by its *qualified name*: the engine's name inside its component, prefixed
by ``component:`` for every component but the DiT (``transformer_blocks.3.img_mlp.net.2``,
``text_encoder:layers.5.mlp.down_proj``, ``transformer_2:blocks.0.ffn.net_2``).  Patterns are
qualified the same way and select layers of their component by vLLM's substring rule; the empty
pattern selects the whole component (``text_encoder:``), which a per-component
``quantization_config`` writes as ``"text_encoder": None``.  A group *is* a pattern: its layers
are exactly what the pattern selects, so what layerscan evaluates is what the engine does with
the same list.  Components quantized by weight storage (the seed target's text encoder and VAE)
are one pseudo-layer each: they are kept in BF16 or not, as a whole.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Sequence

from torch import nn

from layerscan.errors import UserError
from layerscan.fp8 import STORAGE_TYPES
from layerscan.profiles import (
    STORAGE, W8A8, Component, Profile, cell_prefix, family_key, split_block,
)

GRANULARITIES = ("family", "block", "module")
TEXT_ENCODER_GRANULARITIES = GRANULARITIES + ("component",)
MAIN = "transformer"  # the component whose patterns are written without a prefix


def qualify(component: str, pattern: str) -> str:
    """``("text_encoder", "layers.3.")`` -> ``text_encoder:layers.3.``; the DiT's stay bare."""
    return pattern if component == MAIN and pattern else f"{component}:{pattern}"


def split_pattern(qualified: str) -> tuple[str, str]:
    """The component and the pattern inside it (bare patterns are the DiT's)."""
    if ":" in qualified:
        component, pattern = qualified.split(":", 1)
        return component, pattern
    return MAIN, qualified


@dataclass(frozen=True)
class Layer:
    """One quantizable layer as the engine sees it; fused shards are one Layer."""

    component: str
    engine_name: str  # "" for a component quantized as a whole (weight storage)
    modules: tuple[str, ...]  # the module names inside the component behind it
    shape: tuple[int, int]  # (out_features, in_features) of the fused layer; (0, 0) for storage
    params: int  # weights and biases

    @property
    def name(self) -> str:
        return qualify(self.component, self.engine_name)


@dataclass(frozen=True)
class Group:
    pattern: str  # qualified
    granularity: str
    layers: tuple[str, ...]  # qualified layer names
    params: int

    @property
    def component(self) -> str:
        return split_pattern(self.pattern)[0]


def discover_component(module: nn.Module, component: Component) -> list[Layer]:
    """The layers of one component: fused W8A8 Linears, or the whole component for storage."""
    if component.method == STORAGE:
        names = tuple(n for n, m in module.named_modules() if isinstance(m, STORAGE_TYPES))
        modules = dict(module.named_modules())
        params = sum(modules[n].weight.numel() for n in names)
        return [Layer(component.attr, "", names, (0, 0), params)] if names else []
    fused: dict[str, list[tuple[str, nn.Linear]]] = {}
    for name, sub in module.named_modules():
        if not isinstance(sub, nn.Linear):
            continue
        engine = component.naming.engine_name(name)
        if engine is not None and component.naming.quantizes(engine):
            fused.setdefault(engine, []).append((name, sub))
    layers = []
    for engine, shards in fused.items():
        out_features = sum(m.out_features for _, m in shards)
        params = sum(sum(p.numel() for p in m.parameters(recurse=False)) for _, m in shards)
        layers.append(Layer(component.attr, engine, tuple(n for n, _ in shards),
                            (out_features, shards[0][1].in_features), params))
    return layers


@dataclass
class LayerIndex:
    """Every quantizable layer of every quantized component, and pattern resolution over them."""

    profile: Profile
    layers: list[Layer]
    component_params: dict[str, int]  # all parameters of each quantized component
    _by_name: dict[str, Layer] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_name = {layer.name: layer for layer in self.layers}

    @classmethod
    def discover(cls, modules: dict[str, nn.Module], profile: Profile) -> "LayerIndex":
        """``modules``: the pipeline's components by attribute (at least the DiT)."""
        layers: list[Layer] = []
        params: dict[str, int] = {}
        for component in profile.components:
            module = modules.get(component.attr)
            if module is None:
                continue
            layers += discover_component(module, component)
            params[component.attr] = sum(p.numel() for p in module.parameters())
        return cls(profile, layers, params)

    # --- facts --------------------------------------------------------------------------------

    @property
    def components(self) -> list[str]:
        """Quantized components that have layers, in profile order (the DiT first)."""
        present = {layer.component for layer in self.layers}
        return [c.attr for c in self.profile.components if c.attr in present]

    def method(self, component: str) -> str:
        found = self.profile.component(component)
        return found.method if found else W8A8

    def layer(self, name: str) -> Layer:
        return self._by_name[name]

    def of(self, component: str) -> list[Layer]:
        return [layer for layer in self.layers if layer.component == component]

    @property
    def total_params(self) -> int:
        """Parameters of the DiT (quantizable or not): what the layers table shares refer to."""
        return self.component_params.get(MAIN, 0)

    @property
    def quantizable_params(self) -> int:
        return sum(layer.params for layer in self.layers if layer.component == MAIN)

    # --- patterns -----------------------------------------------------------------------------

    def match(self, pattern: str) -> list[Layer]:
        component, inner = split_pattern(pattern)
        return [l for l in self.layers if l.component == component and inner in l.engine_name]

    def skipped(self, patterns: Sequence[str]) -> set[str]:
        """Qualified names of the layers the engine leaves in BF16 for these patterns."""
        return {layer.name for p in patterns for layer in self.match(p)}

    def validate(self, patterns: Sequence[str]) -> None:
        """Raise a one-line UserError for the first pattern that selects no quantizable layer."""
        for pattern in patterns:
            component, inner = split_pattern(pattern)
            if component not in self.components:
                raise UserError(f"pattern {pattern!r} names component {component!r}, which this "
                                f"profile does not quantize (quantized: {', '.join(self.components)})")
            if (not inner and component == MAIN and ":" not in pattern) or not self.match(pattern):
                near = self.nearest(pattern)
                raise UserError(f"pattern {pattern!r} matches no quantizable layer; " + (
                    f"nearest: {', '.join(near)}" if near else "the families are: "
                    + ", ".join(g.pattern for g in self.groups("family"))))

    def nearest(self, pattern: str, n: int = 5) -> list[str]:
        candidates = sorted({grp.pattern for g in GRANULARITIES for grp in self.groups(g)}
                            | set(self._by_name))
        return difflib.get_close_matches(pattern, candidates, n=n, cutoff=0.3)

    # --- groups -------------------------------------------------------------------------------

    def groups(self, granularity: str, text_encoder_granularity: str | None = None) -> list[Group]:
        """Groups in profile order, each component in model order.

        The DiT (and a second expert) is grouped at ``granularity``; the text encoder at
        ``text_encoder_granularity`` (default: the same); a component stored in FP8 as a whole
        is one group.  Family patterns are chosen so they select exactly the family.
        """
        if granularity not in GRANULARITIES:
            raise UserError(f"granularity must be one of {', '.join(GRANULARITIES)}")
        te = text_encoder_granularity or granularity
        if te not in TEXT_ENCODER_GRANULARITIES:
            raise UserError(f"text-encoder granularity must be one of {', '.join(TEXT_ENCODER_GRANULARITIES)}")
        groups: list[Group] = []
        for component in self.components:
            level = te if component == "text_encoder" else granularity
            if self.method(component) == STORAGE or level == "component":
                groups.append(self.group(qualify(component, ""), "component"))
                continue
            members: dict[str, list[Layer]] = {}
            for layer in self.of(component):
                if level == "module":
                    key = layer.engine_name
                elif level == "block":
                    key = split_block(layer.engine_name)[0]
                else:
                    key = family_key(layer.engine_name)
                members.setdefault(key, []).append(layer)
            for key, layers in members.items():
                pattern = self.exact_pattern(component, key, {l.name for l in layers})
                groups.append(self.group(pattern, level))
        return groups

    def group(self, pattern: str, granularity: str) -> Group:
        matched = self.match(pattern)
        return Group(pattern, granularity, tuple(l.name for l in matched), sum(l.params for l in matched))

    def exact_pattern(self, component: str, key: str, wanted: set[str]) -> str:
        """The first spelling of ``key`` that selects exactly ``wanted`` in its component.

        "ff" would also select "ff_context"; a dot on either side pins the family down.  Where no
        substring is exact (Flux's "transformer_blocks.3." also occurs inside
        "single_transformer_blocks.3."), the plain key is kept: the group then is what the engine
        would skip for that pattern, which is the honest thing to evaluate.
        """
        for candidate in (key, f"{key}.", f".{key}", f".{key}."):
            pattern = qualify(component, candidate)
            if {l.name for l in self.match(pattern)} == wanted:
                return pattern
        return qualify(component, key)

    def cells(self, group: Group) -> list[Group]:
        """The cells of ``group`` (one family inside one block) in model order; a single cell
        means the group cannot be refined."""
        members: dict[str, set[str]] = {}
        for name in group.layers:
            layer = self.layer(name)
            members.setdefault(cell_prefix(layer.engine_name) or layer.engine_name, set()).add(name)
        return [self.group(self.exact_pattern(group.component, base, names), "cell")
                for base, names in members.items()]

    def cell_patterns(self) -> list[str]:
        """Every cell's exact pattern, over all W8A8 components."""
        out = []
        for component in self.components:
            if self.method(component) == STORAGE:
                continue
            members: dict[str, set[str]] = {}
            for layer in self.of(component):
                prefix = cell_prefix(layer.engine_name)
                if prefix:
                    members.setdefault(prefix, set()).add(layer.name)
            out += [self.exact_pattern(component, base, names) for base, names in members.items()]
        return out
