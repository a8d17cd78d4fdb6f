"""Every group an answer keeps in BF16 is shown necessary before it is reported."""

from __future__ import annotations

import pytest

from layerscan.search.ledger import TrialLedger
from layerscan.search.minimal import proof_reserve, prove_minimal
from layerscan.session import open_session
from layerscan.study import build_study, load_study


@pytest.fixture(scope="module")
def session(planted_dir, two_prompts):
    values = load_study("tiny-qwen-image")
    values.update(model=str(planted_dir), prompts=str(two_prompts), criterion_metric="psnr",
                  criterion_mean=37.0, criterion_worst=35.0)
    return open_session(build_study(values), "cpu")


def test_a_group_the_answer_does_not_need_is_dropped(session, tmp_path):
    """The search ended on img_mlp + to_out (it passes); to_out returned to FP8 still passes, so
    the answer becomes img_mlp, and img_mlp returned to FP8 (FP8 everywhere) fails."""
    ledger = TrialLedger(session, tmp_path, "greedy")
    assert not ledger.evaluate((), early_stop=True).passes
    assert ledger.evaluate(("img_mlp", "to_out")).passes
    proof = prove_minimal(ledger)
    assert proof.config == ("img_mlp",) and proof.complete
    assert proof.dropped == ["to_out"] and proof.necessary == {"img_mlp": ()}
    assert ledger.recommend().config == ("img_mlp",)
    # img_mlp + to_out without img_mlp, and img_mlp alone: two evaluations, FP8 all was known.
    assert ledger.new_evaluations == 4
    assert not ledger.recorded(("to_out",)).passes


def test_the_budget_ending_first_names_the_unproven_groups(session, tmp_path):
    ledger = TrialLedger(session, tmp_path, "greedy")
    ledger.max_trials = 2
    ledger.evaluate((), early_stop=True)
    ledger.evaluate(("img_mlp", "to_out"))
    proof = prove_minimal(ledger)
    assert proof.config == ("img_mlp", "to_out") and not proof.complete
    assert proof.unproven == ["img_mlp", "to_out"] and proof.stop_reason == "budget"
    assert proof.as_dict()["unproven"] == ["img_mlp", "to_out"]


def test_nothing_passing_or_nothing_kept_needs_no_proof(session, tmp_path):
    ledger = TrialLedger(session, tmp_path, "greedy")
    assert prove_minimal(ledger).config is None  # nothing evaluated, nothing passes
    ledger.evaluate(("img_mlp",))
    assert prove_minimal(ledger).necessary == {"img_mlp": ()}


def test_a_budget_planning_strategy_leaves_room_for_the_proof():
    assert proof_reserve(200, 6) == 6 and proof_reserve(8, 6) == 2 and proof_reserve(3, 6) == 0


def test_prefer_speed_and_prefer_memory_keep_different_groups_each_for_its_measured_reason(session, tmp_path):
    """img_mlp alone and img_mlp + to_out both pass.  With timings injected where keeping to_out
    too is faster (FP8 slower than BF16 on a layer, as AMD measured on Wan 2.2), memory keeps
    img_mlp alone and speed keeps to_out as well; the proof says why each group is kept."""
    from layerscan.report.document import write_report
    from layerscan.runner import RunOutcome

    ledger = TrialLedger(session, tmp_path, "greedy")
    ledger.evaluate((), early_stop=True)
    lean, wide = ledger.evaluate(("img_mlp",)), ledger.evaluate(("img_mlp", "to_out"))
    assert lean.passes and wide.passes
    lean.seconds_per_image, wide.seconds_per_image = 0.300, 0.250  # injected: CPU is not as served
    ledger.prefer = "memory"
    assert ledger.recommend().config == ("img_mlp",)
    assert prove_minimal(ledger).necessary == {"img_mlp": ()}
    ledger.prefer = "speed"
    assert ledger.recommend().config == ("img_mlp", "to_out")
    proof = prove_minimal(ledger)
    assert proof.necessary == {"img_mlp": ("to_out",)}  # to_out alone kept: fails
    assert proof.kept_for_objective == {"to_out": ("img_mlp",)}  # passes without, 50 ms slower
    outcome = RunOutcome(ledger, ledger.records(), [], ledger.recommend(), ledger.pareto(), "done",
                         None, {}, minimality=proof)
    write_report(session, outcome, tmp_path)
    report = (tmp_path / "report.md").read_text()
    to_out_bytes = wide.bf16_kept_bytes - lean.bf16_kept_bytes
    from layerscan.report.plots import format_bytes

    assert ("| `to_out` | FP8, BF16 kept: img_mlp | " in report
            and f"passes, but worse on speed: kept for it | {format_bytes(to_out_bytes)} | -50.0 |" in report)
    assert "Chosen for speed among the passing configurations." in report


def test_speed_counts_only_where_it_is_measured_as_served():
    from layerscan.search.answer import resolve_preference

    assert resolve_preference(None, "cuda", "compiled") == ("speed", None)
    assert resolve_preference(None, "cpu", "eager") == ("memory", None)
    prefer, note = resolve_preference("speed", "cpu", "eager")
    assert prefer == "memory" and note.startswith("speed is not measured as served here (cpu, eager")
    assert resolve_preference("quality", "cpu", "eager") == ("quality", None)
