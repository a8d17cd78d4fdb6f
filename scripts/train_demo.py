#!/usr/bin/env python3
"""Train the demo pipeline: a small Qwen-Image model that draws the captioned shapes of layerscan.demo.scenes.

    python scripts/train_demo.py --out layerscan/demo/pipeline            # on a CUDA GPU (minutes)
    python scripts/train_demo.py --smoke --device cpu --out /tmp/demo     # a few steps, to test the script

What it trains, in order, all with diffusers/transformers classes so the result is an ordinary
``QwenImagePipeline`` directory:

1. a pool of seeded scenes (``--pool`` of them), rendered once on the device;
2. the VAE (``AutoencoderKLQwenImage``, 4x spatial compression, 16 latent channels): L1
   reconstruction with shape pixels weighted ``--vae-fg-weight`` times (they are under a tenth of
   a picture but all the checker reads), plus a small KL term; then every pool image is encoded
   (posterior mean) and the per-channel latent mean and std are written into the VAE config as
   ``latents_mean``/``latents_std``, which QwenImagePipeline uses to de-normalise before decoding;
3. the DiT (``QwenImageTransformer2DModel``) by rectified flow, in exactly the conventions
   QwenImagePipeline samples with: normalised latents packed into 2x2 patches (64 tokens for
   64x64), noisy latents ``(1 - s) * x0 + s * noise``, the target velocity ``noise - x0``, the
   timestep ``s`` itself (the pipeline passes ``t / 1000``), and ``s`` drawn logit-normally then
   pushed through the scheduler's own time shift (its ``mu`` from ``calculate_shift``). Text
   conditioning is the pipeline's own ``encode_prompt`` output for every possible caption,
   computed once; 10% of captions are replaced by the negative prompt " " that layerscan's true
   CFG uses, so the model also learns the unconditional prediction. Adaptive-norm modulations and
   the output projection start at zero (adaLN-zero), and the exported weights are an EMA.

The tokenizer and the Qwen2.5-VL text encoder are those of the built-in ``tiny-qwen-image``
(seeded random init, kept frozen): the DiT learns to read its features. The pipeline is saved in
BF16 with ``save_pretrained``; a ``training.json`` next to ``model_index.json`` records the
arguments, step counts, losses and timings, and (unless ``--no-eval``) the checker accuracy of
BF16 generations on the demo prompt set, generated exactly as layerscan generates its baseline.

``--max-*-seconds`` only guard a time budget: when one stops a phase early, ``training.json``
says after how many steps, and passing that number as the step count reproduces the run (up to
GPU non-determinism). ``--init DIR`` continues from a saved pipeline; with ``--vae-part decoder``
the encoder, and so the latent space the DiT was trained in, stays as it was.

The shipped weights (``layerscan/demo/pipeline``) came from four runs on one H200, each
continuing the last, and a planting step; their ``training.json`` holds every record (earlier
ones nested under ``init``) and, under ``evaluations``, the checks made afterwards.  Time limits
stopped some phases; these step counts reproduce them:

    python scripts/train_demo.py --out /tmp/stage1 --vae-batch 128 --vae-fg-weight 1 \
        --vae-schedule constant --vae-steps 1296 --dit-batch 256 --dit-lr 4e-4 --dit-steps 3496 \
        --eval-random 512
    python scripts/train_demo.py --init /tmp/stage1 --vae-part decoder --vae-batch 256 \
        --vae-schedule constant --vae-steps 657 --dit-batch 1024 --dit-lr 3e-4 --dit-warmup 50 \
        --ema 0.998 --dit-steps 1011 --eval-random 256 --out /tmp/stage2
    python scripts/train_demo.py --init /tmp/stage2 --vae-part decoder --pool 100000 \
        --vae-batch 256 --vae-steps 1659 --dit-steps 0 --no-eval --out /tmp/stage3
    python scripts/train_demo.py --init /tmp/stage3 --vae-part decoder --vae-steps 2600 \
        --max-vae-seconds 200 --dit-batch 1024 --dit-lr 2e-4 --dit-warmup 50 --ema 0.998 \
        --dit-steps 800 --max-dit-seconds 60 --eval-steps 10 --out layerscan/demo/pipeline
    python scripts/train_demo.py --plant-only img_mlp --device cpu --eval-steps 10 \
        --out layerscan/demo/pipeline

The third run trained only the decoder (the checker's accuracy on VAE reconstructions went from
75 % to 90 %); the fourth ran both phases within its limits (decoder 164 s, DiT 52 s) and reached
33 of 36 study prompts (92 %) on the H200 at 10 steps.  The last step plants a massive activation
in ``img_mlp`` (see ``plant_saved``): trained at this size the model's own FP8 sensitivity is at
the level of its noise floor, so without it a search would chase noise.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from layerscan.demo import scenes  # noqa: E402
from layerscan.demo.checker import accuracy, check, describe  # noqa: E402

DEMO_PROMPTS = REPO / "studies" / "prompts" / "demo.txt"
NEGATIVE_PROMPT = " "  # what layerscan passes as the negative prompt for Qwen-Image's true CFG


def log(message: str) -> None:
    print(message, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "layerscan" / "demo" / "pipeline"), help="pipeline directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--pool", type=int, default=200_000, help="number of distinct training scenes")
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--vae-batch", type=int, default=256)
    p.add_argument("--vae-lr", type=float, default=5e-4)
    p.add_argument("--vae-kl", type=float, default=1e-4, help="weight of the mean KL per latent element")
    p.add_argument("--vae-warmup", type=int, default=200, help="linear learning-rate warmup steps")
    p.add_argument("--vae-schedule", choices=("cosine", "constant"), default="cosine",
                   help="learning rate after warmup: cosine decay over the step or time budget, or constant")
    p.add_argument("--vae-fg-weight", type=float, default=10.0,
                   help="L1 weight of shape pixels relative to background pixels (1: plain L1)")
    p.add_argument("--vae-part", choices=("all", "decoder"), default="all",
                   help="train the whole VAE, or only its decoder (keeps the latent space, e.g. with --init)")
    p.add_argument("--dit-steps", type=int, default=6000)
    p.add_argument("--dit-batch", type=int, default=1024)
    p.add_argument("--dit-lr", type=float, default=6e-4)
    p.add_argument("--dit-width", type=int, default=192)
    p.add_argument("--dit-layers", type=int, default=6)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--dit-warmup", type=int, default=500, help="linear learning-rate warmup steps")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--max-vae-seconds", type=float, default=math.inf)
    p.add_argument("--max-dit-seconds", type=float, default=math.inf)
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--eval-guidance", type=float, default=4.0)
    p.add_argument("--eval-random", type=int, default=0, help="also check this many random captions (batched)")
    p.add_argument("--eval-limit", type=int, default=None, help="check only the first N demo prompts")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--eval-only", action="store_true",
                   help="train nothing: check the pipeline at --out and add the result to its training.json")
    p.add_argument("--init", default=None,
                   help="continue from this pipeline directory (its VAE and DiT) instead of fresh weights")
    p.add_argument("--samples", default=None, help="write a PNG grid of the demo-prompt generations here")
    p.add_argument("--plant-only", metavar="FAMILY", default=None,
                   help="train nothing: plant a massive activation into FAMILY of every block of the "
                        "pipeline at --out, in place, record it in training.json and check it")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and a few steps: tests the script, not the model")
    args = p.parse_args(argv)
    if args.smoke:
        args.pool, args.vae_steps, args.vae_batch = 256, 3, 8
        args.dit_steps, args.dit_batch, args.eval_steps, args.eval_limit = 4, 8, 2, 3
    return args


# ----------------------------------------------------------------------------------------------
# Components
# ----------------------------------------------------------------------------------------------


def build_components(args: argparse.Namespace):
    """Tokenizer, text encoder and scheduler of tiny-qwen-image; a fresh VAE and DiT (float32)."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    from layerscan import tiny

    base = tiny._build_qwen_image(args.seed)  # tokenizer, Qwen2.5-VL text encoder (BF16), scheduler
    z_dim = 16
    torch.manual_seed(args.seed)
    vae = AutoencoderKLQwenImage(
        base_dim=32,
        z_dim=z_dim,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True],  # 2 spatial downsamplings: vae_scale_factor 4
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
    )
    torch.manual_seed(args.seed + 1)
    heads = args.dit_width // args.head_dim
    rope_hw = (args.head_dim - args.head_dim // 4) // 2
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * z_dim,
        out_channels=z_dim,
        num_layers=args.dit_layers,
        attention_head_dim=args.head_dim,
        num_attention_heads=heads,
        joint_attention_dim=base.text_encoder.config.text_config.hidden_size,
        axes_dims_rope=(args.head_dim - 2 * rope_hw, rope_hw, rope_hw),  # frame, height, width
    )
    adaln_zero(transformer)
    if args.init:  # continue training: same architecture, weights (and latent statistics) from there
        vae = AutoencoderKLQwenImage.from_pretrained(Path(args.init) / "vae", torch_dtype=torch.float32)
        transformer = QwenImageTransformer2DModel.from_pretrained(Path(args.init) / "transformer",
                                                                  torch_dtype=torch.float32)
    return base, vae, transformer


@torch.no_grad()
def adaln_zero(transformer: torch.nn.Module) -> None:
    """Zero every block's modulation and the output projection, so each block starts as the identity."""
    for block in transformer.transformer_blocks:
        for mod in (block.img_mod[1], block.txt_mod[1]):
            mod.weight.zero_()
            mod.bias.zero_()
    transformer.proj_out.weight.zero_()
    transformer.proj_out.bias.zero_()


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def render_pool(args: argparse.Namespace, device: torch.device):
    """Seeded scenes rendered to uint8 on ``device``, plus each scene's caption index."""
    pool = scenes.sample_scenes(args.pool, args.seed)
    index = {c: i for i, c in enumerate(scenes.all_captions())}
    images = torch.empty((len(pool), 3, scenes.IMAGE_SIZE, scenes.IMAGE_SIZE), dtype=torch.uint8, device=device)
    chunk = 4096
    for start in range(0, len(pool), chunk):
        part = scenes.render(pool[start:start + chunk], device=device)
        images[start:start + len(part)] = (part * 255).round().to(torch.uint8)
    captions = torch.tensor([index[s.caption] for s in pool], device=device)
    backgrounds = torch.tensor([s.bg_rgb for s in pool], dtype=torch.uint8, device=device)
    return pool, images, captions, backgrounds


def to_model(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float (N, 3, 1, H, W) in [-1, 1], the VAE's video layout with one frame."""
    return (images_u8.float() / 127.5 - 1.0).unsqueeze(2)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (N, 3, 1, H, W) in [-1, 1] -> list-like (N, H, W, 3) uint8."""
    x = ((images[:, :, 0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


# ----------------------------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------------------------


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_vae(args, vae, images, backgrounds, device, record) -> None:
    """L1 reconstruction (shape pixels weighted ``--vae-fg-weight`` times: they are under a tenth of
    each picture but all of what the checker reads) plus ``--vae-kl`` times the mean KL."""
    vae.to(device).train()
    if args.vae_part == "decoder":
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator(device=device).manual_seed(args.seed + 10)
    warmup = args.vae_warmup
    start, losses, step = time.perf_counter(), [], 0
    for step in range(1, args.vae_steps + 1):
        # Cosine decay over the budget, steps or seconds, whichever runs out first: a VAE has no
        # EMA, so its last weights are the ones shipped and should come from a small step size.
        spent = max(step / args.vae_steps, (time.perf_counter() - start) / args.max_vae_seconds)
        decay = 0.5 * (1 + math.cos(math.pi * min(1.0, spent))) if args.vae_schedule == "cosine" else 1.0
        for group in opt.param_groups:
            group["lr"] = args.vae_lr * min(1.0, step / warmup) * decay
        idx = torch.randint(len(images), (args.vae_batch,), generator=gen, device=device)
        x = to_model(images[idx])
        shape_pixels = (images[idx] != backgrounds[idx].view(-1, 3, 1, 1)).any(dim=1, keepdim=True).unsqueeze(2)
        weight = 1.0 + (args.vae_fg_weight - 1.0) * shape_pixels.float()
        with autocast(device):
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen, device=device)
            recon = vae.decode(z).sample
        rec = ((recon.float() - x).abs() * weight).sum() / (weight.sum() * x.shape[1])
        kl = 0.5 * (posterior.mean.float() ** 2 + posterior.var.float() - 1.0 - posterior.logvar.float()).mean()
        loss = rec + args.vae_kl * kl if args.vae_part == "all" else rec
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append((rec.item(), kl.item()) if step % 50 == 0 or step == 1 else None)
        if step % 250 == 0 or step == 1:
            log(f"vae step {step:6d}  l1 {rec.item():.4f}  kl {kl.item():.3f}  {time.perf_counter() - start:6.1f}s")
        if time.perf_counter() - start > args.max_vae_seconds:
            log(f"vae: time limit reached after {step} steps")
            break
    record["vae"] = {"steps": step, "seconds": round(time.perf_counter() - start, 1),
                     "loss_l1_kl_every_50": [l for l in losses if l is not None]}
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_pool(vae, images, device, batch: int = 1024) -> torch.Tensor:
    """Posterior means of every pool image, (N, 16, 1, h, w) float32."""
    out = []
    for start in range(0, len(images), batch):
        with autocast(device):
            out.append(vae.encode(to_model(images[start:start + batch])).latent_dist.mean.float())
    return torch.cat(out)


@torch.no_grad()
def vae_check(vae, pool, images, device, n: int = 512) -> dict:
    """Checker accuracy on VAE reconstructions: the VAE must keep every attribute readable."""
    x = to_model(images[:n])
    with autocast(device):
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample
    return accuracy(list(to_uint8(recon)), [s.caption for s in pool[:n]])


# ----------------------------------------------------------------------------------------------
# DiT
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def caption_embeddings(pipe, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every caption through the pipeline's own ``encode_prompt``, zero-padded to one length with a
    mask (the transformer masks padded text tokens). Captions are encoded in groups of equal token
    count, so no caption is ever padded inside the text encoder: each sees what it sees at inference."""
    lengths = [len(pipe.tokenizer(pipe.prompt_template_encode.format(c)).input_ids) for c in captions]
    embeds: list[torch.Tensor | None] = [None] * len(captions)
    for length in sorted(set(lengths)):
        group = [i for i, n in enumerate(lengths) if n == length]
        for start in range(0, len(group), 256):
            part = group[start:start + 256]
            out = pipe.encode_prompt([captions[i] for i in part], device=device)[0]
            for i, e in zip(part, out):
                embeds[i] = e
    length = max(e.shape[0] for e in embeds)
    dim = embeds[0].shape[1]
    out = torch.zeros(len(embeds), length, dim, dtype=torch.float32, device=device)
    mask = torch.zeros(len(embeds), length, dtype=torch.bool, device=device)
    for i, e in enumerate(embeds):
        out[i, :e.shape[0]] = e
        mask[i, :e.shape[0]] = True
    return out, mask


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(N, C, 1, H, W) -> (N, H/2 * W/2, 4C), QwenImagePipeline._pack_latents' layout."""
    n, c, _, h, w = latents.shape
    x = latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // 2) * (w // 2), c * 4)


def sigma_sampler(scheduler, image_seq_len: int):
    """Training noise levels: logit-normal, then the scheduler's exponential time shift at this length."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    cfg = scheduler.config
    mu = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                         cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
    assert cfg.get("time_shift_type", "exponential") == "exponential"

    def sample(n: int, gen: torch.Generator, device) -> torch.Tensor:
        u = torch.sigmoid(torch.randn(n, generator=gen, device=device))
        return math.exp(mu) / (math.exp(mu) + (1.0 / u - 1.0))

    return sample, mu


def train_dit(args, transformer, scheduler, latents, captions, embeds, mask, negative, device, record):
    transformer.to(device).train()
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    params = [p for p in transformer.parameters() if p.requires_grad]
    ema_params = list(ema.parameters())
    opt = torch.optim.AdamW(params, lr=args.dit_lr, betas=(0.9, 0.99), weight_decay=0.0,
                            fused=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(args.seed + 20)
    n_tokens = latents.shape[-1] * latents.shape[-2] // 4
    side = int(math.isqrt(n_tokens))
    img_shapes = [[(1, side, side)]] * args.dit_batch
    sample_sigma, mu = sigma_sampler(scheduler, n_tokens)
    warmup = args.dit_warmup
    start, losses, running, step = time.perf_counter(), [], None, 0
    for step in range(1, args.dit_steps + 1):
        for group in opt.param_groups:
            group["lr"] = args.dit_lr * min(1.0, step / warmup)
        idx = torch.randint(len(latents), (args.dit_batch,), generator=gen, device=device)
        x0 = latents[idx]
        cap = captions[idx]
        drop = torch.rand(args.dit_batch, generator=gen, device=device) < args.caption_dropout
        cap = torch.where(drop, torch.full_like(cap, negative), cap)
        noise = torch.randn(x0.shape, generator=gen, device=device)
        sigma = sample_sigma(args.dit_batch, gen, device)
        s = sigma.view(-1, 1, 1, 1, 1)
        noisy = (1.0 - s) * x0 + s * noise
        with autocast(device):
            pred = transformer(
                hidden_states=pack(noisy),
                timestep=sigma,
                encoder_hidden_states=embeds[cap],
                encoder_hidden_states_mask=mask[cap],
                img_shapes=img_shapes,
                return_dict=False,
            )[0]
        loss = F.mse_loss(pred.float(), pack(noise - x0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1.0 - (args.ema if step > warmup else 0.0))
        value = loss.item() if (step % 50 == 0 or step == 1) else None
        if value is not None:
            running = value if running is None else 0.9 * running + 0.1 * value
            losses.append(round(value, 5))
        if step % 500 == 0 or step == 1:
            log(f"dit step {step:6d}  loss {value:.4f}  (smoothed {running:.4f})  {time.perf_counter() - start:6.1f}s")
        if time.perf_counter() - start > args.max_dit_seconds:
            log(f"dit: time limit reached after {step} steps")
            break
    record["dit"] = {"steps": step, "seconds": round(time.perf_counter() - start, 1), "mu": mu,
                     "loss_every_50": losses}
    return ema


# ----------------------------------------------------------------------------------------------
# Save and evaluate
# ----------------------------------------------------------------------------------------------


def save_pipeline(base, vae, transformer, out: Path) -> None:
    from diffusers import QwenImagePipeline

    from layerscan import tiny

    vae, transformer = vae.cpu(), transformer.cpu()
    tiny._to_bf16(vae, transformer, base.text_encoder)
    pipe = QwenImagePipeline(scheduler=base.scheduler, vae=vae, text_encoder=base.text_encoder.cpu(),
                             tokenizer=base.tokenizer, transformer=transformer)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)


def read_prompts(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def evaluate(args, out: Path, device, record) -> None:
    """Generate the demo prompts the way layerscan generates its BF16 baseline, and check them."""
    from layerscan.generate import GenerationSpec, generate_image
    from layerscan.pipeline import load_pipeline

    loaded = load_pipeline(str(out), device=device, dtype=torch.bfloat16)
    prompts = read_prompts(DEMO_PROMPTS)[:args.eval_limit]
    spec = GenerationSpec(prompts=tuple(prompts), seeds=(0,), steps=args.eval_steps, height=64, width=64,
                          guidance=args.eval_guidance)
    start = time.perf_counter()
    images = [generate_image(loaded, spec, p, 0) for p in prompts]
    seconds = time.perf_counter() - start
    acc = accuracy(images, prompts)
    failures = [{"prompt": p, **describe(check(im, p))} for im, p in zip(images, prompts) if not check(im, p).correct]
    record["eval_demo_prompts"] = {"accuracy": acc, "seconds": round(seconds, 1), "failures": failures,
                                   "steps": args.eval_steps, "guidance": args.eval_guidance, "seed": 0}
    log(f"BF16 checker accuracy on {len(prompts)} demo prompts: {json.dumps(acc)}")
    for f in failures:
        log(f"  miss: {f['prompt']!r} -> found {f['found']}")
    if args.samples:
        save_grid(images, Path(args.samples))
    if args.eval_random:
        record["eval_random"] = evaluate_random(args, loaded.pipe, device)


PLANT_MAGNITUDE = 2.0**20  # puts the ordinary channels below e4m3's smallest subnormal


@torch.no_grad()
def plant_saved(args, out: Path, device) -> int:
    """``--plant-only``: give the trained pipeline at ``out`` a massive activation in one family.

    Trained at this size, the model's own FP8 sensitivity is at the level of its noise floor
    (per-family effects of about 1 dB on the H200), so a search would chase noise.  Real DiTs
    carry a few channels thousands of times larger than the rest; this plants one such channel
    (``layerscan.plant.plant_massive_activation``: the modulation scales the channel up, the
    family's first Linear scales it back, in BF16 up to the rounding of one bias per block), so
    FP8's per-tensor activation scale erases the ordinary channels there, on every device alike.
    """
    from diffusers import DiffusionPipeline

    from layerscan.plant import plant_massive_activation

    path = out / "training.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    if record.get("planted"):
        raise SystemExit(f"{out} is already planted ({record['planted']['family']}): planting twice "
                         "multiplies the channel twice; plant a fresh training run")
    pipe = DiffusionPipeline.from_pretrained(out, torch_dtype=torch.bfloat16)
    plant_massive_activation(pipe, args.plant_only, None, magnitude=PLANT_MAGNITUDE, branch_gain=1.0)
    # Only the transformer changed; the record is written with it, before anything else can
    # fail, so a second --plant-only always sees it.
    pipe.transformer.save_pretrained(out / "transformer", safe_serialization=True)
    record["planted"] = {"family": args.plant_only, "blocks": "all", "channel": 0,
                         "magnitude": PLANT_MAGNITUDE, "branch_gain": 1.0}
    path.write_text(json.dumps(record, indent=1) + "\n")
    log(f"planted a massive activation into {args.plant_only} of every block of {out}")
    if not args.no_eval:
        here: dict = {"after": "planting",
                      "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type}
        evaluate(args, out, device, here)
        record.setdefault("evaluations", []).append(here)
        path.write_text(json.dumps(record, indent=1) + "\n")
    return 0


def evaluate_saved(args, out: Path, device) -> int:
    """``--eval-only``: the checks of a finished run, made again here (e.g. on the CPU users have)."""
    path = out / "training.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    here: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
                  "versions": {"torch": torch.__version__}}
    evaluate(args, out, device, here)
    record.setdefault("evaluations", []).append(here)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return 0


@torch.no_grad()
def evaluate_random(args, pipe, device, batch: int = 128) -> dict:
    """Checker accuracy on captions of fresh seeded scenes (unseen seed), generated in batches."""
    captions = [s.caption for s in scenes.sample_scenes(args.eval_random, args.seed + 1000)]
    images = []
    for start in range(0, len(captions), batch):
        part = captions[start:start + batch]
        gens = [torch.Generator().manual_seed(start + i) for i in range(len(part))]
        out = pipe(prompt=part, negative_prompt=[NEGATIVE_PROMPT] * len(part), true_cfg_scale=args.eval_guidance,
                   height=64, width=64, num_inference_steps=args.eval_steps, generator=gens, output_type="np")
        images += [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in out.images]
    acc = accuracy(images, captions)
    log(f"BF16 checker accuracy on {len(captions)} random captions: {json.dumps(acc)}")
    return acc


def save_grid(images: list[np.ndarray], path: Path, columns: int = 9) -> None:
    from PIL import Image

    h, w, _ = images[0].shape
    rows = math.ceil(len(images) / columns)
    grid = np.full((rows * (h + 2), columns * (w + 2), 3), 255, dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = im
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    out = Path(args.out)
    if args.eval_only:
        return evaluate_saved(args, out, device)
    if args.plant_only:
        return plant_saved(args, out, device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    t0 = time.perf_counter()
    record = {"args": {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in vars(args).items()},
              "versions": {"torch": torch.__version__, "python": platform.python_version()}}
    import diffusers
    import transformers

    record["versions"].update(diffusers=diffusers.__version__, transformers=transformers.__version__)
    if device.type == "cuda":
        record["device"] = torch.cuda.get_device_name(device)

    base, vae, transformer = build_components(args)
    record["parameters"] = {"transformer": count(transformer), "vae": count(vae), "text_encoder": count(base.text_encoder)}
    log(f"parameters: {record['parameters']}")

    pool, images, captions, backgrounds = render_pool(args, device)
    log(f"rendered {len(pool)} scenes in {time.perf_counter() - t0:.1f}s")

    if args.init and (Path(args.init) / "training.json").is_file():
        record["init"] = {"dir": str(args.init),
                          "record": json.loads((Path(args.init) / "training.json").read_text())}
    if args.vae_steps > 0:
        train_vae(args, vae, images, backgrounds, device, record)
    else:
        vae.to(device).eval()
        record["vae"] = {"steps": 0}
    record["vae"]["checker_on_reconstructions"] = vae_check(vae, pool, images, device)
    log(f"checker on VAE reconstructions: {record['vae']['checker_on_reconstructions']}")
    latents = encode_pool(vae, images, device)
    mean = latents.mean(dim=(0, 2, 3, 4))
    std = latents.std(dim=(0, 2, 3, 4))
    if not (args.init and args.vae_part == "decoder"):  # a kept encoder keeps the DiT's latent statistics
        vae.register_to_config(latents_mean=[round(v, 6) for v in mean.tolist()],
                               latents_std=[round(v, 6) for v in std.tolist()])
    mean_t = torch.tensor(vae.config.latents_mean, device=device).view(1, -1, 1, 1, 1)
    std_t = torch.tensor(vae.config.latents_std, device=device).view(1, -1, 1, 1, 1)
    latents = ((latents - mean_t) / std_t).contiguous()
    del images, backgrounds
    log(f"encoded pool to {tuple(latents.shape)}; latent std per channel {[round(v, 3) for v in std.tolist()]}")

    from diffusers import QwenImagePipeline

    base.text_encoder.to(device)
    encoder_pipe = QwenImagePipeline(scheduler=base.scheduler, vae=vae, text_encoder=base.text_encoder,
                                     tokenizer=base.tokenizer, transformer=transformer)
    all_caps = scenes.all_captions() + [NEGATIVE_PROMPT]
    embeds, mask = caption_embeddings(encoder_pipe, all_caps, device)
    log(f"caption embeddings {tuple(embeds.shape)} in {time.perf_counter() - t0:.1f}s total")

    ema = train_dit(args, transformer, base.scheduler, latents, captions, embeds, mask, len(all_caps) - 1,
                    device, record)
    del latents, transformer
    save_pipeline(base, vae, ema, out)
    record["seconds_to_save"] = round(time.perf_counter() - t0, 1)
    sizes = {p.relative_to(out).as_posix(): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    record["bytes"] = sum(sizes.values())
    log(f"saved {out} ({record['bytes'] / 1e6:.1f} MB) after {record['seconds_to_save']}s")

    if not args.no_eval:
        try:
            evaluate(args, out, device, record)
        except Exception as exc:  # the trained pipeline is already saved: report, don't lose it
            import traceback

            traceback.print_exc()
            record["eval_error"] = f"{type(exc).__name__}: {exc}"
    record["seconds_total"] = round(time.perf_counter() - t0, 1)
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    log(f"done in {record['seconds_total']}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
