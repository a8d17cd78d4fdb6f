"""A settings matrix: every configuration judged under each generation setting on its own."""

from __future__ import annotations

import dataclasses

import pytest

from layerscan.errors import UserError
from layerscan.evaluate import TrialRecord, failure_proven, judge, setting_verdicts, worst_setting
from layerscan.generate import GenerationSpec, Setting
from layerscan.session import generation_spec
from layerscan.study import Criterion, build_study

PSNR = Criterion("psnr", 30.0, 25.0)


def _study(**values):
    return build_study(dict(model="demo", steps=4, height=32, width=32, **values))


def test_settings_are_resolved_from_the_study_and_ordered_cheapest_first():
    study = _study(pipeline_kwargs={"max_sequence_length": 64},
                   settings=[{"name": "large", "height": 64, "width": 64},
                             {"steps": 2, "pipeline_kwargs": {"num_frames": 5}}])
    settings = study.generation_settings()
    assert [s["name"] for s in settings] == ["32x32x5f-2steps", "large"]
    assert settings[0]["pipeline_kwargs"] == {"max_sequence_length": 64, "num_frames": 5}
    assert settings[1] == dict(name="large", steps=4, height=64, width=64, guidance=4.0, image=None,
                               pipeline_kwargs={"max_sequence_length": 64})
    # Values are converted as the study's own, so a setting keys its baseline like a study would.
    assert _study(settings=[{"guidance": 4}, {"steps": 2}]).settings[0]["guidance"] == 4.0


def test_a_matrix_spec_generates_every_prompt_and_seed_under_each_setting():
    spec = generation_spec(_study(seeds=[0, 7], settings=[{"name": "a", "steps": 2},
                                                           {"name": "b", "height": 64}]), ("x", "y"))
    assert spec.per_setting == 4 and len(spec.items()) == 8
    assert [spec.image_name(i) for i in (0, 1, 3, 4, 7)] == [
        "a_p000_s0.png", "a_p000_s7.png", "a_p001_s7.png", "b_p000_s0.png", "b_p001_s7.png"]
    number, part, local = spec.part_of(5)
    assert (number, local, part.height, part.steps, part.settings) == (1, 1, 64, 4, ())
    assert [item[1:] for item in spec.items()[4:]] == [("x", 0), ("x", 7), ("y", 0), ("y", 7)]


def test_one_setting_keeps_the_names_and_cache_keys_it_always_had():
    spec = GenerationSpec(("x",), (0,))
    assert spec.parts() == [spec] and spec.image_name(0) == "p000_s0.png"
    assert spec.setting_names() == [""]
    one = GenerationSpec(("x",), (0,), settings=(Setting("only", 4, 32, 32, 4.0),))
    assert one.parts()[0] == spec  # a matrix's part is keyed like the same spec alone


@pytest.mark.parametrize("settings, message", [
    ("x", "expected a list of tables"),
    ([{"frames": 9}], "[[settings]] #1: unknown key(s) frames"),
    ([{"steps": "many"}], "[[settings]] #1: setting steps = 'many': expected a whole number"),
    ([{"height": 0}], "[[settings]] #1: setting height = 0: expected a number above 0"),
    ([{"name": "a b"}], "name 'a b' must be letters, digits"),
    ([{"name": "a"}, {"name": "a", "steps": 2}], "two [[settings]] are named 'a'"),
    ([{"steps": 2}, {"steps": 2}], "[[settings]] '32x32-2steps' and '32x32-2steps' are the same setting"),
    ([{"height": 32}, {}], "are the same setting"),  # the study's own height is 32
    ([{"guidance": 1.0}, {"guidance": 2.0}], "two [[settings]] are named '32x32-4steps': name them apart"),
    ([{"image": "/nonexistent.png"}], "input image not found: /nonexistent.png"),
])
def test_a_bad_setting_is_named_in_one_line(settings, message):
    with pytest.raises(UserError, match=None) as info:
        _study(settings=settings)
    assert message in str(info.value) and "\n" not in str(info.value)


def _record(values: list[float]) -> TrialRecord:
    record = TrialRecord((), "complete", per_prompt=[{"psnr": v} for v in values])
    record.mean = {"psnr": sum(values) / len(values)}
    record.worst = {"psnr": min(values)}
    return record


def test_a_configuration_passes_only_under_every_setting():
    """Both settings clear the worst threshold; the mean over all eight outputs (33.5) passes,
    but the second setting's own mean (28) does not: under the matrix it fails, and that
    setting is its worst."""
    record = _record([39.0, 39.0, 39.0, 39.0, 28.0, 28.0, 28.0, 28.0])
    assert judge(record, PSNR).passes  # one setting: the pooled outputs pass
    matrix = dataclasses.replace(PSNR, per_setting=4)
    assert not judge(record, matrix).passes
    verdicts = setting_verdicts(record, matrix, ["short", "long"])
    assert [(v["setting"], v["passes"], v["mean"]) for v in verdicts] == [
        ("short", True, 39.0), ("long", False, 28.0)]
    assert worst_setting(record, matrix, ["short", "long"]) == "long"
    assert worst_setting(record, PSNR, [""]) is None
    assert "under every setting" in matrix.describe()


def test_early_stopping_proves_a_failure_within_one_setting():
    """After the first setting's four outputs at 27 dB its mean cannot reach 30, whatever the
    second setting scores: a failure is proven.  Without the matrix the remaining four outputs
    at PSNR's cap could still lift the pooled mean."""
    done = [{"psnr": 27.0}] * 4
    assert failure_proven(done, 8, dataclasses.replace(PSNR, per_setting=4))
    assert not failure_proven(done, 8, PSNR)
    # Part of a setting: the rest of that setting alone could still pass it.
    assert not failure_proven([{"psnr": 27.0}], 8, dataclasses.replace(PSNR, per_setting=4))
    # A complete setting whose mean meets 30 but whose pessimistic bound does not fails as judge
    # would fail it: the costlier setting is not generated for it.
    spread = [{"psnr": v} for v in (40.0, 26.0, 26.0, 30.0)]
    assert failure_proven(spread, 8, dataclasses.replace(PSNR, per_setting=4))
    assert not judge(_record([40.0, 26.0, 26.0, 30.0, 40.0, 40.0, 40.0, 40.0]),
                     dataclasses.replace(PSNR, per_setting=4)).passes


def test_a_failure_that_shows_under_one_setting_decides_the_answer(tmp_path):
    """The shipped resolution study: FP8 hurts txt_mlp at 32 px only (layerscan.tiny's
    txt-outlier plant).  The answer keeps txt_mlp, the report names 32px as the worst setting,
    and the same model at 128 px alone passes in FP8 everywhere: without the matrix the answer
    would keep nothing."""
    import json

    from layerscan.cli import main
    from layerscan.evaluate import evaluate
    from layerscan.session import open_session
    from layerscan.study import load_study

    out = tmp_path / "run"
    assert main(["run", "--study", "tiny-qwen-image-resolution", "--out", str(out)]) == 0
    rec = json.loads((out / "recommendation.json").read_text())
    assert rec["final"] and rec["ignored_layers_patterns"] == ["txt_mlp"]
    assert rec["minimality"]["necessary"] == {"txt_mlp": []}
    assert [s["name"] for s in rec["settings"]] == ["32px", "128px"]
    rows = {r["configuration"]: r for r in rec["per_setting"]}
    kept = rows["FP8, BF16 kept: txt_mlp"]
    assert kept["worst_setting"] == "32px" and all(s["passes"] for s in kept["settings"])
    fp8_all = rows["FP8 all"]  # stopped within the cheapest setting, which proved the failure
    assert fp8_all["worst_setting"] == "32px" and not fp8_all["settings"][0]["passes"]
    assert [s["setting"] for s in fp8_all["settings"]] == ["32px"]
    assert rec["ci_entry"]["fields"]["height"] == 32  # the entry is written for the worst setting
    report = (out / "report.md").read_text()
    assert "## Under each generation setting" in report
    assert "| recommended: FP8, BF16 kept: txt_mlp |" in report and "| `32px` |" in report

    values = load_study("tiny-qwen-image-resolution")
    values["settings"] = [s for s in values["settings"] if s["name"] == "128px"]
    session = open_session(build_study(values), "cpu")  # its baseline is the matrix's, cached
    assert session.baseline.cached
    alone = evaluate(session.engine, [], session.spec, session.baseline, session.scorer,
                     session.criterion)
    assert alone.status == "complete" and alone.passes


def test_a_flag_every_setting_overrides_is_refused_not_ignored(capsys):
    from layerscan.cli import main

    assert main(["run", "--study", "tiny-qwen-image-resolution", "--height", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("--height: every [[settings]] table of this study sets its own; "
                            "edit the study's settings instead")


def test_eval_under_a_matrix_says_each_settings_verdict(tmp_path, capsys):
    import json

    from layerscan.cli import main

    assert main(["eval", "--study", "tiny-qwen-image-resolution", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "  setting 32px " in out and "  setting 128px " in out and "  worst setting: 32px" in out
    data = json.loads((tmp_path / "eval.json").read_text())
    assert [v["setting"] for v in data["per_setting"]] == ["32px", "128px"]
    assert not data["per_setting"][0]["passes"] and data["per_setting"][1]["passes"]
    assert data["passes"] is False and data["worst_setting"] == "32px"


def test_floor_relative_thresholds_resolve_against_each_settings_own_floor():
    """The 32 px setting's floor is 50 dB, the 128 px one's 40: 'floor - 2' asks 48 of the first
    and 38 of the second.  Against the pooled floor (the worse, 40) 45 dB at 32 px would pass."""
    pooled = Criterion("psnr", "floor - 2", "floor - 3").resolve(40.0, 39.0)
    matrix = dataclasses.replace(pooled, per_setting=4, setting_floors=((50.0, 49.0), (40.0, 39.0)))
    record = _record([45.0] * 4 + [39.0] * 4)
    verdicts = setting_verdicts(record, matrix, ["32px", "128px"])
    assert [(v["mean_limit"], v["worst_limit"], v["passes"]) for v in verdicts] == [
        (48.0, 46.0, False), (38.0, 36.0, True)]
    assert not judge(record, matrix).passes
    assert judge(record, dataclasses.replace(matrix, setting_floors=())).passes
    assert failure_proven([{"psnr": 45.0}], 8, matrix)  # below 32 px's own worst limit, 46
    assert matrix.describe().endswith("under every setting, each against its own noise floor")
