"""Built-in tiny diffusion pipelines that are built offline, from configs and seeded random weights.

Why: tests, CI and first runs need a *real* pipeline directory (``model_index.json`` plus one folder
per component) without network access or gigabytes of weights. Each tiny pipeline uses the same
diffusers/transformers classes as the full model (``QwenImagePipeline``, ``FluxPipeline``), so every
code path that loads by directory, walks modules or swaps Linears for FP8 runs unchanged; only the
sizes shrink. Tokenizers are trained here, in memory, on a fixed word list, using the tokenizer
class each pipeline expects, so ``save_pretrained``/``from_pretrained`` round-trips exactly.

Random weights give meaningless pictures, so the planted pipelines (``*-outlier``,
:func:`save_planted`, :func:`save_planted_text_encoder`) add the one property of real checkpoints
that FP8 studies care about: an activation outlier that FP8 activation scaling cannot represent,
while BF16 output stays (nearly) unchanged. The planting itself lives in :mod:`layerscan.plant`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from layerscan.cache import cache_root_or_default
from layerscan.errors import UserError
from layerscan.plant import plant_massive_activation, plant_text_encoder_activation, plant_wan_activation

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline, WanTransformer3DModel
    from transformers import CLIPTokenizer, Qwen2Tokenizer, T5Tokenizer

__all__ = [
    "QWEN_TEMPLATE_PREFIX",
    "TINY_ARCHITECTURES",
    "TinyArchitecture",
    "build_tiny_pipeline",
    "save_planted",
    "save_planted_text_encoder",
    "tiny_pipeline_dir",
]

# Bump when a build would produce different files, so stale caches are never reused.
_CACHE_VERSION = "v1"

# Width of every text encoder and of the transformers' text input (joint_attention_dim).
_TEXT_DIM = 32

# Plain English prompt words. The first line is the Qwen-Image prompt template, which must tokenize
# word-for-word (see QWEN_TEMPLATE_PREFIX).
_WORDS = """
describe the image by detailing color shape size texture quantity text spatial relationships of
objects and background system user assistant
a an this that these those it its is are was be with without in on at to from into onto over under
above below behind beside between near far next left right top bottom middle center front back
inside outside around across along up down high low there here one two three four five six seven
eight nine ten many few several some all each every no not very more most less
red orange yellow green blue purple pink brown black white gray grey gold silver cyan magenta
beige teal navy violet dark light bright pale colorful transparent
circle square triangle rectangle oval star heart diamond hexagon line dot cube sphere cylinder
cone pyramid ring spiral arrow cross grid pattern stripe stripes dots
small large big tiny huge tall short long wide narrow thick thin round flat sharp soft smooth
rough shiny matte glossy wooden metal metallic glass plastic stone paper fabric leather furry
old new young ancient modern simple detailed abstract realistic cartoon painting photo photograph
drawing sketch illustration portrait landscape closeup close view scene style art digital oil
watercolor pencil render cinematic lighting light shadow sunlight sunset sunrise night day
morning evening fog rain snow cloud clouds sky sun moon stars water ocean sea lake river beach
sand mountain mountains hill forest tree trees grass flower flowers leaf leaves garden field
desert city street road bridge building house home room window door wall floor table chair bed
lamp book cup bottle box bag hat shirt dress shoes car bus bike bicycle boat ship train plane
airplane cat dog bird fish horse cow sheep lion tiger bear rabbit mouse elephant monkey duck
person people man woman boy girl child baby face eyes hair hand hands smile apple banana orange
bread cake pizza coffee tea food fruit logo sign letter word number poster card robot computer
phone clock camera guitar piano ball kite balloon candle fire ice
standing sitting running walking flying floating lying holding wearing looking playing reading
eating drinking sleeping smiling jumping swimming glowing shining reflecting
beautiful cute happy sad calm quiet busy empty full clean dirty wet dry hot cold warm cool
soft vivid vibrant muted neon minimal minimalist elegant futuristic vintage retro rustic
cozy dramatic mysterious magical peaceful
of for as or but so than then when while where which who what how why
highly quality high resolution sharp focus blurry blur bokeh depth background foreground
""".split()

QWEN_TEMPLATE_PREFIX = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
    "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
)
"""The part of QwenImagePipeline's prompt template before the prompt; the pipeline drops exactly
``prompt_template_encode_start_idx`` (34) leading tokens, so this must encode as 34 tokens."""

_QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


# ----------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------


def _words() -> list[str]:
    """The vocabulary words, deduplicated in first-seen order so the training corpus is stable."""
    return list(dict.fromkeys(_WORDS))


def _train_bpe(backend: object, corpus: list[str], suffix: str = "") -> tuple[dict[str, int], list]:
    """Train a byte-level BPE with ``backend``'s normalizer and pre-tokenizer until no pair is left.

    Why train rather than write merges by hand: merges for different words interact (``th`` inside
    ``other``); running BPE to completion on the corpus guarantees each corpus word encodes as one
    token. Every word occurs equally often and ties break by token id, so the result is stable.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    suffix_kw = {"end_of_word_suffix": suffix} if suffix else {}
    tok = Tokenizer(models.BPE(**suffix_kw))
    tok.normalizer = backend.normalizer
    tok.pre_tokenizer = backend.pre_tokenizer
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    trainer = trainers.BpeTrainer(
        vocab_size=1_000_000,
        min_frequency=0,
        show_progress=False,
        # Reserve ids for every single byte (and word-final byte) up front, in sorted order: the
        # trainer otherwise numbers word-final bytes in hash-map order, and ids break merge ties.
        # It also means no input is ever unknown.
        special_tokens=[c + suffix for c in alphabet] if suffix else [],
        initial_alphabet=alphabet,
        **suffix_kw,
    )
    tok.train_from_iterator(corpus, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return vocab, merges


def _qwen_tokenizer() -> Qwen2Tokenizer:
    """Byte-level BPE in the ``Qwen2Tokenizer`` class, with Qwen's chat special tokens.

    Byte-level means no word is ever unknown: unseen words fall back to smaller pieces, down to bytes.
    Corpus words appear bare, after a space, and capitalised, as Qwen's pre-tokenizer produces them.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    corpus = [v for w in _words() for v in (w, " " + w, w.capitalize(), " " + w.capitalize())]
    corpus += list(string.punctuation) + [" " + p for p in string.punctuation]
    vocab, merges = _train_bpe(Qwen2Tokenizer().backend_tokenizer, corpus)
    for token in _QWEN_SPECIALS:
        vocab.setdefault(token, len(vocab))
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in _QWEN_SPECIALS], special_tokens=True)
    return tok


# Qwen3's chat template reduced to plain-text turns (no tools, no reasoning history): exactly the
# text the real template renders for ZImagePipeline's call, a user turn plus the generation prompt.
# With ``enable_thinking=False`` Qwen3 pre-fills an empty think block, and so does this.
_QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def _qwen3_tokenizer() -> Qwen2Tokenizer:
    """The Qwen tokenizer as Qwen3 ships it: same ``Qwen2Tokenizer`` class and chat specials, plus
    the ``<think>``/``</think>`` tokens and a chat template, because ZImagePipeline formats every
    prompt with ``apply_chat_template(..., enable_thinking=True)``.

    Built on :func:`_qwen_tokenizer` rather than changing it: the Qwen-Image tokenizer's files are
    part of the tiny Qwen-Image pipeline and the shipped demo, and must not move.
    """
    from tokenizers import AddedToken

    tok = _qwen_tokenizer()
    # Qwen3 registers the think tags as added tokens that are not special: decoding keeps them.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    tok.chat_template = _QWEN3_CHAT_TEMPLATE
    return tok


def _clip_tokenizer() -> CLIPTokenizer:
    """Byte-level BPE with CLIP's ``</w>`` word-final suffix; special tokens last, as in real CLIP.

    Special ids must not be 2: CLIPTextModel treats ``eos_token_id == 2`` as a legacy config and
    pools at the largest id instead of at the end-of-text token.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _train_bpe(CLIPTokenizer().backend_tokenizer, _words() + list(string.punctuation), "</w>")
    for token in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _t5_tokenizer() -> T5Tokenizer:
    """Unigram vocabulary in T5's layout (``<pad>``=0, ``</s>``=1, ``<unk>``=2).

    Whole words score far above single characters, so a known word is one piece; unknown words
    split into characters, and characters outside the alphabet become ``<unk>``.
    """
    from transformers import T5Tokenizer

    scores = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "▁": -4.0}
    for word in _words():
        scores.update({"▁" + word: -6.0, "▁" + word.capitalize(): -6.0})
    for char in string.ascii_letters + string.digits + string.punctuation:
        scores.setdefault(char, -12.0)
        scores.setdefault("▁" + char, -12.0)
    return T5Tokenizer(vocab=list(scores.items()), extra_ids=0, model_max_length=512)


# ----------------------------------------------------------------------------------------------
# Pipelines
# ----------------------------------------------------------------------------------------------


def _to_bf16(*modules: torch.nn.Module) -> None:
    """Cast weights to BF16 after a float32 init. Plain ``nn.Module.to``: diffusers' override warns
    about an empty list of float32-only modules on every cast."""
    for module in modules:
        torch.nn.Module.to(module, dtype=torch.bfloat16)


def _build_qwen_image(seed: int) -> DiffusionPipeline:
    """QwenImagePipeline: 4 dual-stream blocks of width 64 (4 heads x 16), every Linear dim a multiple
    of 16 so FP8 GEMMs accept them; VAE with 4x spatial compression (32 px -> 8x8 latents -> 16 tokens)."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = _qwen_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    z_dim = 16  # the pipeline packs 2x2 latent patches: transformer in_channels = 4 * z_dim
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * z_dim,
        out_channels=z_dim,
        num_layers=4,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=_TEXT_DIM,
        axes_dims_rope=(4, 6, 6),  # frame, height, width; sums to the head dim
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(
        base_dim=24,
        z_dim=z_dim,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],  # the pipeline's vae_scale_factor is 2 ** len(this)
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
    )
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=_TEXT_DIM,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            # Multimodal RoPE splits head_dim / 2 = 8 frequency pairs over (time, height, width).
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            depth=1,
            hidden_size=_TEXT_DIM,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=_TEXT_DIM,
            fullatt_block_indexes=[0],
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(  # Qwen-Image's schedule: exponential dynamic shift
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=math.log(3),
        max_shift=math.log(3),
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    _to_bf16(transformer, vae, text_encoder)
    return QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


def _build_flux(seed: int) -> DiffusionPipeline:
    """FluxPipeline: 2 double + 2 single blocks of width 64, guidance-distilled like FLUX.1-dev;
    VAE with 4 latent channels and 4x compression (32 px -> 8x8 latents -> 16 packed tokens)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tokenizer, t5_tokenizer = _clip_tokenizer(), _t5_tokenizer()
    latent_channels = 4  # packed 2x2: transformer in_channels = 4 * latent_channels
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=_TEXT_DIM,
        pooled_projection_dim=_TEXT_DIM,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),  # the pipeline's vae_scale_factor is 2 ** (len(this) - 1)
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=16,
        sample_size=32,
        scaling_factor=1.0,
        shift_factor=0.0,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tokenizer),
            hidden_size=_TEXT_DIM,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=clip_tokenizer.model_max_length,
            projection_dim=_TEXT_DIM,
            bos_token_id=clip_tokenizer.bos_token_id,
            eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id,
        )
    ).eval()
    torch.manual_seed(seed)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=_TEXT_DIM,
            d_kv=16,
            d_ff=64,
            num_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=64,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            pad_token_id=t5_tokenizer.pad_token_id,
            eos_token_id=t5_tokenizer.eos_token_id,
            decoder_start_token_id=t5_tokenizer.pad_token_id,
        )
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's schedule: linear-in-length dynamic shift
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    _to_bf16(transformer, vae, text_encoder, text_encoder_2)
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


def _build_z_image(seed: int) -> DiffusionPipeline:
    """ZImagePipeline: single-stream DiT of width 48 (2 heads x 24) with 2 main ``layers`` and one
    ``noise_refiner`` and one ``context_refiner`` block; Qwen3 text encoder with 4 decoder layers.

    Width 48 because the FFN is ``int(dim / 3 * 8)`` wide: 48 gives 128, while 64 would give 170,
    and every Linear dim must be a multiple of 16 for FP8 GEMMs. The pipeline reads the text
    encoder's ``hidden_states[-2]``, so its last decoder layer never reaches the DiT, as in Z-Image;
    four layers leave three that matter. VAE with 16 latent channels like Z-Image's (FLUX's) and 4x
    compression: 32 px -> 8x8 latents -> 4x4 patches of 2x2 -> 16 image tokens.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = _qwen3_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    latent_channels = 16
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=latent_channels,
        dim=48,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=_TEXT_DIM,
        axes_dims=[8, 8, 8],  # frame, height, width; sums to the head dim, each even for complex RoPE
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),  # the pipeline's vae_scale_factor is 2 ** (len(this) - 1)
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=16,
        sample_size=32,
        # Z-Image's VAE has 0.3611 / 0.1159; with random weights that only pushes more pixels
        # into clipping, where FP8 differences stop being visible.
        scaling_factor=1.0,
        shift_factor=0.0,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    torch.manual_seed(seed)
    text_encoder = Qwen3Model(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=_TEXT_DIM,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=2048,
            # At Qwen3's 0.02 a width-32 MLP adds ~1/30 of the residual stream, so no FP8 error in
            # it can ever matter; at 0.1 attention and MLP branches are as large as the stream, as
            # in a trained model, and a damaged layer shows in the embeddings.
            initializer_range=0.1,
            bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    # Z-Image-Turbo's schedule: a fixed shift, no resolution-dependent one (the pipeline's ``mu``
    # is ignored when dynamic shifting is off).
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    _to_bf16(transformer, vae, text_encoder)
    return ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


def _wan_expert_model() -> WanTransformer3DModel:
    """One Wan 2.2 A14B expert shrunk to width 64 (4 heads x 16), FFN 128, text width 32."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=16,  # RoPE splits it 8 / 4 / 4 over frame, height, width
        in_channels=16,
        out_channels=16,
        text_dim=_TEXT_DIM,
        freq_dim=256,
        ffn_dim=128,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
    )


def _build_wan22(seed: int) -> DiffusionPipeline:
    """WanPipeline in the Wan2.2-T2V-A14B layout: a high-noise expert (``transformer``) for
    timesteps at or above ``boundary_ratio * 1000`` and a low-noise expert (``transformer_2``)
    below, each 2 blocks wide 64; UMT5 text encoder; Wan VAE with 4x temporal and 8x spatial
    compression: 5 frames of 32 px -> 2 latent frames of 4x4 -> 8 tokens.

    The two experts share the seed's random stream but not their weights, like the real pair (the
    low-noise expert is a separate fine-tune). UniPC in flow mode is the scheduler class the
    Diffusers port uses; ``flow_shift`` 3 puts the boundary (t = 875) in the middle of a 4-step
    schedule (t = 999, 900 | 750, 500), so both experts run in every short test generation.
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = _t5_tokenizer()
    torch.manual_seed(seed)
    transformer, transformer_2 = _wan_expert_model(), _wan_expert_model()
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=8,  # 16 quadruples the decode time (0.9 s vs 0.2 s for 5 frames on one core)
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 16,
        latents_std=[1.0] * 16,
    )
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=_TEXT_DIM,
            d_kv=16,
            d_ff=64,
            num_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=64,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    )
    _to_bf16(transformer, transformer_2, vae, text_encoder)
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=scheduler,
        transformer=transformer,
        transformer_2=transformer_2,
        boundary_ratio=0.875,
    )


@dataclass(frozen=True)
class TinyArchitecture:
    """A built-in tiny pipeline: what it stands in for and how to build it in memory (BF16)."""

    pipeline_class: str
    transformer_class: str
    build: Callable[[int], DiffusionPipeline]
    description: str


TINY_ARCHITECTURES: dict[str, TinyArchitecture] = {
    "tiny-qwen-image": TinyArchitecture(
        "QwenImagePipeline",
        "QwenImageTransformer2DModel",
        _build_qwen_image,
        "Qwen-Image layout: 4 MMDiT blocks, width 64, Qwen2.5-VL text encoder of width 32",
    ),
    "tiny-qwen-image-outlier": TinyArchitecture(
        "QwenImagePipeline",
        "QwenImageTransformer2DModel",
        lambda seed: _planted_qwen_image(seed),
        "tiny-qwen-image with a massive activation planted in every img_mlp input",
    ),
    "tiny-qwen-image-txt-outlier": TinyArchitecture(
        "QwenImagePipeline",
        "QwenImageTransformer2DModel",
        lambda seed: _planted_qwen_image_text(seed),
        "tiny-qwen-image with a massive activation planted in every txt_mlp input; its FP8 damage "
        "reaches the image through joint attention, so it fades as images get more tokens",
    ),
    "tiny-flux": TinyArchitecture(
        "FluxPipeline",
        "FluxTransformer2DModel",
        _build_flux,
        "FLUX.1-dev layout: 2 double + 2 single blocks, width 64, CLIP + T5 text encoders of width 32",
    ),
    "tiny-z-image": TinyArchitecture(
        "ZImagePipeline",
        "ZImageTransformer2DModel",
        _build_z_image,
        "Z-Image layout: 2 single-stream layers + 1 noise and 1 context refiner, width 48, "
        "Qwen3 text encoder of width 32 with 4 decoder layers",
    ),
    "tiny-wan2.2": TinyArchitecture(
        "WanPipeline",
        "WanTransformer3DModel",
        _build_wan22,
        "Wan2.2-T2V-A14B layout: high- and low-noise experts of 2 blocks, width 64, boundary 0.875, "
        "UMT5 text encoder of width 32 (video: 5 frames of 32 px)",
    ),
    "tiny-wan2.2-outlier": TinyArchitecture(
        "WanPipeline",
        "WanTransformer3DModel",
        lambda seed: _planted_wan22(seed),
        "tiny-wan2.2 with a massive activation planted in every ffn input of the low-noise expert "
        "(transformer_2) only, its FFN gate raised 4x",
    ),
}


def _planted_qwen_image(seed: int) -> DiffusionPipeline:
    """The demo model: FP8 hurts ``img_mlp`` for a real numerical reason, as in Qwen-Image."""
    pipe = _build_qwen_image(seed)
    plant_massive_activation(pipe, "img_mlp")
    return pipe


def _planted_qwen_image_text(seed: int) -> DiffusionPipeline:
    """A failure that depends on the resolution: FP8 hurts ``txt_mlp``, whose output reaches the
    image only through joint attention, where the text tokens' share of the keys falls as the
    image has more tokens (4 at 32 px, 64 at 128 px).  With the branch gain raised 64x, measured
    on 2 prompts, 4 steps, PSNR against BF16: at 32 px FP8 everywhere 51.5 dB, with ``txt_mlp``
    kept 55.2 dB, noise floor 55.8 dB; at 128 px FP8 everywhere 55.5 dB, floor 55.9 dB."""
    pipe = _build_qwen_image(seed)
    plant_massive_activation(pipe, "txt_mlp", branch_gain=64.0)
    return pipe


def _planted_wan22(seed: int) -> DiffusionPipeline:
    """The video example: FP8 hurts ``transformer_2``'s ``ffn`` and nothing of ``transformer``.

    The low-noise expert makes the last steps, so its damage reaches the frames; the gain of 4
    makes it show through the random VAE (measured on 2 prompts, 4 steps: FP8 everywhere 46 dB
    PSNR, with ``transformer_2:ffn`` kept in BF16 53.7 dB, the BF16 noise floor 53.7 dB).
    """
    pipe = _build_wan22(seed)
    plant_wan_activation(pipe, "ffn", expert="transformer_2", branch_gain=4.0)
    return pipe


def _architecture(name: str) -> TinyArchitecture:
    """Look up ``name``; an unknown name is the user's mistake, so the message lists the known ones."""
    try:
        return TINY_ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(sorted(TINY_ARCHITECTURES))
        raise UserError(f"unknown tiny pipeline {name!r}; known: {known}") from None


def _save(pipe: DiffusionPipeline, out_dir: str | Path) -> Path:
    """Write ``pipe`` as a loadable pipeline directory of BF16 safetensors."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def build_tiny_pipeline(name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build the named tiny pipeline with seeded random weights and save it to ``out_dir``.

    Weights are BF16 safetensors and the same seed gives byte-identical weights, so a cached
    directory and a fresh build are interchangeable. Returns ``out_dir`` as a Path.
    """
    return _save(_architecture(name).build(seed), out_dir)


def tiny_pipeline_dir(name: str, cache_root: Path | None = None) -> Path:
    """Return the cached directory of a built-in tiny pipeline (seed 0), building it on first use.

    The build goes to a temporary sibling directory that is renamed into place in one step, so a
    crash or a concurrent build never leaves a half-written directory at the final path; if another
    process wins the race, its directory is used and ours is discarded.
    """
    _architecture(name)
    final = cache_root_or_default(cache_root) / "tiny" / f"{name}-{_CACHE_VERSION}"
    if (final / "model_index.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        build_tiny_pipeline(name, tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def save_planted(name: str, family: str, blocks: list[int] | None, out_dir: str | Path,
                 seed: int = 0, **plant_options) -> Path:
    """Build the tiny pipeline ``name``, plant a massive activation into ``family`` of ``blocks``,
    and save it to ``out_dir``: a model directory where FP8 genuinely hurts one known family.

    Wan pipelines go through :func:`~layerscan.plant.plant_wan_activation` and need ``expert=`` among
    ``plant_options``; the others through :func:`~layerscan.plant.plant_massive_activation`.
    """
    from diffusers import WanPipeline

    pipe = _architecture(name).build(seed)
    plant = plant_wan_activation if isinstance(pipe, WanPipeline) else plant_massive_activation
    plant(pipe, family, blocks, **plant_options)
    return _save(pipe, out_dir)


def save_planted_text_encoder(name: str, layer: int, out_dir: str | Path, seed: int = 0,
                              **plant_options) -> Path:
    """Build the tiny pipeline ``name``, plant a massive activation into decoder layer ``layer`` of
    its text encoder (:func:`~layerscan.plant.plant_text_encoder_activation`) and save it to
    ``out_dir``: a model directory where FP8 activations hurt one known text-encoder layer."""
    pipe = _architecture(name).build(seed)
    plant_text_encoder_activation(pipe, layer, **plant_options)
    return _save(pipe, out_dir)
