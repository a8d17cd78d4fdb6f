"""Tests for the built-in tiny pipelines: real builds, real saves, real reloads, real generation."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline, QwenImagePipeline
from safetensors import safe_open

from layerscan import tiny
from layerscan.errors import UserError

QWEN, FLUX = "tiny-qwen-image", "tiny-flux"
PIPELINE_CLASSES = {QWEN: QwenImagePipeline, FLUX: FluxPipeline}
# Qwen-Image runs true CFG (needs a negative prompt); FLUX.1-dev style takes distilled guidance.
GUIDANCE = {QWEN: {"true_cfg_scale": 4.0, "negative_prompt": " "}, FLUX: {"guidance_scale": 3.5}}


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
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt=prompt,
        height=32,
        width=32,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **GUIDANCE[name],
    )
    return out.images


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


@pytest.mark.parametrize("name", [QWEN, FLUX])
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
    assert image.shape == (1, 32, 32, 3)
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
    tiny.plant_massive_activation(planted, family, blocks=blocks, magnitude=magnitude, channel=channel,
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
    tiny.plant_massive_activation(expected, "img_mlp", [1], branch_gain=1.0)
    got = pipe.transformer.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.state_dict().items())
    key = "transformer_blocks.1.img_mod.1.bias"
    assert not torch.equal(got[key], loaded[QWEN].transformer.state_dict()[key]), "nothing was planted"

    image, reference = generate(pipe, QWEN), generate(loaded[QWEN], QWEN)
    assert np.isfinite(image).all()
    assert np.abs(image - reference).mean() < 0.02


def test_plant_rejects_what_it_cannot_do(loaded: dict[str, DiffusionPipeline]) -> None:
    with pytest.raises(UserError, match="QwenImageTransformer2DModel"):
        tiny.plant_massive_activation(loaded[FLUX], "img_mlp")
    planted = copy.deepcopy(loaded[QWEN].transformer)
    with pytest.raises(UserError, match="img_mlp, txt_mlp"):
        tiny.plant_massive_activation(planted, "attn")
    with pytest.raises(UserError, match="out of range"):
        tiny.plant_massive_activation(planted, "img_mlp", blocks=[4])
    with pytest.raises(UserError, match="out of range"):
        tiny.plant_massive_activation(planted, "img_mlp", channel=64)
