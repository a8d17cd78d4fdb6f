"""In-place switching on real (tiny) diffusers pipelines, exact weight bytes, the baseline cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from layerscan.engine import Fp8Engine
from layerscan.errors import UserError
from layerscan.fp8 import FP8_DTYPE, Fp8Linear, fp8_storage_bytes, has_fp8_weight_storage
from layerscan.generate import GenerationSpec, generate_image, load_or_build_baseline, read_prompts
from layerscan.pipeline import load_pipeline

SPEC = GenerationSpec(("a red circle", "a blue square on the left"), (0,), steps=2, height=32,
                      width=32, guidance=4.0)


@pytest.fixture(scope="module")
def qwen(tiny_qwen_dir):
    loaded = load_pipeline(str(tiny_qwen_dir), "cpu")
    return loaded, Fp8Engine(loaded)


@pytest.fixture(scope="module")
def qwen_seed(tiny_qwen_dir):
    loaded = load_pipeline(str(tiny_qwen_dir), "cpu", target="seed")
    return loaded, Fp8Engine(loaded)


def _image(loaded, prompt="a red circle", seed=0):
    return generate_image(loaded, SPEC, prompt, seed)


def test_switching_back_to_bf16_is_bit_exact(qwen):
    loaded, engine = qwen
    engine.apply(None)
    bf16 = _image(loaded)
    engine.apply([])
    fp8_all = _image(loaded)
    engine.apply(["img_mlp"])
    partial = _image(loaded)
    engine.apply(None)
    assert np.array_equal(_image(loaded), bf16)
    assert not np.array_equal(fp8_all, bf16)  # FP8 really changes the computation
    assert not np.array_equal(partial, fp8_all)


def test_apply_sets_exactly_the_unmatched_layers_to_fp8(qwen):
    loaded, engine = qwen
    engine.apply(["img_mlp", "to_add_out"])
    quantized = set(engine.quantized_layers())
    names = {l.name for l in loaded.index.layers}
    assert quantized == {n for n in names if "img_mlp" not in n and "to_add_out" not in n}
    for layer in loaded.index.layers:
        modules = dict(loaded.components[layer.component].named_modules())
        for name in layer.modules:
            module = modules[name]
            assert isinstance(module, Fp8Linear)
            assert module.fp8_enabled == (layer.name in quantized)
            assert module.weight_fp8.dtype == FP8_DTYPE
    # Shards of a fused layer share one scale, as vLLM quantizes the fused weight.
    modules = dict(loaded.transformer.named_modules())
    qkv = next(l for l in loaded.index.layers if l.engine_name.endswith("to_qkv"))
    scales = {float(modules[n].weight_scale) for n in qkv.modules}
    assert len(scales) == 1
    # vllm-omni 0.30.0 loads Qwen-Image's text encoder unquantized: it stays as loaded.
    assert not isinstance(loaded.pipe.text_encoder.model.language_model.layers[0].mlp.down_proj, Fp8Linear)
    assert not isinstance(loaded.pipe.text_encoder.model.visual.blocks[0].mlp.down_proj, Fp8Linear)
    # The VAE is not quantized: no FP8 storage; on the CPU it runs in FP32 (see load_pipeline).
    vae = loaded.pipe.vae
    conv_in = vae.decoder.conv_in
    assert not hasattr(conv_in, "_layerscan_fp8_storage") and conv_in.weight.dtype == torch.float32
    assert vae.encoder.conv_in.weight.dtype == torch.bfloat16  # encoded latents feed the BF16 DiT
    # Weight bytes are what serving holds (BF16), not this CPU's FP32 decoder.
    assert engine.weight_bytes([])["vae"] == 2 * sum(p.numel() for p in vae.parameters())
    engine.apply(None)


def test_seed_target_stores_text_encoder_and_vae_in_fp8(qwen_seed):
    loaded, engine = qwen_seed
    engine.apply([])
    def stored(module) -> bool:
        return has_fp8_weight_storage(module) and module.weight.numel() == 0

    conv_in = loaded.pipe.vae.decoder.conv_in
    down_proj = loaded.pipe.text_encoder.model.language_model.layers[0].mlp.down_proj
    assert stored(conv_in) and stored(down_proj)
    engine.apply(["vae:"])  # the VAE kept whole in BF16
    assert not stored(conv_in) and conv_in.weight.dtype == torch.bfloat16 and stored(down_proj)
    engine.apply(None)
    assert not stored(conv_in) and not stored(down_proj)


def test_weight_bytes_are_exact(qwen, qwen_seed):
    loaded, engine = qwen
    bf16 = engine.weight_bytes(None)
    fp8 = engine.weight_bytes([])
    img_mlp = engine.weight_bytes(["img_mlp"])
    dit = sum(p.numel() for p in loaded.transformer.parameters())
    assert bf16["transformer"] == 2 * dit
    # Independent count: every quantized weight saves one byte and costs a 4-byte scale per layer.
    for component in ("transformer", "text_encoder"):
        modules = dict(loaded.components[component].named_modules())
        layers = loaded.index.of(component)
        weights = sum(modules[n].weight.numel() for l in layers for n in l.modules)
        assert bf16[component] - fp8[component] == weights - 4 * len(layers)
    assert bf16["vae"] == fp8["vae"]  # vllm-omni leaves the VAE alone
    assert engine.bf16_kept_bytes(["text_encoder:"]) == bf16["text_encoder"] - fp8["text_encoder"]
    modules = dict(loaded.transformer.named_modules())
    mlp_layers = [l for l in loaded.index.layers if "img_mlp" in l.engine_name]
    mlp_weights = sum(modules[n].weight.numel() for l in mlp_layers for n in l.modules)
    assert img_mlp["transformer"] - fp8["transformer"] == mlp_weights - 4 * len(mlp_layers)
    loaded, engine = qwen_seed
    bf16, fp8 = engine.weight_bytes(None), engine.weight_bytes([])
    vae_weights = sum(m.weight.numel() for m in loaded.pipe.vae.modules()
                      if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)))
    vae_count = sum(1 for m in loaded.pipe.vae.modules()
                    if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)))
    assert bf16["vae"] - fp8["vae"] == vae_weights - 4 * vae_count
    # Measured: bytes of the tensors actually held at rest under FP8 match the analytic figure.
    engine.apply([])
    at_rest = sum(p.numel() * p.element_size() for p in loaded.pipe.vae.parameters()) \
        + fp8_storage_bytes(loaded.pipe.vae)
    assert at_rest + 4 * vae_count == fp8["vae"]
    engine.apply(None)


def test_pattern_matching_nothing_is_a_clear_error(qwen):
    _, engine = qwen
    with pytest.raises(UserError, match="img_mlp"):
        engine.apply(["img_mpl"])


def test_a_users_mistake_during_a_trial_is_raised_not_recorded(qwen, tmp_path):
    from dataclasses import replace

    from layerscan.evaluate import evaluate
    from layerscan.generate import Baseline
    from layerscan.metrics import Scorer

    _, engine = qwen
    spec = replace(SPEC, image=str(tmp_path / "input.png"))  # Qwen-Image takes no input image
    with pytest.raises(UserError, match="takes no input image"):
        evaluate(engine, [], spec, Baseline([], 0.0, None, tmp_path, False), Scorer(["psnr"]))
    engine.apply(None)


def test_flux_pipeline_switches_too(tiny_flux_dir):
    loaded = load_pipeline(str(tiny_flux_dir), "cpu")
    engine = Fp8Engine(loaded)
    assert loaded.profile.name == "flux"
    engine.apply(None)
    bf16 = _image(loaded)
    engine.apply([])
    assert not np.array_equal(_image(loaded), bf16)
    engine.apply(None)
    assert np.array_equal(_image(loaded), bf16)


def test_baseline_cache_hits_invalidates_and_rebuilds(qwen, tmp_path):
    loaded, engine = qwen
    engine.apply(None)
    first = load_or_build_baseline(loaded, SPEC, tmp_path)
    assert not first.cached and len(first.images) == 2
    again = load_or_build_baseline(loaded, SPEC, tmp_path)
    assert again.cached and again.directory == first.directory
    assert all(np.array_equal(a, b) for a, b in zip(first.images, again.images))
    # A changed input gets another entry.
    other = load_or_build_baseline(loaded, GenerationSpec(SPEC.prompts, (1,), 2, 32, 32, 4.0), tmp_path)
    assert other.directory != first.directory and not other.cached
    # A corrupted entry is detected, rebuilt, and the rebuild said in one line.
    png = sorted(first.directory.glob("*.png"))[0]
    png.write_bytes(png.read_bytes()[:-20])
    said = []
    rebuilt = load_or_build_baseline(loaded, SPEC, tmp_path, warn=said.append)
    assert not rebuilt.cached
    assert said == [f"baseline cache entry {first.directory} is damaged "
                    f"({png.name} does not match its recorded hash); rebuilding it"]
    assert all(np.array_equal(a, b) for a, b in zip(first.images, rebuilt.images))
    manifest = json.loads((rebuilt.directory / "manifest.json").read_text())
    assert manifest["spec"]["prompts"] == list(SPEC.prompts)


def test_prompt_file_rules(tmp_path, prompts_file):
    assert read_prompts(prompts_file) == ("a red circle", "a blue square on the left")
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(UserError, match="no prompts"):
        read_prompts(empty)
    with pytest.raises(UserError, match="not found"):
        read_prompts(tmp_path / "missing.txt")


def test_bad_model_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_pipeline(str(tmp_path / "nope"), "cpu")
    with pytest.raises(UserError, match="not a diffusers pipeline"):
        load_pipeline(str(tmp_path), "cpu")
    with pytest.raises(UserError, match="could not fetch"):
        load_pipeline("no-such-org/no-such-model", "cpu")



def test_a_mistyped_model_path_is_reported_before_anything_else(tmp_path, monkeypatch):
    from layerscan.session import open_session
    from layerscan.study import build_study

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # LPIPS weights missing as well
    study = build_study({"model": str(tmp_path / "typo"), "prompts": str(tmp_path / "none.txt")})
    with pytest.raises(UserError, match="model directory not found"):
        open_session(study, "cpu")


def test_requantize_residency_holds_exactly_the_analytic_bytes(tiny_qwen_dir):
    loaded = load_pipeline(str(tiny_qwen_dir), "cpu")
    engine = Fp8Engine(loaded, residency="requantize")
    engine.apply(None)
    bf16 = _image(loaded)

    def held(module):
        tensors = list(module.parameters()) + [b for n, b in module.named_buffers()
                                                if n.endswith("weight_fp8")]
        return sum(t.numel() * t.element_size() for t in tensors)

    for config in ([], ["img_mlp"], ["transformer_blocks.2."]):
        engine.apply(config)
        expected = engine.weight_bytes(config)["transformer"]
        skipped = loaded.index.skipped(config)
        quantized_scales = 4 * sum(1 for l in loaded.index.of("transformer") if l.name not in skipped)
        # Held on the device: parameters + FP8 copies; analytic adds one scale per fused layer.
        assert held(loaded.transformer) + quantized_scales == expected, config
    engine.apply(None)
    assert np.array_equal(_image(loaded), bf16)


def test_an_interrupted_baseline_resumes_from_the_outputs_already_made(qwen, tmp_path, monkeypatch):
    """Ctrl-C after three of the six outputs (baseline + two floor variants of two prompts), and
    the next build generates only the other three, and its entry equals an uninterrupted one."""
    from layerscan import generate

    loaded, engine = qwen
    engine.apply(None)
    made = []
    original = generate.generate_image

    def counted(*args, **kwargs):
        made.append(args[2:])  # (prompt, seed)
        return original(*args, **kwargs)

    monkeypatch.setattr(generate, "generate_image", counted)

    def interrupt_after_three(index, seconds):
        if len(made) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        load_or_build_baseline(loaded, SPEC, tmp_path / "cut", on_image=interrupt_after_three)
    assert len(made) == 3
    made.clear()
    said = []
    resumed = load_or_build_baseline(loaded, SPEC, tmp_path / "cut", warn=said.append)
    assert said == ["resuming the BF16 baseline: 3 of 6 outputs already made"]
    assert len(made) == 3 and not resumed.cached
    whole = load_or_build_baseline(loaded, SPEC, tmp_path / "whole")
    assert len(whole.images) == len(resumed.images) == 2
    assert all(np.array_equal(a, b) for a, b in zip(whole.images, resumed.images))
    for variant, images in whole.floor_images.items():
        assert len(images) == len(resumed.floor_images[variant]) == 2
        assert all(np.array_equal(a, b) for a, b in zip(images, resumed.floor_images[variant]))
    assert resumed.seconds_per_image > 0
    again = load_or_build_baseline(loaded, SPEC, tmp_path / "cut")
    assert again.cached and not list((tmp_path / "cut" / "baselines").glob(".*.partial"))


def test_a_floor_variant_that_changes_nothing_stops_after_one_output(qwen, tmp_path, monkeypatch):
    """Under compilation the attention-math variant runs the baseline's own kernel; simulated
    here by a variant that does nothing: its first output equals the baseline's, so no second
    is made, and the floor flags it and leaves it out."""
    import contextlib

    from layerscan import generate
    from layerscan.floor import measure_floor
    from layerscan.metrics import Scorer

    loaded, engine = qwen
    engine.apply(None)
    original_variant = generate.floor_variant

    def variant(loaded_, name):
        return contextlib.nullcontext() if name == "attention-math" else original_variant(loaded_, name)

    monkeypatch.setattr(generate, "floor_variant", variant)
    made = []
    original = generate.generate_image
    monkeypatch.setattr(generate, "generate_image", lambda *a, **k: made.append(a[2:]) or original(*a, **k))
    baseline = load_or_build_baseline(loaded, SPEC, tmp_path)
    assert len(made) == 2 + 2 + 1  # baseline, latents+1ulp, one attention-math output
    assert len(baseline.floor_images["attention-math"]) == 1
    assert np.array_equal(baseline.floor_images["attention-math"][0], baseline.images[0])
    floor = measure_floor(Scorer(("psnr",)), baseline, list(SPEC.prompts))
    assert floor.identical == ("attention-math",)
    assert floor.mean == floor.variants["latents+1ulp"]["mean"]
    again = load_or_build_baseline(loaded, SPEC, tmp_path)  # and the cache entry verifies
    assert again.cached and len(again.floor_images["attention-math"]) == 1


def test_requantize_copies_are_made_in_the_background_and_handed_over_before_anything_is_freed(tiny_qwen_dir):
    """The CPU copies of the BF16 weights are made while the baseline is generated, and every
    layer holds its copy, equal to its weight, before the first FP8 configuration frees any."""
    loaded = load_pipeline(str(tiny_qwen_dir), "cpu")
    engine = Fp8Engine(loaded, residency="requantize")
    weights = {name: [m.weight.detach().clone() for m in shards] for name, shards in engine._layers.items()}
    engine.apply(None)
    assert engine._masters is None  # BF16 as loaded: nothing copied yet, nothing to wait for
    engine.start_master_copies()
    masters = engine._masters
    assert not masters.done and all(m.bf16_master is None for m in masters.modules)
    bf16 = _image(loaded)  # generated while the copies are made
    engine.apply([])
    assert masters.done
    for name, shards in engine._layers.items():
        for module, weight in zip(shards, weights[name]):
            assert module.weight.numel() == 0  # freed: FP8 only
            assert torch.equal(module.bf16_master, weight)
    engine.apply(None)
    assert np.array_equal(_image(loaded), bf16)


def test_a_failed_copy_is_said_at_the_first_fp8_switch(tiny_qwen_dir, monkeypatch):
    from layerscan.engine import MasterCopies

    def no_memory(self):
        self.error = OSError("cannot allocate memory")

    monkeypatch.setattr(MasterCopies, "_copy", no_memory)
    loaded = load_pipeline(str(tiny_qwen_dir), "cpu")
    engine = Fp8Engine(loaded, residency="requantize")
    engine.apply(None)
    with pytest.raises(RuntimeError, match="could not keep CPU copies of the BF16 weights.*cannot allocate"):
        engine.apply([])
    assert all(m.weight.numel() for shards in engine._layers.values() for m in shards)  # nothing freed


@pytest.mark.parametrize("compile", [False, True])
def test_a_session_makes_the_copies_beside_an_output_no_timing_counts(planted_dir, two_prompts, tmp_path,
                                                                      monkeypatch, compile):
    """Where the BF16 and FP8 copies do not fit side by side (forced here on the CPU), a compiled
    pipeline makes the CPU copies beside the baseline's first output (the one that compiles, left
    out of every timing) and has them before the second; an eager one makes them when the first
    FP8 configuration needs them.  Either way the evaluations are the ``both`` residency's."""
    from diffusers import QwenImagePipeline

    from layerscan.engine import MasterCopies
    from layerscan.evaluate import evaluate
    from layerscan.session import open_session
    from layerscan.study import build_study

    events = []
    original = QwenImagePipeline.__call__
    monkeypatch.setattr(QwenImagePipeline, "__call__",
                        lambda self, *a, **k: events.append("output") or original(self, *a, **k))
    for name in ("__init__", "wait"):
        method = getattr(MasterCopies, name)
        monkeypatch.setattr(MasterCopies, name,
                            lambda self, *a, _m=method, _n=name: events.append(_n) or _m(self, *a))
    values = dict(model=str(planted_dir), prompts=str(two_prompts), seeds=[0], steps=2, height=32,
                  width=32, metrics=["psnr"], criterion_metric="psnr", criterion_mean=30.0,
                  compile=compile)
    records = {}
    for residency in ("requantize", "both"):
        events.clear()
        monkeypatch.setattr(Fp8Engine, "_choose_residency", lambda self, r=residency: r)
        s = open_session(build_study(values), "cpu", cache_root=tmp_path / residency, warn=lambda m: None)
        assert s.engine.residency == residency
        baseline_events = list(events)
        records[residency] = [evaluate(s.engine, config, s.spec, s.baseline, s.scorer).per_prompt
                              for config in ([], ["img_mlp"])]
        if residency == "both":
            assert "__init__" not in events
        elif compile:
            assert baseline_events[:4] == ["__init__", "output", "wait", "output"]
        else:
            assert "__init__" not in baseline_events
            assert events[len(baseline_events):len(baseline_events) + 3] == ["__init__", "wait", "output"]
    assert records["requantize"] == records["both"]


def test_copies_still_running_at_exit_are_stopped_between_layers():
    from layerscan.engine import MasterCopies, _RUNNING, _stop_all

    layers = [Fp8Linear.convert(torch.nn.Linear(256, 256)) for _ in range(64)]
    copier = MasterCopies(layers)
    _stop_all()  # what the interpreter runs at exit
    assert not copier._thread.is_alive() and copier not in _RUNNING
    assert len(copier.copies) <= len(layers)


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@_CUDA
def test_copies_on_their_stream_see_the_weights_as_the_default_stream_left_them():
    """The copier's stream waits for the default stream's work queued before it started: a
    weight still being written there is copied as written."""
    from layerscan.engine import MasterCopies

    layers = [Fp8Linear.convert(torch.nn.Linear(1024, 1024, device="cuda", dtype=torch.bfloat16))
              for _ in range(32)]
    torch.cuda._sleep(200_000_000)  # keep the default stream busy
    for number, layer in enumerate(layers):
        layer.weight.data.fill_(number)  # queued behind the sleep
    copier = MasterCopies(layers)
    copier.wait()
    assert all(bool((layer.bf16_master == number).all()) and layer.bf16_master.is_pinned()
               for number, layer in enumerate(layers))


@_CUDA
def test_a_process_leaving_while_its_copies_run_exits_cleanly(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "leave.py"
    script.write_text(
        "import torch\n"
        "from layerscan.engine import MasterCopies\n"
        "from layerscan.fp8 import Fp8Linear\n"
        "layers = [Fp8Linear.convert(torch.nn.Linear(8192, 8192, device='cuda', dtype=torch.bfloat16))\n"
        "          for _ in range(48)]\n"
        "MasterCopies(layers)\n"
        "raise SystemExit(3)\n")  # an error, or Ctrl-C, while the copies run
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    # Without stopping the copier at exit the interpreter aborted (SIGABRT: -6, "terminate called
    # without an active exception").
    assert done.returncode == 3, done.stderr[-500:]
    assert "terminate called" not in done.stderr
