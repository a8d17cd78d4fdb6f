"""Planting a massive activation into a diffusion model, in place, without changing its BF16 output.

Why: random weights have no outliers, so FP8 barely hurts anything in them. Real checkpoints carry
"massive activations", a few channels orders of magnitude larger than the rest, and an FP8 scale
sized for the outlier erases the ordinary channels. Each ``plant_*`` function adds one such channel
in higher precision (in a modulation, time projection or norm weight, none of which the FP8 engine
quantizes) and divides it back out in the Linear that reads it, so the BF16 output stays (nearly)
unchanged while FP8 genuinely hurts one known place: :func:`plant_massive_activation` in
Qwen-Image's DiT, :func:`plant_wan_activation` in one expert of Wan 2.2, and
:func:`plant_text_encoder_activation` in one decoder layer of a Qwen-style text encoder.

They work on any pipeline of those classes, full-size or tiny; :mod:`layerscan.tiny` uses them for
its planted pipelines and ``save_planted*``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from layerscan.errors import UserError

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline, WanTransformer3DModel

__all__ = [
    "plant_massive_activation",
    "plant_text_encoder_activation",
    "plant_wan_activation",
]

_PLANT_FAMILIES = {"img_mlp": "img_mod", "txt_mlp": "txt_mod"}


@torch.no_grad()
def plant_massive_activation(
    pipe: DiffusionPipeline,
    family: str,
    blocks: list[int] | None = None,
    magnitude: float = 1e6,
    channel: int = 0,
    branch_gain: float = 8.0,
) -> None:
    """Give one input channel of ``family``'s first Linear a massive activation, in place.

    ``pipe`` is a Qwen-Image pipeline or its transformer; ``blocks`` defaults to all blocks.

    Why: random weights have no outliers, so FP8 barely hurts anything. Real checkpoints do have
    "massive activations", a few channels orders of magnitude larger than the rest, and a per-tensor
    FP8 scale sized for the outlier pushes the ordinary channels into FP8's subnormal range or to
    zero. This plants one for a real numerical reason while leaving BF16 output (nearly) unchanged.
    Planting is not idempotent: planting a block twice multiplies by ``magnitude`` twice.

    How (Qwen-Image blocks only): ``img_mod.1`` / ``txt_mod.1`` output ``[shift1, scale1, gate1,
    shift2, scale2, gate2]`` (each ``dim`` wide), and the MLP input is ``norm2(x) * (1 + scale2) +
    shift2``. Setting ``1 + scale2' = M * (1 + scale2)`` and ``shift2' = M * shift2`` on row
    ``channel`` multiplies that input channel by ``M``; dividing column ``channel`` of
    ``*_mlp.net.0.proj.weight`` by ``M`` cancels it. The modulation Linears are not quantized by the
    FP8 engine, so the outlier is produced in higher precision, exactly like the real thing.
    Arithmetic is done in float64 and cast back to each parameter's dtype.

    ``branch_gain`` scales that MLP's gate (``gate2``) in the chosen blocks.  This one is not
    compensated: with random weights the MLP branch adds little to the residual stream and the
    FP8 error of the text encoder and VAE would hide its damage, which a trained model's MLPs do
    not.  ``magnitude`` 1e6 puts the ordinary channels below e4m3's smallest subnormal after
    per-token scaling, so FP8 erases them, rather than only coarsening them.
    """
    from diffusers import QwenImageTransformer2DModel

    transformer = getattr(pipe, "transformer", pipe)
    if not isinstance(transformer, QwenImageTransformer2DModel):
        kind = type(transformer).__name__
        hint = "; use plant_wan_activation for Wan" if kind == "WanTransformer3DModel" else ""
        raise UserError(f"massive activations can only be planted in QwenImageTransformer2DModel, "
                        f"not {kind}{hint}")
    if family not in _PLANT_FAMILIES:
        raise UserError(f"cannot plant into family {family!r}; supported: {', '.join(_PLANT_FAMILIES)}")
    if not (math.isfinite(magnitude) and magnitude > 0):
        raise UserError(f"magnitude must be a positive finite number, got {magnitude}")
    n_blocks = len(transformer.transformer_blocks)
    chosen = list(range(n_blocks)) if blocks is None else sorted(set(blocks))
    if bad := [b for b in chosen if not 0 <= b < n_blocks]:
        raise UserError(f"block indices {bad} out of range; the transformer has {n_blocks} blocks")
    dim = transformer.inner_dim
    if not 0 <= channel < dim:
        raise UserError(f"channel {channel} out of range; the blocks are {dim} wide")

    m = float(magnitude)
    shift_row, scale_row = 3 * dim + channel, 4 * dim + channel  # second chunk: shift2, scale2, gate2
    for index in chosen:
        block = transformer.transformer_blocks[index]
        mod = getattr(block, _PLANT_FAMILIES[family])[1]
        proj = getattr(block, family).net[0].proj
        weight, bias = mod.weight.double(), mod.bias.double()
        weight[[shift_row, scale_row]] *= m
        weight[5 * dim:6 * dim] *= branch_gain
        bias[5 * dim:6 * dim] *= branch_gain
        bias[shift_row] *= m
        bias[scale_row] = m * (1.0 + bias[scale_row]) - 1.0
        column = proj.weight.double()
        column[:, channel] /= m
        mod.weight.copy_(weight.to(mod.weight.dtype))
        mod.bias.copy_(bias.to(mod.bias.dtype))
        proj.weight.copy_(column.to(proj.weight.dtype))


# Doubling is exact in every binary float format, so a power-of-two magnitude makes the planted
# scaling and its compensation exact in BF16 too: the planted model's BF16 output is the original's
# bit for bit, except where a planted parameter is a sum (Wan's scale row, M * (1 + scale) - 1).
_EXACT_MAGNITUDE = 2.0**20  # ~1e6: puts the ordinary channels below e4m3's smallest subnormal


def _check_magnitude(magnitude: float) -> float:
    if not (math.isfinite(magnitude) and magnitude > 0):
        raise UserError(f"magnitude must be a positive finite number, got {magnitude}")
    return float(magnitude)


def _scale_columns(linear: torch.nn.Linear, channel: int, factor: float) -> None:
    """Multiply input column ``channel`` of ``linear``'s weight by ``factor``, in float64."""
    weight = linear.weight.double()
    weight[:, channel] *= factor
    linear.weight.copy_(weight.to(linear.weight.dtype))


_WAN_EXPERTS = ("transformer", "transformer_2")


def _wan_expert(pipe: DiffusionPipeline | torch.nn.Module, expert: str | None) -> WanTransformer3DModel:
    """The expert ``expert`` of a Wan pipeline, or ``pipe`` itself when it is a Wan transformer."""
    from diffusers import WanTransformer3DModel

    if isinstance(pipe, WanTransformer3DModel):
        return pipe
    if expert not in _WAN_EXPERTS:
        raise UserError(f"expert must be one of {', '.join(_WAN_EXPERTS)}, got {expert!r}")
    transformer = getattr(pipe, expert, None)
    if not isinstance(transformer, WanTransformer3DModel):
        kind = type(transformer).__name__
        raise UserError(f"{expert} must be a WanTransformer3DModel to plant a Wan activation, not {kind}")
    return transformer


@torch.no_grad()
def plant_wan_activation(
    pipe: DiffusionPipeline | torch.nn.Module,
    family: str = "ffn",
    blocks: list[int] | None = None,
    expert: str | None = None,
    magnitude: float = _EXACT_MAGNITUDE,
    channel: int = 0,
    branch_gain: float = 1.0,
) -> None:
    """Give one input channel of ``ffn.net.0.proj`` in every block of ONE Wan expert a massive
    activation, in place.

    ``pipe`` is a Wan 2.x pipeline (then ``expert`` picks ``transformer``, the high-noise expert,
    or ``transformer_2``, the low-noise one) or one ``WanTransformer3DModel``. The other expert is
    untouched, so FP8 hurts only the steps on one side of ``boundary_ratio``. Why plant at all: see
    :func:`plant_massive_activation`; the BF16 output is unchanged up to rounding, and per token the
    ordinary channels end up below e4m3's smallest subnormal once the outlier sets the FP8 scale.
    Not idempotent: planting twice multiplies by ``magnitude`` twice.

    How: a Wan block's FFN input is ``norm3(x) * (1 + c_scale) + c_shift``, computed in float32,
    where ``c_shift``/``c_scale`` are rows 3/4 of the block's ``scale_shift_table`` plus chunks 3/4
    of ``condition_embedder.time_proj``'s output. Multiplying the time_proj rows of ``channel``
    (weight and bias) by M, and setting ``c_shift' = M * c_shift`` and ``1 + c_scale' = M * (1 +
    c_scale)`` in the table, multiplies that channel by M at every timestep; dividing column
    ``channel`` of ``ffn.net.0.proj`` by M cancels it. time_proj sits outside the blocks and is not
    quantized, like Qwen-Image's ``img_mod``. It is one Linear shared by all blocks of the expert,
    so its M reaches every block: ``family`` must be ``ffn`` and ``blocks`` None (or all of them).
    No per-block place works as well: the one per-block channel factor outside the modulation, the
    cross-attention norm's affine weight, feeds ``attn2.to_q``, and with random weights a damaged
    query barely changes the attention output (tried: FP8 with and without that to_q kept in BF16
    moved the final latents alike, 1.5% vs 1.6%, even with its output scaled by 4).

    ``magnitude`` defaults to 2**20: a power of two keeps every scaling exact in BF16 except the
    table's ``M * (1 + c_scale) - 1``, which needs more bits than ``c_scale``. diffusers loads
    ``scale_shift_table`` in float32 (``_keep_in_fp32_modules``), where it is exact to ~1e-7 and the
    output measured bit-identical; stored in BF16, as :func:`layerscan.tiny.save_planted` writes
    it, it keeps 8 significant bits, a 0.4% error in one channel's scale: measured 0.0011 mean pixel
    change.

    ``branch_gain`` multiplies ``c_gate`` (time_proj chunk 5 and table row 5, in every block), the
    gate of the FFN's contribution to the residual stream, and is *not* compensated (1.0, the
    default, changes nothing). Why: with random weights the FFN adds little to the stream and the
    random VAE flattens latent differences further. Measured on tiny-wan2.2 (``transformer_2``,
    4 steps, W8A8 per-token on every block Linear of both experts), FP8 everywhere vs FP8 with the
    planted ``ffn.net.0.proj`` kept in BF16 moves the final latents by 3.2% vs 1.0% at gain 1, but
    the pixels by 0.0013 vs 0.0012; at gain 4 by 10% vs 1.2%, and 0.0031 vs 0.0012.
    """
    transformer = _wan_expert(pipe, expert)
    n_blocks = len(transformer.blocks)
    if family != "ffn":
        raise UserError(f"cannot plant into Wan family {family!r}; supported: ffn")
    if blocks is not None and sorted(set(blocks)) != list(range(n_blocks)):
        raise UserError("ffn can only be planted in all blocks of an expert at once (blocks=None): its "
                        "modulation comes from one time projection shared by every block")
    m = _check_magnitude(magnitude)
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    if not 0 <= channel < dim:
        raise UserError(f"channel {channel} out of range; the blocks are {dim} wide")
    if not (math.isfinite(branch_gain) and branch_gain > 0):
        raise UserError(f"branch_gain must be a positive finite number, got {branch_gain}")

    time_proj = transformer.condition_embedder.time_proj
    rows = [3 * dim + channel, 4 * dim + channel]  # chunks: shift, scale, gate, c_shift, c_scale, c_gate
    weight, bias = time_proj.weight.double(), time_proj.bias.double()
    for values in (weight, bias):
        values[rows] *= m
        values[5 * dim:6 * dim] *= branch_gain
    time_proj.weight.copy_(weight.to(time_proj.weight.dtype))
    time_proj.bias.copy_(bias.to(time_proj.bias.dtype))
    for block in transformer.blocks:
        table = block.scale_shift_table.double()  # (1, 6, dim)
        table[0, 3, channel] *= m
        table[0, 4, channel] = m * (1.0 + table[0, 4, channel]) - 1.0
        table[0, 5] *= branch_gain
        block.scale_shift_table.copy_(table.to(block.scale_shift_table.dtype))
        _scale_columns(block.ffn.net[0].proj, channel, 1.0 / m)


_TEXT_SITES = {
    # site: (the RMSNorm whose weight carries the outlier, the Linears that read its output)
    "mlp": ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    "attn": ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
}
# Where Qwen-style models keep their decoder layers: Qwen2/Qwen3 ``*Model``, ``*ForCausalLM``, and
# the language model inside Qwen2.5-VL / Qwen3-VL.
_DECODER_LAYER_PATHS = ("layers", "model.layers", "language_model.layers", "model.language_model.layers")


def _decoder_layers(text_encoder: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a Qwen-style text encoder, or a UserError naming what was found."""
    for path in _DECODER_LAYER_PATHS:
        try:
            layers = text_encoder.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, torch.nn.ModuleList) and len(layers):
            return layers
    kind = type(text_encoder).__name__
    raise UserError(f"{kind} is not a Qwen-style text encoder: no decoder layers at "
                    f"{', '.join(_DECODER_LAYER_PATHS)}")


@torch.no_grad()
def plant_text_encoder_activation(
    pipe: DiffusionPipeline | torch.nn.Module,
    layer: int,
    site: str = "mlp",
    magnitude: float = _EXACT_MAGNITUDE,
    channel: int = 0,
    component: str = "text_encoder",
) -> None:
    """Give decoder layer ``layer`` of a Qwen-style text encoder a massive activation, in place.

    ``pipe`` is a pipeline (its ``component`` is used) or the text encoder itself: Qwen2/Qwen3
    models and Qwen2.5-VL, whose decoder layers are all ``input_layernorm -> self_attn``,
    ``post_attention_layernorm -> mlp`` with RMSNorms computing ``weight * x / rms(x)``.

    Why: the same as :func:`plant_massive_activation`, for a text encoder whose Linears run W8A8
    with dynamic per-token activation scales (``amax / 448`` per row). One outlier channel sets every
    token's scale, the ordinary channels fall below e4m3's smallest subnormal and are erased, and
    the Linears reading that input lose nearly all of their output. The BF16 output is unchanged.

    How: the RMSNorm feeding the ``site`` divides by the RMS of its input *before* applying its
    weight, so multiplying ``weight[channel]`` by M multiplies that channel of its output, and only
    that, by M. Dividing column ``channel`` of every Linear reading it by M cancels it exactly:
    ``site="mlp"`` (default) plants in the input of ``mlp.gate_proj``/``mlp.up_proj`` (vLLM's fused
    ``gate_up_proj``), ``site="attn"`` in the input of ``q_proj``/``k_proj``/``v_proj``
    (``qkv_proj``). The norm weight is not a Linear and is never quantized, so the outlier is made
    in high precision. Not the input of ``down_proj``: scaling it would need M in ``up_proj``'s
    weight rows, where per-tensor FP8 weight scaling would wreck ``up_proj`` as well.

    ``magnitude`` defaults to 2**20: multiplying and dividing by a power of two is exact in BF16
    (barring overflow), so the planted encoder's BF16 output is the original's bit for bit.
    Not idempotent: planting twice multiplies by ``magnitude`` twice.

    Measured on tiny-z-image (layer 1, ``mlp``; relative error of ``hidden_states[-2]``, what the
    pipeline reads): W8A8 per-token on the planted ``gate_proj``/``up_proj`` alone gives 0.35, on any
    other Linear at most 0.05, as without planting. Weight-only FP8 notices too, less so: the
    compensated column, M times smaller, rounds to zero (0.09-0.11 vs 0.015). Z-Image never reads
    the last layer's output, so planting there leaves every FP8 result untouched.
    """
    text_encoder = pipe if isinstance(pipe, torch.nn.Module) else getattr(pipe, component, None)
    if not isinstance(text_encoder, torch.nn.Module):
        raise UserError(f"the pipeline has no {component} to plant into")
    if site not in _TEXT_SITES:
        raise UserError(f"cannot plant into text encoder site {site!r}; supported: {', '.join(_TEXT_SITES)}")
    m = _check_magnitude(magnitude)
    layers = _decoder_layers(text_encoder)
    if not 0 <= layer < len(layers):
        raise UserError(f"layer {layer} out of range; the text encoder has {len(layers)} decoder layers")
    norm_name, reader_names = _TEXT_SITES[site]
    decoder_layer = layers[layer]
    try:
        norm = decoder_layer.get_submodule(norm_name)
        readers = [decoder_layer.get_submodule(n) for n in reader_names]
    except AttributeError:
        kind = type(decoder_layer).__name__
        raise UserError(f"{kind} is not a Qwen-style decoder layer: it lacks {norm_name} or "
                        f"{', '.join(reader_names)}") from None
    if not 0 <= channel < norm.weight.numel():
        raise UserError(f"channel {channel} out of range; the text encoder is {norm.weight.numel()} wide")

    weight = norm.weight.double()
    weight[channel] *= m
    norm.weight.copy_(weight.to(norm.weight.dtype))
    for reader in readers:
        _scale_columns(reader, channel, 1.0 / m)
