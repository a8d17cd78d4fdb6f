"""Where a run's time goes: nested phases are each charged once, and a run's breakdown adds up."""

from __future__ import annotations

import time

from layerscan.clock import COMPILE, GENERATE, OTHER, PROXIES, SWITCH, PhaseClock, timing_line, timing_since


def test_a_phase_is_charged_only_the_time_outside_the_phases_inside_it():
    clock = PhaseClock()
    before = clock.snapshot()
    with clock.phase(PROXIES):
        time.sleep(0.02)
        with clock.phase(SWITCH):
            time.sleep(0.05)
        with clock.phase(GENERATE) as frame:
            time.sleep(0.03)
            frame.name = COMPILE  # found out afterwards: this output compiled a graph
    time.sleep(0.01)  # outside every phase
    timing = timing_since(before, clock.snapshot())
    phases = timing["phases"]
    assert 0.05 <= phases[SWITCH]["seconds"] < 0.09
    assert 0.03 <= phases[COMPILE]["seconds"] < 0.07
    assert 0.02 <= phases[PROXIES]["seconds"] < 0.045  # not the 0.1 s spent inside it
    assert GENERATE not in phases  # renamed, so never charged
    assert phases[SWITCH]["count"] == phases[COMPILE]["count"] == 1
    assert timing["outputs_generated"] == 1
    # Every second of the wall time is somewhere, once.
    assert abs(sum(p["seconds"] for p in phases.values()) - timing["wall"]) < 0.02
    assert phases[OTHER]["seconds"] >= 0.009
    assert 0.25 < timing["generation_share"] < 0.45


def test_a_breakdown_covers_only_what_happened_after_its_snapshot():
    clock = PhaseClock()
    with clock.phase(GENERATE):
        time.sleep(0.02)
    before = clock.snapshot()
    with clock.phase(GENERATE):
        time.sleep(0.01)
    timing = timing_since(before, clock.snapshot())
    assert timing["phases"][GENERATE]["count"] == 1
    assert timing["phases"][GENERATE]["seconds"] < 0.019
    line = timing_line(timing)
    assert line.startswith(f"time: {timing['wall']:.1f} s (generating outputs ")
    assert line.endswith("; 1 output generated")


def test_a_phase_that_raises_is_still_charged():
    clock = PhaseClock()
    try:
        with clock.phase(SWITCH):
            time.sleep(0.01)
            raise RuntimeError("out of memory")
    except RuntimeError:
        pass
    with clock.phase(GENERATE):
        pass
    assert clock.seconds[SWITCH] >= 0.01 and clock.counts[SWITCH] == 1
    assert clock.counts[GENERATE] == 1  # the stack was unwound: GENERATE is not nested in SWITCH
    assert clock.seconds[SWITCH] < 0.05
