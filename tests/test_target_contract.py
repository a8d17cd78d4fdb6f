"""The contract with the target release, proven against its own code.

For every architecture layerscan ships, vLLM-Omni 0.30.0 builds its own pipeline for the same
tiny checkpoint (``layerscan/vllm_omni_probe.py``, run by the Python of an environment where
``vllm==0.30.0 vllm-omni==0.30.0`` are installed: ``$LAYERSCAN_TEST_VLLM_OMNI_PYTHON``, which
``.ci/run`` sets up).  Asserted, layer by layer:

(a) the layers vLLM-Omni quantizes are exactly layerscan's quantized layers, under the same
    (fused) names, component by component;
(b) for the configs layerscan emits with every kind of group kept (a family, a block, a single
    module, a text-encoder layer, a whole component, the second expert), vLLM-Omni keeps exactly
    the intended layers in BF16 and quantizes the rest;
(c) every form layerscan offers loads, and the per-component form it withholds does not.

Without that environment the tests skip locally and fail in CI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from layerscan.cli import main
from layerscan.evaluate import TrialRecord
from layerscan.layers import LayerIndex, qualify
from layerscan.pipeline import load_pipeline
from layerscan.profiles import VLLM_OMNI_0_30
from layerscan.report.outputs import paste_forms
from layerscan.target_check import UNQUANTIZED, compare, probe

PYTHON = os.environ.get("LAYERSCAN_TEST_VLLM_OMNI_PYTHON")
if not PYTHON:
    if os.environ.get("CI"):
        raise RuntimeError("CI must run the contract tests: set LAYERSCAN_TEST_VLLM_OMNI_PYTHON "
                           "to the Python of a vllm==0.30.0 vllm-omni==0.30.0 environment")
    pytestmark = pytest.mark.skip(reason="no vLLM-Omni environment ($LAYERSCAN_TEST_VLLM_OMNI_PYTHON)")

TARGET = VLLM_OMNI_0_30
EVERYTHING = {"method": "fp8"}
_BLOCK_INDEX = re.compile(r"\.\d+\.")


def template(name: str) -> str:
    return _BLOCK_INDEX.sub(".N.", name)


def quantized_by_target(answer: dict) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for layer in answer["layers"]:
        if layer["method"] != UNQUANTIZED:
            out.setdefault(layer["component"], set()).add(layer["prefix"])
    return out


def kept_group_configs(index: LayerIndex) -> dict[str, tuple[str, ...]]:
    """One configuration per kind of kept group, named by the kind."""
    configs: dict[str, tuple[str, ...]] = {}
    for component in index.components:
        family = index.groups("family")
        families = [g for g in family if g.component == component]
        blocks = [g for g in index.groups("block") if g.component == component]
        modules = [g for g in index.groups("module") if g.component == component]
        configs[f"{component}: family"] = (families[-1].pattern,)
        configs[f"{component}: block"] = (blocks[min(1, len(blocks) - 1)].pattern,)
        configs[f"{component}: module"] = (modules[-1].pattern,)
        configs[f"{component}: whole"] = (qualify(component, ""),)
    if len(index.components) > 1:  # groups of two components kept together
        configs["two components"] = tuple(configs[f"{c}: family"][0] for c in index.components)
    return configs


@pytest.fixture(scope="module")
def edit_dir(tmp_path_factory, tiny_qwen_dir) -> Path:
    """Tiny Qwen-Image as an editing pipeline: the same components under the edit class."""
    out = tmp_path_factory.mktemp("edit") / "tiny-qwen-image-edit"
    shutil.copytree(tiny_qwen_dir, out)
    index = json.loads((out / "model_index.json").read_text())
    index["_class_name"] = "QwenImageEditPipeline"
    (out / "model_index.json").write_text(json.dumps(index))
    from transformers import (AutoTokenizer, Qwen2VLImageProcessor, Qwen2VLProcessor,
                              Qwen2VLVideoProcessor)

    Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), video_processor=Qwen2VLVideoProcessor(),
                     tokenizer=AutoTokenizer.from_pretrained(out / "tokenizer")).save_pretrained(out / "processor")
    return out


def _contract(model_dir: Path):
    """layerscan's view of ``model_dir``, the configs it emits, and vLLM-Omni's answers."""
    loaded = load_pipeline(str(model_dir), "cpu", target=TARGET.name)
    index = loaded.index
    emitted = {}
    for kind, config in kept_group_configs(index).items():
        data = paste_forms(str(model_dir), TrialRecord(config, "complete"), loaded)
        emitted[kind] = data
    requests = {"everything": EVERYTHING}
    for kind, data in emitted.items():
        for form in ("flat", "per_component"):
            if data[f"quantization_config_{form}"] is not None:
                requests[f"{kind} / {form}"] = data[f"quantization_config_{form}"]
    if "per_component" not in loaded.profile.forms:  # the form withheld must really fail
        requests["withheld per-component map"] = {
            **{c: {"method": "fp8"} for c in index.components}, "vae": None}
    return loaded, emitted, probe(PYTHON, model_dir, requests)


@pytest.fixture(scope="module", params=["tiny-qwen-image", "tiny-z-image", "tiny-flux", "tiny-wan2.2"])
def contract(request):
    from layerscan.tiny import tiny_pipeline_dir

    return _contract(tiny_pipeline_dir(request.param))


def test_the_probe_ran_the_target_release(contract):
    _, _, answer = contract
    assert (answer["vllm_omni"], answer["vllm"]) == (TARGET.version, "0.30.0")


def test_a_vllm_omni_quantizes_exactly_layerscans_layers_under_the_same_names(contract):
    loaded, _, answer = contract
    everything = answer["results"]["everything"]
    assert everything["error"] is None
    built = quantized_by_target(everything)
    unused = {(c, n) for arch, c, n, _ in TARGET.unused_layers if arch == loaded.profile.name}
    for component, name in unused:
        assert name in built[component], f"declared unused layer {component}.{name} is not built"
        built[component].discard(name)
    index = loaded.index
    assert set(built) == set(index.components)  # e.g. no Qwen-Image text encoder in 0.30.0
    for component in index.components:
        ours = {layer.engine_name for layer in index.of(component)}
        assert ours <= built[component], sorted(ours - built[component])[:5]
        assert {template(n) for n in ours} == {template(n) for n in built[component]}


def test_b_c_every_emitted_config_loads_and_keeps_exactly_the_intended_layers(contract):
    loaded, emitted, answer = contract
    results = answer["results"]
    built = quantized_by_target(results["everything"])
    checked = 0
    for kind, data in emitted.items():
        intent = {c: {"fp8": list(v["fp8"]), "bf16": list(v["bf16"])} for c, v in data["layers"].items()}
        for component, names in built.items():
            # Blocks the target builds beyond the tiny checkpoint's (vLLM-Omni 0.30.0 builds
            # Z-Image's DiT at its default size, whatever the checkpoint's config says) are
            # named by no group of it: FP8 is intended there.
            known = set(intent.get(component, {}).get("fp8", [])) | set(intent.get(component, {}).get("bf16", []))
            extra = {n for n in names - known if template(n) in {template(k) for k in known}}
            intent.setdefault(component, {"fp8": [], "bf16": []})["fp8"] += sorted(extra)
        assert any(v["bf16"] for v in intent.values()), kind  # every kind keeps something
        for form in ("flat", "per_component"):
            key = f"{kind} / {form}"
            if key not in results:
                continue
            problems, _, _ = compare(intent, results[key], form, TARGET, loaded.profile.name)
            assert problems == [], (key, problems[:3])
            checked += 1
    assert checked >= len(emitted)
    withheld = results.get("withheld per-component map")
    if loaded.profile.name in ("z-image", "flux"):  # keys matched against layer prefixes: no match
        assert withheld["error"] and "All linear layers should support quant method" in withheld["error"]
    elif withheld is not None:
        # Qwen-Image's map loads only by accident ("transformer_blocks..." starts with
        # "transformer"); with one quantized component the flat form says the same, so it is
        # the one offered.
        assert loaded.profile.name == "qwen-image" and withheld["error"] is None


def test_qwen_image_text_encoder_is_not_a_search_dimension_and_z_image_s_is(tiny_qwen_dir):
    from layerscan.tiny import tiny_pipeline_dir

    qwen = load_pipeline(str(tiny_qwen_dir), "cpu", target=TARGET.name)
    z = load_pipeline(str(tiny_pipeline_dir("tiny-z-image")), "cpu", target=TARGET.name)
    assert qwen.index.components == ["transformer"]
    assert z.index.components == ["transformer", "text_encoder"]
    assert all(l.engine_name.startswith("model.layers.") for l in z.index.of("text_encoder"))


def test_qwen_image_edit_builds_the_same_quantized_layers(edit_dir, tiny_qwen_dir):
    """The editing pipeline loads a Qwen2-VL processor whose video half needs torchvision, which
    cannot load beside vLLM's CPU torch here: when it cannot be built, say why, exactly."""
    loaded = load_pipeline(str(tiny_qwen_dir), "cpu", target=TARGET.name)
    answer = probe(PYTHON, edit_dir, {"everything": EVERYTHING})["results"]["everything"]
    if answer["error"]:
        assert "Torchvision" in answer["error"] or "torchvision" in answer["error"], answer["error"]
        pytest.skip(f"vLLM-Omni's QwenImageEditPipeline cannot be built on this CPU: {answer['error']}")
    built = quantized_by_target(answer)
    assert set(built) == {"transformer"}
    assert {l.engine_name for l in loaded.index.of("transformer")} == built["transformer"]


# --- layerscan check, as a user runs it ------------------------------------------------------

@pytest.fixture(scope="module")
def z_image_report(tmp_path_factory) -> Path:
    """A Z-Image recommendation keeping a DiT family and a text-encoder layer, written as a run
    writes it."""
    from layerscan.tiny import tiny_pipeline_dir

    loaded = load_pipeline(str(tiny_pipeline_dir("tiny-z-image")), "cpu", target=TARGET.name)
    families = {g.component: g.pattern for g in loaded.index.groups("family")}
    te_layer = next(g.pattern for g in loaded.index.groups("block") if g.component == "text_encoder")
    data = paste_forms("tiny-z-image", TrialRecord((families["transformer"], te_layer), "complete"), loaded)
    out = tmp_path_factory.mktemp("z") / "report"
    out.mkdir()
    (out / "recommendation.json").write_text(json.dumps(data))
    return out


def _check(report: Path, capsys) -> tuple[int, str]:
    code = main(["check", str(report), "--python", PYTHON])
    return code, capsys.readouterr().out


def test_check_agrees_with_a_z_image_recommendation_on_the_checkpoint_s_layers_and_notes_lm_head(z_image_report, capsys):
    data = json.loads((z_image_report / "recommendation.json").read_text())
    assert data["quantization_config_per_component"] is None  # Z-Image cannot load that form
    code, out = _check(z_image_report, capsys)
    # vLLM-Omni builds Z-Image's DiT at its default size, so blocks beyond the tiny checkpoint's
    # are layers this recommendation does not know: the check says so, and only that.
    problems = [l for l in out.splitlines() if l.startswith("problem:")]
    assert problems and code == 1
    assert all("does not know" in p and "quantizes transformer." in p for p in problems), problems[:3]
    assert "text_encoder.lm_head runs in FP8" in out


@pytest.mark.parametrize("breakage", ["shard name", "wrong prefix", "per-component map"])
def test_check_names_each_problem_of_a_hand_broken_recommendation(tmp_path, capsys, breakage,
                                                                   tiny_qwen_dir):
    from layerscan.tiny import tiny_pipeline_dir

    model = "tiny-z-image" if breakage == "per-component map" else "tiny-qwen-image"
    loaded = load_pipeline(str(tiny_pipeline_dir(model)), "cpu", target=TARGET.name)
    wanted = "to_out" if breakage == "wrong prefix" else "to_qkv"
    family = next(g for g in loaded.index.groups("family") if wanted in g.pattern)
    data = paste_forms(model, TrialRecord((family.pattern,), "complete"), loaded)
    config = data["quantization_config"]
    if breakage == "shard name":  # to_q is a shard of the fused to_qkv: matches nothing
        config["ignored_layers"] = [n.replace("to_qkv", "to_q") for n in config["ignored_layers"]]
        expected = ["matches no layer", "meant to stay in BF16 but vllm-omni==0.30.0 quantizes it"]
    elif breakage == "wrong prefix":  # the module path, not the prefix the skip check sees
        config["ignored_layers"] = [n.removesuffix(".0") for n in config["ignored_layers"]]
        expected = ["matches no layer", "meant to stay in BF16"]
    else:
        data["quantization_config"] = {"transformer": config, "text_encoder": {"method": "fp8"}, "vae": None}
        expected = ["fails to load in vllm-omni==0.30.0: ValueError: All linear layers should support quant method"]
    data["quantization_config_flat"] = None
    (tmp_path / "recommendation.json").write_text(json.dumps(data))
    code, out = _check(tmp_path, capsys)
    assert code == 1
    problems = [l for l in out.splitlines() if l.startswith("problem:")]
    for text in expected:
        assert any(text in p for p in problems), (text, problems[:4])


def test_check_refuses_a_recommendation_for_another_target_in_one_line(z_image_report, capsys):
    assert main(["check", str(z_image_report), "--target", "seed", "--python", PYTHON]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "written for vllm-omni==0.30.0, not seed" in err[0]


def test_the_probe_runs_without_layerscan(tmp_path):
    """The probe is started by another environment's Python: it must not import layerscan."""
    source = (Path(__file__).parents[1] / "layerscan" / "vllm_omni_probe.py").read_text()
    assert "layerscan" not in "".join(l for l in source.splitlines() if l.startswith(("import", "from")))
    done = subprocess.run([PYTHON, "-c", "import layerscan"], capture_output=True, cwd=tmp_path)
    assert done.returncode != 0  # the check works from a separate environment
