"""What each target release of the serving engine does with each architecture: which components
it quantizes, how, under which names, how it matches ``ignored_layers`` and which
``quantization_config`` forms its pipelines load.

A *target* (``TARGETS``) is a release whose code decides, named as it is installed:

* ``vllm-omni==0.30.0`` (the default; ``vllm-omni`` means the newest target layerscan knows) is
  ``Omni(model=..., quantization="fp8")`` in vLLM-Omni 0.30.0 with vLLM 0.30.0: DiT Linears W8A8
  online (vLLM parallel linears); the text encoder's Linears W8A8 only where the pipeline builds
  them as vLLM layers under the quant config (Z-Image's causal LM; Qwen-Image loads its
  Qwen2.5-VL with plain ``nn.Linear`` and never quantizes it); the VAE untouched.  vLLM's
  ``Fp8Config`` matches ``ignored_layers`` against each layer's full prefix *exactly*, so
  outputs list full names.  A per-component map loads only where the pipeline looks it up by
  component name (Wan 2.2); elsewhere vLLM-Omni matches the map's keys against layer prefixes
  and vLLM refuses to build (Z-Image, FLUX.1), so only the flat form is offered there.
* ``seed`` is the design of the seed guide (and of vLLM-Omni's early FP8 PRs): DiT W8A8, text
  encoder and VAE with FP8 *weight storage* (dequantized in forward hooks), patterns matched as
  substrings, one config per component.

What is written here about a release is checked against that release's own code by
``layerscan.target_check`` (tests/test_target_contract.py builds vLLM-Omni's pipelines on the
CPU and compares, layer by layer).  Names are vLLM-Omni's: Qwen-Image fuses ``to_q/k/v`` into
``attn.to_qkv`` and ``add_q/k/v_proj`` into ``attn.add_kv_proj`` and keeps ``attn.to_out.0``;
Z-Image fuses ``attention.to_q/k/v`` into ``attention.to_qkv`` and ``feed_forward.w1/w3`` into
``feed_forward.w13``; FLUX.1 quantizes only its single-stream blocks; Wan 2.2 fuses the
self-attention ``attn1.to_q/k/v`` into ``attn1.to_qkv``, keeps the cross-attention
``attn2.to_q/k/v`` apart, drops ``to_out``'s ``.0`` and writes the FFN as ``ffn.net_0.proj`` /
``ffn.net_2``; its second expert ``transformer_2`` uses the same names.  Text encoders keep their
Hugging Face names relative to the module vLLM-Omni quantizes (``model.layers.N...`` for
Z-Image's causal LM), every Linear on its own (no q/k/v fusion).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from layerscan.errors import UserError

W8A8 = "w8a8"  # weights and activations in FP8 through FP8 GEMMs (vLLM linear layers)
STORAGE = "storage"  # weights stored in FP8, dequantized to BF16 for compute (seed guide hooks)
MATCH_MODES = ("exact", "substring")

# Sub-module names that only contain the layer that names a family: ``attn.to_qkv`` is the
# ``to_qkv`` family, ``mlp.down_proj`` the ``down_proj`` family, ``img_mlp.net.2`` is ``img_mlp``.
CONTAINERS = frozenset({"attn", "attention", "self_attn", "mlp", "feed_forward"})


@dataclass(frozen=True)
class Target:
    """A release whose code decides what layerscan's answers mean (see the module docstring)."""

    name: str  # as outputs write it and --target takes it: "vllm-omni==0.30.0", "seed"
    match: str  # how ignored_layers are matched: "exact" or "substring"
    header: str  # the docs table header its rows use (layerscan.report.table.HEADERS)
    package: str | None = None  # the distribution whose installed code decides, if any
    version: str | None = None
    # Architectures whose pipeline looks a per-component map up by component name; elsewhere a
    # map's keys are matched against layer prefixes, which fails to load.  None: every one.
    per_component_routing: frozenset[str] | None = frozenset()
    # Layers the target quantizes that the pipeline never runs, by architecture and component,
    # with the reason: they cost nothing in quality and are not search dimensions.
    unused_layers: tuple[tuple[str, str, str, str], ...] = ()

    def routes_per_component(self, architecture: str) -> bool:
        return self.per_component_routing is None or architecture in self.per_component_routing


@dataclass(frozen=True)
class Naming:
    """How one component's Linears are named by the engine and which of them it quantizes.

    ``scope``: only modules under this Hugging Face prefix are candidates (and it is stripped);
    ``rules``: regex substitutions from the (scoped) diffusers/transformers name to the engine's,
    applied in order; shards that map to one name are one fused layer.  ``families``: the
    families the engine quantizes (None: every Linear inside repeated blocks).  ``block_roots``:
    when given, only blocks under these roots (``single_transformer_blocks``) are quantized.
    """

    scope: str = ""
    rules: tuple[tuple[str, str], ...] = ()
    families: tuple[str, ...] | None = None
    block_roots: tuple[str, ...] | None = None

    def engine_name(self, name: str) -> str | None:
        """The engine's name for a module, or None when it is outside ``scope``."""
        if not name.startswith(self.scope):
            return None
        name = name[len(self.scope):]
        for pattern, replacement in self.rules:
            name = re.sub(pattern, replacement, name)
        return name

    def quantizes(self, engine_name: str) -> bool:
        parts = split_block(engine_name)
        if parts is None:
            return False
        if self.block_roots is not None and parts[0].split(".")[-3] not in self.block_roots:
            return False
        family = family_key(engine_name)
        return family is not None and (self.families is None or family in self.families)


_BLOCK_PREFIX = re.compile(r"^((?:[A-Za-z_][\w]*\.)*?[A-Za-z_]\w*)\.(\d+)\.")


def split_block(name: str) -> tuple[str, str] | None:
    """``transformer_blocks.7.img_mlp.net.2`` -> (``transformer_blocks.7.``, ``img_mlp.net.2``)."""
    m = _BLOCK_PREFIX.match(name)
    return (m.group(0), name[m.end():]) if m else None


def family_key(name: str) -> str | None:
    """The block-independent family of a layer: ``img_mlp``, ``to_qkv``, ``down_proj``, ``ffn``."""
    parts = split_block(name)
    if parts is None:
        return None
    rest = parts[1].split(".")
    head = 0
    while head < len(rest) - 1 and rest[head] in CONTAINERS:
        head += 1
    return rest[head]


def cell_prefix(name: str) -> str | None:
    """The family inside its block: ``transformer_blocks.1.img_mlp.net.0.proj`` ->
    ``transformer_blocks.1.img_mlp``, ``layers.3.mlp.down_proj`` -> itself."""
    parts = split_block(name)
    if parts is None:
        return None
    rest = parts[1].split(".")
    head = 0
    while head < len(rest) - 1 and rest[head] in CONTAINERS:
        head += 1
    return parts[0] + ".".join(rest[:head + 1])


@dataclass(frozen=True)
class Component:
    """One pipeline component the engine quantizes, and how (``W8A8`` or ``STORAGE``)."""

    attr: str  # pipeline attribute and the key of the per-component quantization_config
    method: str
    naming: Naming = field(default_factory=Naming)
    label: str = ""  # how the report names it

    @property
    def title(self) -> str:
        return self.label or self.attr.replace("_", " ")


@dataclass(frozen=True)
class Profile:
    """One architecture under one target: its quantized components and the target's matching."""

    name: str
    target: Target
    components: tuple[Component, ...]
    match: str  # how the target matches ignored_layers: "exact" or "substring"
    display_name: str = ""
    # Every component the target quantizes in this architecture (``components`` may be fewer:
    # ``--components`` or a pipeline without one of them).
    target_quantizes: tuple[str, ...] = ()

    @property
    def forms(self) -> tuple[str, ...]:
        """The quantization_config forms this pipeline loads under the target, preferred first.

        The flat form reaches every quantization-aware component; a per-component map only
        where the pipeline routes it by component name.
        """
        if self.target.routes_per_component(self.name):
            return ("flat", "per_component")
        return ("flat",)

    def component(self, attr: str) -> Component | None:
        return next((c for c in self.components if c.attr == attr), None)

    @property
    def main(self) -> Component:
        return self.components[0]


@dataclass(frozen=True)
class Architecture:
    """An architecture and the components each target quantizes."""

    name: str
    transformer_classes: tuple[str, ...]
    display_name: str
    dit: Naming
    targets: dict  # target name -> tuple of Component


def _dit(method: str = W8A8, naming: Naming = Naming(), attr: str = "transformer",
         label: str = "") -> Component:
    return Component(attr, method, naming,
                     label=label or ("DiT" if attr == "transformer" else f"DiT ({attr})"))


_QWEN_DIT = Naming(rules=((r"\.to_[qkv]$", ".to_qkv"), (r"\.add_[qkv]_proj$", ".add_kv_proj")),
                   families=("to_qkv", "add_kv_proj", "to_out", "to_add_out", "img_mlp", "txt_mlp"))
_Z_DIT = Naming(rules=((r"\.attention\.to_[qkv]$", ".attention.to_qkv"),
                       (r"\.feed_forward\.w[13]$", ".feed_forward.w13")),
                families=("to_qkv", "to_out", "w13", "w2"))
# Z-Image's Qwen3 is loaded as a causal LM by vLLM-Omni: names gain the ``model.`` prefix that a
# bare Qwen3Model lacks.
_Z_TE = Naming(rules=((r"^(?!model\.)", "model."),))
_FLUX_DIT = Naming(rules=((r"\.attn\.to_[qkv]$", ".attn.to_qkv"),),
                   families=("to_qkv", "proj_mlp", "proj_out"),
                   block_roots=("single_transformer_blocks",))
_WAN_DIT = Naming(rules=((r"\.attn1\.to_[qkv]$", ".attn1.to_qkv"), (r"\.to_out\.0$", ".to_out"),
                         (r"\.ffn\.net\.0\.proj$", ".ffn.net_0.proj"), (r"\.ffn\.net\.2$", ".ffn.net_2")),
                  families=("attn1", "attn2", "ffn"))


# The pipeline runs ``transformer`` while the timestep is at or above its boundary (the noisy
# start of the schedule) and ``transformer_2`` below it: named so in reports.
_WAN_EXPERTS = (_dit(naming=_WAN_DIT, label="DiT, high-noise expert"),
                _dit(naming=_WAN_DIT, attr="transformer_2", label="DiT, low-noise expert"))


def _te(method: str, naming: Naming = Naming()) -> Component:
    return Component("text_encoder", method, naming, label="text encoder")


_VAE = Component("vae", STORAGE, label="VAE")

VLLM_OMNI_0_30 = Target(
    "vllm-omni==0.30.0", match="exact", header="vllm-omni", package="vllm-omni", version="0.30.0",
    per_component_routing=frozenset({"wan"}),
    unused_layers=(("z-image", "text_encoder", "lm_head",
                    "the pipeline takes hidden states before it; vLLM-Omni builds it quantized"),))
SEED = Target("seed", match="substring", header="seed", per_component_routing=None)
TARGETS = {t.name: t for t in (VLLM_OMNI_0_30, SEED)}
DEFAULT_TARGET = VLLM_OMNI_0_30.name
TARGET_ALIASES = {"vllm-omni": DEFAULT_TARGET}  # the newest release layerscan knows and has tested

ARCHITECTURES = (
    # Qwen-Image (and -Edit, same DiT): 0.30.0 loads the Qwen2.5-VL text encoder with
    # ``from_pretrained`` (plain nn.Linear, no quant config): only the DiT is quantized.
    Architecture("qwen-image", ("QwenImageTransformer2DModel",), "Qwen-Image", _QWEN_DIT, {
        VLLM_OMNI_0_30.name: (_dit(naming=_QWEN_DIT),),
        SEED.name: (_dit(naming=_QWEN_DIT), _te(STORAGE), _VAE),
    }),
    Architecture("z-image", ("ZImageTransformer2DModel",), "Z-Image", _Z_DIT, {
        VLLM_OMNI_0_30.name: (_dit(naming=_Z_DIT), _te(W8A8, _Z_TE)),
        SEED.name: (_dit(naming=_Z_DIT), _te(STORAGE)),
    }),
    Architecture("flux", ("FluxTransformer2DModel",), "FLUX.1", _FLUX_DIT, {
        VLLM_OMNI_0_30.name: (_dit(naming=_FLUX_DIT),),
        SEED.name: (_dit(naming=_FLUX_DIT),),
    }),
    # Wan 2.2 A14B: two experts with the same layer names; vLLM-Omni resolves the
    # per-component config for "transformer" and "transformer_2" separately.
    Architecture("wan", ("WanTransformer3DModel",), "Wan2.2", _WAN_DIT, {
        target: _WAN_EXPERTS for target in TARGETS
    }),
)
DEFAULT_ARCHITECTURE = Architecture("default", (), "", Naming(), {
    target: (_dit(),) for target in TARGETS})


def architecture_names() -> list[str]:
    return [a.name for a in ARCHITECTURES + (DEFAULT_ARCHITECTURE,)]


def resolve_target(name: str | None) -> Target:
    """The target called ``name`` (an alias such as ``vllm-omni`` included); one line if unknown."""
    name = TARGET_ALIASES.get(name or DEFAULT_TARGET, name or DEFAULT_TARGET)
    if name not in TARGETS:
        raise UserError(f"unknown target {name!r}; layerscan knows {', '.join(TARGETS)} "
                        f"(and {', '.join(TARGET_ALIASES)} for the newest)")
    return TARGETS[name]


def make_profile(transformer_class: str, name: str | None = None, target: str | None = None,
                 components: tuple[str, ...] | None = None, match: str | None = None,
                 present: tuple[str, ...] | None = None) -> Profile:
    """The profile named ``name`` (else the one registered for the DiT class) under ``target``.

    ``components`` restricts which components are quantized (e.g. only the DiT); ``present``
    drops components the pipeline does not have (a Wan 2.2 pipeline without ``transformer_2``).
    """
    chosen_target = resolve_target(target)
    if match is not None and match not in MATCH_MODES:
        raise UserError(f"layer match must be one of {', '.join(MATCH_MODES)}")
    known = ARCHITECTURES + (DEFAULT_ARCHITECTURE,)
    if name:
        arch = next((a for a in known if a.name == name), None)
        if arch is None:
            raise UserError(f"unknown architecture profile {name!r}; known: {', '.join(architecture_names())}")
    else:
        arch = next((a for a in ARCHITECTURES if transformer_class in a.transformer_classes),
                    DEFAULT_ARCHITECTURE)
    quantized = arch.targets[chosen_target.name]
    chosen = quantized
    if present is not None:
        chosen = tuple(c for c in chosen if c.attr in present)
    if components is not None:
        unknown = set(components) - {c.attr for c in quantized}
        if unknown:
            raise UserError(f"{arch.name} under {chosen_target.name} quantizes "
                            f"{', '.join(c.attr for c in quantized)}; not "
                            f"{', '.join(sorted(unknown))}")
        chosen = tuple(c for c in chosen if c.attr in components)
    if not chosen or chosen[0].attr != "transformer":
        raise UserError("the DiT ('transformer') must be among the quantized components")
    return Profile(arch.name, chosen_target, chosen, match or chosen_target.match, arch.display_name,
                   tuple(c.attr for c in quantized))
