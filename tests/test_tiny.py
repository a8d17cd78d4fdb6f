"""Tests for the built-in tiny pipelines: real builds, real saves, real reloads, real generation."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline, QwenImagePipeline, WanPipeline, ZImagePipeline
from safetensors import safe_open

from layerscan import fp8, plant, tiny
from layerscan.errors import UserError

QWEN, FLUX, ZIMAGE, WAN = "tiny-qwen-image", "tiny-flux", "tiny-z-image", "tiny-wan2.2"
PIPELINE_CLASSES = {QWEN: QwenImagePipeline, FLUX: FluxPipeline, ZIMAGE: ZImagePipeline, WAN: WanPipeline}
# Qwen-Image runs true CFG (needs a negative prompt); FLUX.1-dev style takes distilled guidance;
# Z-Image and Wan run classic CFG; Wan makes videos, and 5 frames are 2 latent frames.
CALL_ARGS = {
    QWEN: {"true_cfg_scale": 4.0, "negative_prompt": " "},
    FLUX: {"guidance_scale": 3.5},
    ZIMAGE: {"guidance_scale": 4.0},
    WAN: {"guidance_scale": 4.0, "num_frames": 5},
}
OUTPUT_SHAPES = {QWEN: (1, 32, 32, 3), FLUX: (1, 32, 32, 3), ZIMAGE: (1, 32, 32, 3), WAN: (1, 5, 32, 32, 3)}


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """These models are far too small to gain from intra-op threads, and on a shared 2-core machine a
    busy neighbour makes torch's thread pool spin: generation went from 0.1 s to 6 s in measurements."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: tiny.build_tiny_pipeline(name, root / name) for name in tiny.TINY_ARCHITECTURES}


@pytest.fixture(scope="module")
def loaded(built: dict[str, Path]) -> dict[str, DiffusionPipeline]:
    return {name: DiffusionPipeline.from_pretrained(path, dtype=torch.bfloat16) for name, path in built.items()}


def generate(pipe: DiffusionPipeline, name: str, seed: int = 0, prompt: str = "a red circle") -> np.ndarray:
    """Images (or Wan's video frames: the output's first field either way) as a float array."""
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt=prompt,
        height=32,
        width=32,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **CALL_ARGS[name],
    )
    return out[0]


def qwen_transformer_inputs() -> dict:
    """A fixed transformer input for the 16 image tokens of a 32 px image and 8 text tokens."""
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, 16, 64, generator=g).to(torch.bfloat16),
        encoder_hidden_states=torch.randn(1, 8, 32, generator=g).to(torch.bfloat16),
        timestep=torch.tensor([0.5], dtype=torch.bfloat16),
        img_shapes=[[(1, 4, 4)]],
        return_dict=False,
    )


def run_capturing(transformer: torch.nn.Module, family: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Transformer output plus, per block, the input of ``family``'s first Linear."""
    captured: list[torch.Tensor] = []
    hooks = [
        block.get_submodule(f"{family}.net.0.proj").register_forward_pre_hook(
            lambda _m, args: captured.append(args[0].detach().float())
        )
        for block in transformer.transformer_blocks
    ]
    try:
        with torch.no_grad():
            out = transformer(**qwen_transformer_inputs())[0].float()
    finally:
        for h in hooks:
            h.remove()
    return out, captured


@pytest.mark.parametrize("name", [QWEN, FLUX, ZIMAGE, WAN])
def test_reloaded_pipeline_generates_finite_deterministic_images(
    name: str, built: dict[str, Path], loaded: dict[str, DiffusionPipeline]
) -> None:
    index = json.loads((built[name] / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINE_CLASSES[name].__name__
    pipe = loaded[name]
    assert type(pipe) is PIPELINE_CLASSES[name]
    assert type(pipe.transformer).__name__ == tiny.TINY_ARCHITECTURES[name].transformer_class

    files = sorted(built[name].rglob("*.safetensors"))
    assert {f.parent.name for f in files} >= {"transformer", "vae", "text_encoder"}
    for f in files:
        with safe_open(f, "pt") as st:
            assert {st.get_slice(k).get_dtype() for k in st.keys()} == {"BF16"}, f

    image = generate(pipe, name)
    assert image.shape == OUTPUT_SHAPES[name]
    assert np.isfinite(image).all() and image.std() > 1e-3
    assert np.array_equal(image, generate(pipe, name)), "same seed must give the same image bits"
    assert not np.array_equal(image, generate(pipe, name, seed=1))


def test_build_is_deterministic(built: dict[str, Path], tmp_path: Path) -> None:
    for name, first in built.items():
        again = tiny.build_tiny_pipeline(name, tmp_path / name, seed=0)
        files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
        for rel in files:  # weights, tokenizer and configs alike
            assert (first / rel).read_bytes() == (again / rel).read_bytes(), f"{name}/{rel}"
    other = tiny.build_tiny_pipeline(FLUX, tmp_path / "seed1", seed=1)
    rel = Path("transformer/diffusion_pytorch_model.safetensors")
    assert (other / rel).read_bytes() != (built[FLUX] / rel).read_bytes()


def test_qwen_template_prefix_is_exactly_the_dropped_tokens(loaded: dict[str, DiffusionPipeline]) -> None:
    pipe = loaded[QWEN]
    tok = pipe.tokenizer
    assert pipe.prompt_template_encode.split("{}")[0] == tiny.QWEN_TEMPLATE_PREFIX
    assert len(tok(tiny.QWEN_TEMPLATE_PREFIX).input_ids) == pipe.prompt_template_encode_start_idx == 34
    full = tok(pipe.prompt_template_encode.format("a red circle")).input_ids
    assert tok.convert_ids_to_tokens(full[34:37]) == ["a", "Ġred", "Ġcircle"]


def test_qwen_prompt_words_reach_the_embeddings(loaded: dict[str, DiffusionPipeline]) -> None:
    pipe = loaded[QWEN]
    red, _ = pipe.encode_prompt("a red circle", device="cpu")
    blue, _ = pipe.encode_prompt("a blue circle", device="cpu")
    # 3 prompt tokens + the template suffix "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n".
    assert red.shape == blue.shape == (1, 3 + 5, 32)
    assert torch.equal(red[:, 0], blue[:, 0])  # causal encoder: "a" has not seen the colour yet
    assert not torch.equal(red[:, 1:], blue[:, 1:])
    odd, _ = pipe.encode_prompt("Zyzzyva qwxj!", device="cpu")  # unknown words degrade to byte pieces
    assert odd.shape[1] > 2 + 5 and torch.isfinite(odd).all()


def test_flux_prompt_words_reach_the_embeddings(loaded: dict[str, DiffusionPipeline]) -> None:
    pipe = loaded[FLUX]
    red, red_pooled, _ = pipe.encode_prompt("a red circle", prompt_2=None, device="cpu", max_sequence_length=16)
    blue, blue_pooled, _ = pipe.encode_prompt("a blue circle", prompt_2=None, device="cpu", max_sequence_length=16)
    assert red.shape == (1, 16, 32) and red_pooled.shape == (1, 32)
    assert not torch.equal(red, blue) and not torch.equal(red_pooled, blue_pooled)
    assert pipe.tokenizer.unk_token_id not in pipe.tokenizer("a red circle", add_special_tokens=False).input_ids
    assert pipe.tokenizer_2.unk_token_id not in pipe.tokenizer_2("a red circle").input_ids


def test_reloaded_tokenizers_keep_vocabulary_words_whole(loaded: dict[str, DiffusionPipeline]) -> None:
    qwen, flux = loaded[QWEN].tokenizer, loaded[FLUX]
    split = {
        "qwen": [w for w in tiny._words() for v in (w, " " + w, w.capitalize()) if len(qwen(v).input_ids) != 1],
        "clip": [w for w in tiny._words() if len(flux.tokenizer(w, add_special_tokens=False).input_ids) != 1],
        "t5": [w for w in tiny._words() if len(flux.tokenizer_2(w, add_special_tokens=False).input_ids) != 1],
    }
    assert split == {"qwen": [], "clip": [], "t5": []}
    assert len(tiny._words()) >= 300


def test_tiny_pipeline_dir_builds_once_into_the_cache(
    built: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAYERSCAN_CACHE", str(tmp_path))
    path = tiny.tiny_pipeline_dir(FLUX)
    assert path == tmp_path / "tiny" / "tiny-flux-v1"
    assert [p.name for p in (tmp_path / "tiny").iterdir()] == ["tiny-flux-v1"], "no temp dir left behind"
    weights = path / "transformer" / "diffusion_pytorch_model.safetensors"
    assert weights.read_bytes() == (built[FLUX] / weights.relative_to(path)).read_bytes()
    stamp = (path / "model_index.json").stat().st_mtime_ns
    assert tiny.tiny_pipeline_dir(FLUX) == path
    assert (path / "model_index.json").stat().st_mtime_ns == stamp, "second call must reuse the cache"

    with pytest.raises(UserError, match="tiny-flux.*tiny-qwen-image"):
        tiny.tiny_pipeline_dir("tiny-sdxl")
    with pytest.raises(UserError, match="tiny-flux.*tiny-qwen-image"):
        tiny.build_tiny_pipeline("tiny-sdxl", tmp_path / "x")


def fp8_linear_error(x: torch.Tensor, weight: torch.Tensor) -> float:
    """Relative error of ``x @ weight.T`` when ``x`` is cast to FP8 E4M3 with one per-tensor scale."""
    scale = x.abs().amax() / 448.0
    x8 = (x / scale).to(torch.float8_e4m3fn).float() * scale
    ref = x @ weight.float().T
    return ((x8 @ weight.float().T - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("family", ["img_mlp", "txt_mlp"])
def test_planted_channel_is_massive_but_bf16_output_holds(family: str, loaded: dict[str, DiffusionPipeline]) -> None:
    transformer = loaded[QWEN].transformer
    planted = copy.deepcopy(transformer)
    magnitude, channel, blocks = 1e5, 3, [0, 2]
    plant.plant_massive_activation(planted, family, blocks=blocks, magnitude=magnitude, channel=channel,
                                   branch_gain=1.0)

    out, acts = run_capturing(transformer, family)
    out_planted, acts_planted = run_capturing(planted, family)
    for b, (a, ap) in enumerate(zip(acts, acts_planted)):
        if b in blocks:
            ratio = (ap[..., channel].norm() / a[..., channel].norm()).item()
            assert ratio == pytest.approx(magnitude, rel=0.02), (b, ratio)
            others = torch.cat([ap[..., :channel], ap[..., channel + 1 :]], dim=-1)
            assert ap[..., channel].abs().amax() > 1e3 * others.abs().amax()
            weight = transformer.transformer_blocks[b].get_submodule(f"{family}.net.0.proj").weight
            weight_planted = planted.transformer_blocks[b].get_submodule(f"{family}.net.0.proj").weight
            # The reason it exists: per-tensor FP8 of the planted input squashes the ordinary channels.
            assert fp8_linear_error(ap, weight_planted) > 2 * fp8_linear_error(a, weight)
        else:
            assert ap.abs().amax() < 1e3
    # Only rounding differences remain in BF16 (the text stream's last MLP does not reach the output).
    assert ((out_planted - out).abs().mean() / out.abs().mean()).item() < 0.01


def test_save_planted_round_trips_and_generates_close_image(
    loaded: dict[str, DiffusionPipeline], tmp_path: Path
) -> None:
    path = tiny.save_planted(QWEN, "img_mlp", [1], tmp_path / "planted", branch_gain=1.0)
    pipe = DiffusionPipeline.from_pretrained(path, dtype=torch.bfloat16)
    expected = copy.deepcopy(loaded[QWEN].transformer)
    plant.plant_massive_activation(expected, "img_mlp", [1], branch_gain=1.0)
    got = pipe.transformer.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.state_dict().items())
    key = "transformer_blocks.1.img_mod.1.bias"
    assert not torch.equal(got[key], loaded[QWEN].transformer.state_dict()[key]), "nothing was planted"

    image, reference = generate(pipe, QWEN), generate(loaded[QWEN], QWEN)
    assert np.isfinite(image).all()
    assert np.abs(image - reference).mean() < 0.02


def test_plant_rejects_what_it_cannot_do(loaded: dict[str, DiffusionPipeline]) -> None:
    with pytest.raises(UserError, match="QwenImageTransformer2DModel"):
        plant.plant_massive_activation(loaded[FLUX], "img_mlp")
    planted = copy.deepcopy(loaded[QWEN].transformer)
    with pytest.raises(UserError, match="img_mlp, txt_mlp"):
        plant.plant_massive_activation(planted, "attn")
    with pytest.raises(UserError, match="out of range"):
        plant.plant_massive_activation(planted, "img_mlp", blocks=[4])
    with pytest.raises(UserError, match="out of range"):
        plant.plant_massive_activation(planted, "img_mlp", channel=64)


# ----------------------------------------------------------------------------------------------
# Z-Image and Wan 2.2
# ----------------------------------------------------------------------------------------------


def test_wan_runs_the_high_noise_expert_then_the_low_noise_one(
    built: dict[str, Path], loaded: dict[str, DiffusionPipeline]
) -> None:
    index = json.loads((built[WAN] / "model_index.json").read_text())
    assert index["boundary_ratio"] == 0.875
    assert index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    assert index["scheduler"] == ["diffusers", "UniPCMultistepScheduler"]
    pipe = loaded[WAN]
    high, low = pipe.transformer.state_dict(), pipe.transformer_2.state_dict()
    assert not all(torch.equal(high[k], low[k]) for k in high), "the experts must be different models"

    calls: list[tuple[str, float]] = []
    hooks = [
        getattr(pipe, expert).register_forward_pre_hook(
            lambda _m, _a, kwargs, expert=expert: calls.append((expert, float(kwargs["timestep"][0]))),
            with_kwargs=True,
        )
        for expert in ("transformer", "transformer_2")
    ]
    try:
        generate(pipe, WAN)
    finally:
        for h in hooks:
            h.remove()
    # Two calls (conditional, unconditional) per step; t = 999, 900 | 750, 500 around t = 875.
    assert [e for e, _ in calls] == ["transformer"] * 4 + ["transformer_2"] * 4
    assert all(t >= 875 for e, t in calls if e == "transformer")
    assert all(t < 875 for e, t in calls if e == "transformer_2")


def test_z_image_prompts_go_through_the_qwen3_chat_template(loaded: dict[str, DiffusionPipeline]) -> None:
    pipe = loaded[ZIMAGE]
    tok = pipe.tokenizer
    assert type(tok).__name__ == "Qwen2Tokenizer" and type(pipe.text_encoder).__name__ == "Qwen3Model"
    assert pipe.text_encoder.config.num_hidden_layers == 4
    messages = [{"role": "user", "content": "a red circle"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert text == "<|im_start|>user\na red circle<|im_end|>\n<|im_start|>assistant\n"
    no_think = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert no_think == text + "<think>\n\n</think>\n\n"
    assert {"<think>", "</think>"} <= set(tok.convert_ids_to_tokens(tok(no_think).input_ids)), "one token each"

    red, _ = pipe.encode_prompt("a red circle", device="cpu", do_classifier_free_guidance=False)
    blue, _ = pipe.encode_prompt("a blue circle", device="cpu", do_classifier_free_guidance=False)
    # Padding is masked out: "<|im_start|>", "user", "\n", 3 prompt tokens, then the 5 closing ones.
    assert red[0].shape == blue[0].shape == (3 + 3 + 5, 32)
    assert torch.equal(red[0][:4], blue[0][:4]) and not torch.equal(red[0][4:], blue[0][4:])


def run_text_encoder(pipe: DiffusionPipeline, text_encoder: torch.nn.Module, hidden_state: int,
                     fp8_layer: str | None = None) -> torch.Tensor:
    """``text_encoder``'s ``hidden_states[hidden_state]`` at the unpadded tokens of two prompts in
    ``pipe``'s template, optionally with one Linear run W8A8 (per-tensor FP8 weight, per-token FP8
    input, as ``layerscan.fp8`` runs DiT layers)."""
    prompts = ("a red circle on a white background", "two small blue squares")
    if hasattr(pipe, "prompt_template_encode"):  # Qwen-Image formats prompts itself
        texts = [pipe.prompt_template_encode.format(p) for p in prompts]
    else:  # Z-Image through the tokenizer's chat template
        texts = [pipe.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                    add_generation_prompt=True) for p in prompts]
    enc = pipe.tokenizer(texts, padding="max_length", max_length=64, return_tensors="pt")
    mask = enc.attention_mask.bool()
    hook = None
    if fp8_layer is not None:
        def run_fp8(module: torch.nn.Linear, args: tuple, _out: torch.Tensor) -> torch.Tensor:
            weight_fp8, scale = fp8.quantize_per_tensor(module.weight)
            return fp8.fp8_linear(args[0], weight_fp8, scale, module.bias, "token")
        hook = text_encoder.get_submodule(fp8_layer).register_forward_hook(run_fp8)
    try:
        with torch.no_grad():
            states = text_encoder(input_ids=enc.input_ids, attention_mask=mask,
                                  output_hidden_states=True).hidden_states
    finally:
        if hook is not None:
            hook.remove()
    return states[hidden_state][mask].float()


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return ((x - reference).norm() / reference.norm()).item()


def test_text_encoder_plant_keeps_bf16_and_concentrates_fp8_error(loaded: dict[str, DiffusionPipeline]) -> None:
    pipe = loaded[ZIMAGE]
    text_encoder = pipe.text_encoder
    planted = copy.deepcopy(text_encoder)
    plant.plant_text_encoder_activation(planted, 1)

    captured: list[torch.Tensor] = []
    hook = planted.layers[1].mlp.gate_proj.register_forward_pre_hook(lambda _m, a: captured.append(a[0].float()))
    # ZImagePipeline reads hidden_states[-2]: the output of decoder layer 2 of 0..3.
    out, out_planted = run_text_encoder(pipe, text_encoder, -2), run_text_encoder(pipe, planted, -2)
    hook.remove()
    # Power-of-two scaling and compensation: measured relative error 0.0, the output is bit-identical.
    assert torch.equal(out_planted, out)
    x = captured[0]
    assert (x[..., 0].abs() > 1e4 * x[..., 1:].abs().amax(dim=-1)).float().mean() > 0.9, "massive in most tokens"

    linears = [n for n, m in text_encoder.named_modules() if isinstance(m, torch.nn.Linear)]
    errors = {n: relative_error(run_text_encoder(pipe, planted, -2, n), out) for n in linears}
    plain = {n: relative_error(run_text_encoder(pipe, text_encoder, -2, n), out) for n in linears}
    # Measured: 0.35 at the planted gate_proj/up_proj, at most 0.05 anywhere else or unplanted.
    hit = {"layers.1.mlp.gate_proj", "layers.1.mlp.up_proj"}
    assert min(errors[n] for n in hit) > 0.2
    assert max(e for n, e in errors.items() if n not in hit) < 0.1
    assert max(plain.values()) < 0.1
    # The last decoder layer never reaches hidden_states[-2]: FP8 there changes nothing at all.
    assert all(errors[n] == 0.0 for n in linears if n.startswith("layers.3."))


def test_text_encoder_plant_in_qwen2_5_vl_attention_input(loaded: dict[str, DiffusionPipeline]) -> None:
    pipe = loaded[QWEN]
    planted = copy.deepcopy(pipe.text_encoder)
    plant.plant_text_encoder_activation(planted, 0, site="attn", channel=5)
    out = run_text_encoder(pipe, pipe.text_encoder, -1)
    assert torch.equal(run_text_encoder(pipe, planted, -1), out)
    layers = "model.language_model.layers.0.self_attn"
    errors = {n: relative_error(run_text_encoder(pipe, planted, -1, f"{layers}.{n}"), out)
              for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert errors["v_proj"] > 0.1 and errors["o_proj"] < 0.05, errors


def wan_transformer_output(transformer: torch.nn.Module, timestep: float,
                           fp8_layer: str | None = None) -> torch.Tensor:
    """One Wan expert's output for a fixed 2-frame 4x4 latent and 16 text tokens, optionally with
    one Linear run W8A8 through the FP8 engine's own layer class."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 2, 4, 4, generator=g).to(torch.bfloat16)
    text = torch.randn(1, 16, 32, generator=g).to(torch.bfloat16)
    module = None
    if fp8_layer is not None:
        module = fp8.Fp8Linear.convert(transformer.get_submodule(fp8_layer))
        module.set_precision(True)
    try:
        with torch.no_grad():
            out = transformer(hidden_states=latents, timestep=torch.tensor([timestep]),
                              encoder_hidden_states=text, return_dict=False)[0]
    finally:
        if module is not None:
            module.set_precision(False)
    return out.float()


@pytest.mark.parametrize("expert", ["transformer", "transformer_2"])
def test_wan_plant_keeps_bf16_and_concentrates_fp8_error(expert: str, loaded: dict[str, DiffusionPipeline]) -> None:
    pipe = copy.deepcopy(loaded[WAN])
    reference = {e: copy.deepcopy(getattr(pipe, e)) for e in ("transformer", "transformer_2")}
    plant.plant_wan_activation(pipe, "ffn", expert=expert, channel=7)
    other = "transformer_2" if expert == "transformer" else "transformer"
    untouched = reference[other].state_dict()
    assert all(torch.equal(v, untouched[k]) for k, v in getattr(pipe, other).state_dict().items())

    planted, original = getattr(pipe, expert), reference[expert]
    captured: list[torch.Tensor] = []
    hook = planted.blocks[1].ffn.net[0].proj.register_forward_pre_hook(lambda _m, a: captured.append(a[0].float()))
    for t in (999.0, 500.0):  # the planted scale must hold at every timestep: it is time-dependent
        out = wan_transformer_output(original, t)
        # Measured 0.0 (bit-identical) at both timesteps: loaded tables are float32, where the
        # planted M * (1 + scale) - 1 is exact to ~1e-7; 1e-3 leaves room for that rounding.
        assert relative_error(wan_transformer_output(planted, t), out) < 1e-3
    hook.remove()
    x = captured[0][0]
    assert (x[:, 7].abs() > 1e4 * torch.cat([x[:, :7], x[:, 8:]], dim=-1).abs().amax(dim=-1)).all()

    linears = [n for n, m in original.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("blocks.")]
    out = wan_transformer_output(original, 999.0)
    errors = {n: relative_error(wan_transformer_output(planted, 999.0, n), out) for n in linears}
    plain = {n: relative_error(wan_transformer_output(original, 999.0, n), out) for n in linears}
    # Measured: 0.024-0.044 at the planted ffn.net.0.proj, at most 0.006 anywhere else or unplanted.
    hit = {"blocks.0.ffn.net.0.proj", "blocks.1.ffn.net.0.proj"}
    assert min(errors[n] for n in hit) > 0.015
    assert max(e for n, e in errors.items() if n not in hit) < 0.01
    assert max(plain.values()) < 0.01


def test_saved_planted_pipelines_round_trip_and_generate_the_same_output(
    loaded: dict[str, DiffusionPipeline], tmp_path: Path
) -> None:
    path = tiny.save_planted_text_encoder(ZIMAGE, 0, tmp_path / "z", site="mlp")
    pipe = DiffusionPipeline.from_pretrained(path, dtype=torch.bfloat16)
    expected = copy.deepcopy(loaded[ZIMAGE].text_encoder)
    plant.plant_text_encoder_activation(expected, 0)
    got = pipe.text_encoder.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.state_dict().items())
    assert not torch.equal(got["layers.0.post_attention_layernorm.weight"],
                           loaded[ZIMAGE].text_encoder.state_dict()["layers.0.post_attention_layernorm.weight"])
    # Measured: bit-identical images (BF16 text encoder output unchanged bit for bit).
    assert np.array_equal(generate(pipe, ZIMAGE), generate(loaded[ZIMAGE], ZIMAGE))

    path = tiny.save_planted(WAN, "ffn", None, tmp_path / "wan", expert="transformer_2")
    pipe = DiffusionPipeline.from_pretrained(path, dtype=torch.bfloat16)
    key = "condition_embedder.time_proj.weight"
    assert torch.equal(pipe.transformer.state_dict()[key], loaded[WAN].transformer.state_dict()[key])
    assert not torch.equal(pipe.transformer_2.state_dict()[key], loaded[WAN].transformer_2.state_dict()[key])
    video, reference = generate(pipe, WAN), generate(loaded[WAN], WAN)
    # The planted scale row M * (1 + scale) - 1 was saved in BF16 (8 significant bits), a 0.4% error
    # in one channel's scale; measured 0.0011 mean change on [0, 1] pixels.
    assert np.isfinite(video).all() and np.abs(video - reference).mean() < 0.005


def test_wan_and_text_encoder_plants_reject_what_they_cannot_do(loaded: dict[str, DiffusionPipeline]) -> None:
    wan = loaded[WAN]
    with pytest.raises(UserError, match="expert must be one of transformer, transformer_2"):
        plant.plant_wan_activation(wan, "ffn")
    transformer = copy.deepcopy(wan.transformer)
    with pytest.raises(UserError, match="all blocks"):
        plant.plant_wan_activation(transformer, "ffn", blocks=[1])
    with pytest.raises(UserError, match="supported: ffn"):
        plant.plant_wan_activation(transformer, "attn1")
    with pytest.raises(UserError, match="out of range"):
        plant.plant_wan_activation(transformer, "ffn", channel=64)
    with pytest.raises(UserError, match="plant_wan_activation"):
        plant.plant_massive_activation(transformer, "img_mlp")
    with pytest.raises(UserError, match="not a Qwen-style text encoder"):
        plant.plant_text_encoder_activation(wan, 0)  # UMT5
    text_encoder = copy.deepcopy(loaded[ZIMAGE].text_encoder)
    with pytest.raises(UserError, match="4 decoder layers"):
        plant.plant_text_encoder_activation(text_encoder, 4)
    with pytest.raises(UserError, match="supported: mlp, attn"):
        plant.plant_text_encoder_activation(text_encoder, 0, site="down_proj")
    with pytest.raises(UserError, match="out of range"):
        plant.plant_text_encoder_activation(text_encoder, 0, channel=32)
    with pytest.raises(UserError, match="positive finite"):
        plant.plant_text_encoder_activation(text_encoder, 0, magnitude=0.0)
