"""What the target engine does with each architecture: which components it quantizes, how, and
under which names.

Two quantization schemes (``SCHEMES``):

* ``vllm-omni`` (the default) is what ``Omni(model=..., quantization="fp8")`` runs in vLLM-Omni
  today: DiT Linears W8A8 online (vLLM parallel linears), the text encoder's language-model
  Linears W8A8 too where the pipeline builds them as vLLM ``ReplicatedLinear`` layers (Z-Image;
  Qwen-Image's language-model-only text-encoder module), the vision tower and the VAE untouched.
  vLLM's ``Fp8Config`` matches ``ignored_layers`` against full layer names *exactly* by default
  (``ignored_layers_match_mode = "exact"`` in vLLM 0.30), so outputs list full names.
* ``seed`` is the design of the seed guide (and of vLLM-Omni's early FP8 PRs): DiT W8A8, text
  encoder and VAE with FP8 *weight storage* (dequantized in forward hooks), patterns matched as
  substrings.

Names are vLLM-Omni's, read from its model code: Qwen-Image fuses ``to_q/k/v`` into
``attn.to_qkv`` and ``add_q/k/v_proj`` into ``attn.add_kv_proj`` and keeps ``attn.to_out.0``;
Z-Image fuses ``attention.to_q/k/v`` into ``attention.to_qkv`` and ``feed_forward.w1/w3`` into
``feed_forward.w13``; FLUX.1 quantizes only its single-stream blocks (dual-stream blocks are
kept in full precision in code); Wan 2.2 fuses the self-attention ``attn1.to_q/k/v`` into
``attn1.to_qkv``, keeps the cross-attention ``attn2.to_q/k/v`` apart, drops ``to_out``'s ``.0``
and writes the FFN as ``ffn.net_0.proj`` / ``ffn.net_2``; its second expert ``transformer_2``
uses the same names.  Text encoders keep their Hugging Face names relative to the module vLLM-Omni
quantizes (``layers.N.self_attn.q_proj`` for Qwen-Image's language model, ``model.layers.N...``
for Z-Image's causal LM), every Linear on its own (no q/k/v fusion).
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
    """One architecture under one scheme: its quantized components and the target's matching."""

    name: str
    scheme: str
    components: tuple[Component, ...]
    match: str  # how the target matches ignored_layers: "exact" or "substring"
    display_name: str = ""
    # Whether the pipeline routes a per-component quantization_config to each component by its
    # key; otherwise one (flat) config reaches every quantization-aware component.
    per_component_routing: bool = False

    def component(self, attr: str) -> Component | None:
        return next((c for c in self.components if c.attr == attr), None)

    @property
    def main(self) -> Component:
        return self.components[0]


@dataclass(frozen=True)
class Architecture:
    """An architecture and the components each scheme quantizes."""

    name: str
    transformer_classes: tuple[str, ...]
    display_name: str
    dit: Naming
    schemes: dict  # scheme -> tuple of Component
    per_component_routing: bool = False


def _dit(method: str = W8A8, naming: Naming = Naming(), attr: str = "transformer",
         label: str = "") -> Component:
    return Component(attr, method, naming,
                     label=label or ("DiT" if attr == "transformer" else f"DiT ({attr})"))


_QWEN_DIT = Naming(rules=((r"\.to_[qkv]$", ".to_qkv"), (r"\.add_[qkv]_proj$", ".add_kv_proj")),
                   families=("to_qkv", "add_kv_proj", "to_out", "to_add_out", "img_mlp", "txt_mlp"))
# Qwen-Image's text encoder is Qwen2.5-VL; only its language model is quantized, named relative
# to that language model.
_QWEN_TE = Naming(scope="model.language_model.")
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

ARCHITECTURES = (
    Architecture("qwen-image", ("QwenImageTransformer2DModel",), "Qwen-Image", _QWEN_DIT, {
        "vllm-omni": (_dit(naming=_QWEN_DIT), _te(W8A8, _QWEN_TE)),
        "seed": (_dit(naming=_QWEN_DIT), _te(STORAGE), _VAE),
    }),
    Architecture("z-image", ("ZImageTransformer2DModel",), "Z-Image", _Z_DIT, {
        "vllm-omni": (_dit(naming=_Z_DIT), _te(W8A8, _Z_TE)),
        "seed": (_dit(naming=_Z_DIT), _te(STORAGE)),
    }),
    Architecture("flux", ("FluxTransformer2DModel",), "FLUX.1", _FLUX_DIT, {
        "vllm-omni": (_dit(naming=_FLUX_DIT),),
        "seed": (_dit(naming=_FLUX_DIT),),
    }),
    # Wan 2.2 A14B: two experts with the same layer names; vLLM-Omni resolves the
    # per-component config for "transformer" and "transformer_2" separately.
    Architecture("wan", ("WanTransformer3DModel",), "Wan2.2", _WAN_DIT, {
        scheme: _WAN_EXPERTS for scheme in ("vllm-omni", "seed")
    }, per_component_routing=True),
)
DEFAULT_ARCHITECTURE = Architecture("default", (), "", Naming(), {
    "vllm-omni": (_dit(),), "seed": (_dit(),)})
SCHEMES = ("vllm-omni", "seed")
DEFAULT_MATCH = {"vllm-omni": "exact", "seed": "substring"}


def architecture_names() -> list[str]:
    return [a.name for a in ARCHITECTURES + (DEFAULT_ARCHITECTURE,)]


def make_profile(transformer_class: str, name: str | None = None, scheme: str = "vllm-omni",
                 components: tuple[str, ...] | None = None, match: str | None = None,
                 present: tuple[str, ...] | None = None) -> Profile:
    """The profile named ``name`` (else the one registered for the DiT class) under ``scheme``.

    ``components`` restricts which components are quantized (e.g. only the DiT, for a vLLM-Omni
    version that does not quantize the text encoder yet); ``present`` drops components the
    pipeline does not have (a Wan 2.2 pipeline without ``transformer_2``).
    """
    if scheme not in SCHEMES:
        raise UserError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
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
    chosen = arch.schemes[scheme]
    if present is not None:
        chosen = tuple(c for c in chosen if c.attr in present)
    if components is not None:
        unknown = set(components) - {c.attr for c in arch.schemes[scheme]}
        if unknown:
            raise UserError(f"{arch.name} under {scheme} quantizes "
                            f"{', '.join(c.attr for c in arch.schemes[scheme])}; not "
                            f"{', '.join(sorted(unknown))}")
        chosen = tuple(c for c in chosen if c.attr in components)
    if not chosen or chosen[0].attr != "transformer":
        raise UserError("the DiT ('transformer') must be among the quantized components")
    return Profile(arch.name, scheme, chosen, match or DEFAULT_MATCH[scheme], arch.display_name,
                   arch.per_component_routing)
