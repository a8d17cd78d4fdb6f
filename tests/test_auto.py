"""`--strategy auto`: greedy's answer from a third of its full evaluations, on planted models.

Two planted tiny Qwen-Image models: a massive activation in ``img_mlp`` of every block (the
family is sensitive), and in ``img_mlp`` of block 1 only, with its branch gain raised until that
block alone fails the criterion (FP8 everywhere ~32 dB against 45 dB asked).  Auto is compared
with greedy under the same settings: family granularity, block granularity, and family with
``--refine`` (greedy then refines by brute force).  Plus the safe early-stopping rule, pattern
compression, the trajectory replay (Qwen-Image and Flux) and the proxy cache.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from layerscan.cli import main
from layerscan.evaluate import TrialRecord, failure_proven, judge, still_decides
from layerscan.generate import iter_images
from layerscan.layers import LayerIndex
from layerscan.profiles import make_profile
from layerscan.proxy import capture
from layerscan.proxy.scores import Proxies
from layerscan.report.proxy_section import spearman
from layerscan.runner import run_study
from layerscan.search.answer import recommend
from layerscan.search.refine import Compressor
from layerscan.session import open_session
from layerscan.study import Criterion, Study, build_study, load_study

# The planted answers live in the DiT; these tests compare strategies on the DiT's six families
# (the text encoder joins the search in tests/test_components.py).
# FP8 everywhere on the planted models lands near 35 dB, keeping the planted layers in BF16 near
# the BF16 noise floor (~52 dB): 45 / 40 dB separates them, and one image below 40 dB proves a
# failure early.
CRITERION = ["--criterion-metric", "psnr", "--criterion-mean", "45", "--criterion-worst", "40",
             "--components", "transformer"]
PSNR = Criterion("psnr", 37.0, 35.0)
IMG_MLP = [f"transformer_blocks.{i}.img_mlp.{leaf}" for i in range(4) for leaf in ("net.0.proj", "net.2")]


# --- the early-stopping rule ----------------------------------------------------------------------

def test_a_prompt_below_the_worst_threshold_proves_failure():
    assert failure_proven([{"psnr": 34.9}], 8, PSNR)
    assert not failure_proven([{"psnr": 35.0}], 8, PSNR)
    assert failure_proven([{"psnr": float("nan")}], 8, PSNR)
    lpips = Criterion("lpips", 0.05, 0.10)
    assert failure_proven([{"lpips": 0.11}], 8, lpips)
    assert not failure_proven([{"lpips": 0.09}], 8, lpips)


def test_the_mean_stops_only_when_perfect_remaining_prompts_could_not_save_it():
    # 2 prompts at 35.5 of 8: the other 6 at the 100 dB cap would reach 84 dB: no stop.
    assert not failure_proven([{"psnr": 35.5}] * 2, 8, PSNR)
    # 7 of 8 at 35.5: the last at 100 dB gives 43.6 dB >= 37: still no stop.
    assert not failure_proven([{"psnr": 35.5}] * 7, 8, PSNR)
    # SSIM is capped at 1: 3 of 4 prompts at 0.91 cannot reach a 0.95 mean (0.9325 at best).
    ssim = Criterion("ssim", 0.95, 0.90)
    assert failure_proven([{"ssim": 0.91}] * 3, 4, ssim)
    assert not failure_proven([{"ssim": 0.91}] * 1, 4, ssim)  # 0.9775 still reachable
    lpips = Criterion("lpips", 0.05, 0.10)
    assert failure_proven([{"lpips": 0.09}] * 3, 4, lpips)  # 0.0675 at best
    # A pass is never proven early, whatever the scores.
    assert not failure_proven([{"psnr": 100.0}] * 7, 8, PSNR)


def test_a_stopped_record_never_passes_and_decides_only_while_it_proves_failure():
    record = TrialRecord(("img_mlp",), "stopped", mean={"psnr": 36.0}, worst={"psnr": 36.0},
                         per_prompt=[{"psnr": 36.0}])
    assert judge(record, Criterion("psnr", 30.0, 25.0)).passes is False
    assert recommend([record], PSNR) is None
    assert not still_decides(record, 2, PSNR)  # 36 >= 35 and (36 + 100) / 2 >= 37: undecided
    assert still_decides(record, 2, Criterion("psnr", 37.0, 36.5))  # 36 < 36.5: proven failure
    complete = TrialRecord(("img_mlp",), "complete", per_prompt=[{"psnr": 36.0}] * 2)
    assert still_decides(complete, 2, PSNR)


# --- patterns --------------------------------------------------------------------------------

class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.ModuleList([nn.Module(), nn.Linear(16, 16)])
        self.net[0].proj = nn.Linear(16, 16)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Module()
        for name in ("to_q", "to_k", "to_v"):
            setattr(self.attn, name, nn.Linear(16, 16))
        self.attn.to_out = nn.ModuleList([nn.Linear(16, 16)])
        self.img_mlp = _Mlp()


def _index(blocks: int = 12) -> LayerIndex:
    model = nn.Module()
    model.transformer_blocks = nn.ModuleList([_Block() for _ in range(blocks)])
    return LayerIndex.discover({"transformer": model}, make_profile("Unknown", "qwen-image", "seed"))


def test_cells_and_compression_stay_exact_under_the_substring_rule():
    index = _index(12)
    compress = Compressor(index)
    family = next(g for g in index.groups("family") if g.pattern == "img_mlp")
    pieces = index.cells(family)
    assert [c.pattern for c in pieces][:2] == ["transformer_blocks.0.img_mlp", "transformer_blocks.1.img_mlp"]
    one = next(c for c in pieces if c.pattern == "transformer_blocks.1.img_mlp")
    assert set(one.layers) == {"transformer_blocks.1.img_mlp.net.0.proj", "transformer_blocks.1.img_mlp.net.1"}
    assert compress(one.layers) == ("transformer_blocks.1.img_mlp",)  # not block 10 or 11
    assert compress(family.layers) == ("img_mlp",)  # every block: the family again
    block1 = next(g for g in index.groups("block") if g.pattern == "transformer_blocks.1.")
    assert compress(block1.layers) == ("transformer_blocks.1.",)
    assert [c.pattern for c in index.cells(block1)] == [
        "transformer_blocks.1.attn.to_qkv", "transformer_blocks.1.attn.to_out", "transformer_blocks.1.img_mlp"]
    mixed = set(family.layers) | set(block1.layers)
    assert compress(mixed) == ("img_mlp", "transformer_blocks.1.")
    two = {n for c in pieces[:2] for n in c.layers}
    patterns = compress(two)
    assert index.skipped(patterns) == two and len(patterns) == 2


def test_auto_is_the_default_strategy():
    assert Study().strategy == "auto" and build_study({"model": "m"}).strategy == "auto"


def test_spearman_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    a, b = [3.0, 1.0, 2.0, 2.0, 5.0], [30.0, 12.0, 25.0, 21.0, 40.0]
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic)
    assert spearman([1.0, 2.0], [2.0, 1.0]) is None


# --- end to end on planted models ------------------------------------------------------------------

@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("p") / "prompts.txt"
    path.write_text("a red circle on a white background\na blue square in the top left corner\n")
    return path


def _session(model: Path | str, prompts: Path, study: str = "tiny-qwen-image", **criterion):
    values = load_study(study)
    values.update(model=str(model), prompts=str(prompts))
    values.update(criterion or dict(criterion_metric="psnr", criterion_mean=45.0, criterion_worst=40.0))
    values.setdefault("components", ["transformer"])
    return open_session(build_study(values), "cpu", warn=lambda m: None)


@pytest.fixture(scope="module")
def family_session(tmp_path_factory, prompts):
    from layerscan.tiny import save_planted

    return _session(save_planted("tiny-qwen-image", "img_mlp", None,
                                 tmp_path_factory.mktemp("m") / "family"), prompts)


@pytest.fixture(scope="module")
def block_model(tmp_path_factory) -> Path:
    from layerscan.tiny import save_planted

    # branch_gain 32 in block 1 alone: FP8 everywhere ~32 dB, block 1 in BF16 ~40 dB.
    return save_planted("tiny-qwen-image", "img_mlp", [1], tmp_path_factory.mktemp("m") / "block1",
                        branch_gain=32.0)


@pytest.fixture(scope="module")
def block_session(block_model, prompts):
    return _session(block_model, prompts)


def _run(session, out: Path, strategy: str, granularity: str = "family", refine: bool = False):
    study = dataclasses.replace(session.study, strategy=strategy, granularity=granularity,
                                refine=refine)
    outcome = run_study(dataclasses.replace(session, study=study), out, strategy)
    cost = outcome.ledger.cost()
    proxy_cost = outcome.notes.get("proxy", {}).get("cost", {}).get("full_evaluations", 0.0)
    answer = None if outcome.recommended is None else outcome.recommended.config
    return answer, cost, proxy_cost, outcome


def _assert_a_third(auto_cost, proxy_cost, greedy_cost):
    """Auto's full evaluations plus its proxy cost, in full-evaluation equivalents, are at most a
    third of greedy's full evaluations."""
    assert auto_cost["full_evaluations"] + proxy_cost <= greedy_cost["full_evaluations"] / 3 + 1e-9
    assert 0 < proxy_cost < 0.5


def test_auto_equals_greedy_on_a_planted_family_with_a_third_of_the_evaluations(
        family_session, prompts, tmp_path, monkeypatch):
    answer, greedy, _, _ = _run(family_session, tmp_path / "greedy", "greedy")
    assert answer == ("img_mlp",) and greedy["configurations"] == 7
    with monkeypatch.context() as patch:  # a DiT the proxies cannot replay: greedy's own ranking
        def unavailable(session):
            raise RuntimeError("cannot replay")
        patch.setattr("layerscan.proxy.scores.Proxies", unavailable)
        answer, _, _, outcome = _run(family_session, tmp_path / "greedy", "auto")
    assert answer == ("img_mlp",) and outcome.new_evaluations == 0
    assert any("proxies unavailable" in line for line in outcome.notes["proxy"]["log"])
    # Through the command line, with the report.
    out = tmp_path / "auto"
    assert main(["run", "--model", family_session.study.model, "--study", "tiny-qwen-image",
                 "--prompts", str(prompts), "--out", str(out), *CRITERION, "--strategy", "auto"]) == 0
    rec = json.loads((out / "recommendation.json").read_text())
    assert rec["strategy"] == "auto"
    assert rec["quantization_config"]["ignored_layers"] == IMG_MLP
    assert rec["ignored_layers_patterns"] == ["img_mlp"]
    assert rec["evaluated_configurations"] <= greedy["configurations"] / 3
    assert rec["stopped_early"] == 1  # FP8 everywhere, after its first prompt
    auto_cost = dict(full_evaluations=rec["full_evaluation_equivalents"])
    _assert_a_third(auto_cost, rec["proxy_cost_full_evaluations"], greedy)
    report = (out / "report.md").read_text()
    assert "## Proxy sensitivity" in report and "Spearman" in report
    assert "full-evaluation equivalents" in report and "| stopped |" in report
    trials = (out / "trials.jsonl").read_text().splitlines()
    assert [json.loads(line)["record"]["status"] for line in trials] == ["stopped", "complete"]


def test_auto_equals_greedy_on_a_single_planted_block(block_session, tmp_path):
    # Family granularity: the family is the answer for both.
    g_answer, g_family, _, _ = _run(block_session, tmp_path / "g", "greedy")
    a_answer, a_cost, a_proxy, _ = _run(block_session, tmp_path / "a-family", "auto")
    assert g_answer == a_answer == ("img_mlp",)
    _assert_a_third(a_cost, a_proxy, g_family)
    # Refined (greedy refines by brute force in the same directory, reusing its family runs).
    g_answer, g_refined, _, g_out = _run(block_session, tmp_path / "g", "greedy", refine=True)
    assert g_answer == ("transformer_blocks.1.img_mlp",)
    assert g_refined["configurations"] == 7 + 4
    a_answer, a_cost, a_proxy, a_out = _run(block_session, tmp_path / "a-refine", "auto", refine=True)
    assert a_answer == g_answer
    _assert_a_third(a_cost, a_proxy, g_refined)
    assert a_cost["configurations"] <= g_refined["configurations"] / 3
    assert [c["pattern"] for c in a_out.notes["proxy"]["cells"]][1] == "transformer_blocks.1.img_mlp"
    # Block granularity: block 1, found by both.
    g_answer, g_block, _, _ = _run(block_session, tmp_path / "g-block", "greedy", "block")
    a_answer, a_cost, a_proxy, _ = _run(block_session, tmp_path / "a-block", "auto", "block")
    assert g_answer == a_answer == ("transformer_blocks.1.",)
    assert g_block["configurations"] == 5
    _assert_a_third(a_cost, a_proxy, g_block)


def test_stopped_records_are_reused_only_while_they_prove_failure(family_session, tmp_path):
    out = tmp_path / "r"
    answer, cost, _, outcome = _run(family_session, out, "auto")
    assert answer == ("img_mlp",) and outcome.new_evaluations == 2  # FP8 all (stopped), img_mlp
    # Same criterion: the stopped FP8-all record still proves failure; nothing reruns.
    _, _, _, outcome = _run(family_session, out, "auto")
    assert outcome.new_evaluations == 0
    loose = dataclasses.replace(family_session.study, criterion=Criterion("psnr", 30.0, 25.0))
    loose_session = dataclasses.replace(family_session, study=loose, criterion=loose.criterion)
    # Under a looser criterion the partial record decides nothing: FP8 everywhere is continued
    # from where it stopped, passes, and nothing is kept.
    answer, _, _, outcome = _run(loose_session, out, "auto")
    assert answer == () and outcome.new_evaluations == 1
    fp8_all = next(r for r in outcome.records if r.config == ())
    assert fp8_all.status == "complete" and len(fp8_all.per_prompt) == len(family_session.spec.items())


# --- trajectory and proxies ----------------------------------------------------------------------

def _fresh_capture(session) -> None:
    capture._MEMORY.clear()
    directory = capture.cache_dir(session.loaded, session.spec, session.cache_root)
    if directory.exists():
        import shutil

        shutil.rmtree(directory)
    session.engine.apply(None)
    with capture.capture_trajectory(session.loaded, session.spec, session.cache_root):
        for _ in iter_images(session.loaded, session.spec):
            pass


@pytest.mark.parametrize("which", ["qwen", "flux"])
def test_trajectory_replays_bit_for_bit_and_survives_the_cache(which, family_session, prompts):
    session = family_session if which == "qwen" else _session(
        "tiny-flux", prompts, "tiny-flux", criterion_metric="psnr")
    _fresh_capture(session)
    traj = capture.cached_trajectory(session.loaded, session.spec, session.cache_root)
    images = len(session.spec.items())  # two prompts, two seeds
    assert traj is not None and images == 4
    assert [(s.image, s.step) for s in traj.samples] == capture.sample_plan(session.spec.steps, images)
    assert len(traj.samples) == 2  # one per 8 (image, step) pairs
    expected_calls = 8  # both run true CFG here (a negative prompt): two DiT calls per step
    assert traj.calls_per_image == expected_calls
    assert traj.full_evaluation_calls == expected_calls * images
    # From disk, in a fresh process's view: the same inputs and outputs.
    capture._MEMORY.clear()
    loaded = capture.cached_trajectory(session.loaded, session.spec, session.cache_root)
    assert torch.equal(loaded.samples[0].output, traj.samples[0].output)
    proxies = Proxies(session)
    assert proxies.end_to_end(["transformer:"]) == 0.0  # the replay reproduces BF16 exactly
    local = proxies.layer_local()
    assert set(local) == {l.name for l in session.loaded.index.of("transformer")}
    assert all(math.isfinite(v) and v >= 0 for v in local.values())
    assert proxies.end_to_end([]) > 0.0
    cost = proxies.describe_cost()
    # Two end-to-end replays and the layer-local pass (two calls), each over every sample.
    assert cost["calls"] == (1 + 2 + 1) * len(traj.samples)
    assert cost["full_evaluations"] == pytest.approx(cost["calls"] / traj.full_evaluation_calls)
    if which == "qwen":  # the planted family dominates the layer-local proxy
        scores = {g.pattern: proxies.score(g.layers) for g in session.loaded.index.groups("family")}
        assert max(scores, key=scores.get) == "img_mlp"
    session.engine.apply(None)
