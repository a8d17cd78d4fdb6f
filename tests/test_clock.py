"""Where a run's time goes: nested phases are each charged once, and a run's breakdown adds up.

The clock reads ``time.perf_counter``; these tests hand it a counter that moves only when told,
so every number is exact whatever the machine is doing.
"""

from __future__ import annotations

import pytest

from layerscan import clock as clock_module
from layerscan.clock import COMPILE, GENERATE, OTHER, PROXIES, SWITCH, PhaseClock, timing_line, timing_since


class _Time:
    def __init__(self) -> None:
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def fake_time(monkeypatch) -> _Time:
    fake = _Time()
    monkeypatch.setattr(clock_module, "time", fake)
    return fake


def test_a_phase_is_charged_only_the_time_outside_the_phases_inside_it(fake_time):
    clock = PhaseClock()
    before = clock.snapshot()
    with clock.phase(PROXIES):
        fake_time.sleep(2)
        with clock.phase(SWITCH):
            fake_time.sleep(5)
        with clock.phase(GENERATE) as frame:
            fake_time.sleep(3)
            frame.name = COMPILE  # found out afterwards: this output compiled a graph
    fake_time.sleep(1)  # outside every phase
    timing = timing_since(before, clock.snapshot())
    phases = timing["phases"]
    assert phases[SWITCH] == {"seconds": 5, "count": 1}
    assert phases[COMPILE] == {"seconds": 3, "count": 1}
    assert phases[PROXIES] == {"seconds": 2, "count": 1}  # not the 10 s spent inside it
    assert GENERATE not in phases  # renamed, so never charged
    assert phases[OTHER] == {"seconds": 1, "count": None}
    assert timing["wall"] == 11 and timing["outputs_generated"] == 1
    assert timing["generation_share"] == round(3 / 11, 4)
    assert sum(p["seconds"] for p in phases.values()) == timing["wall"]  # every second, once
    assert list(phases) == [COMPILE, SWITCH, PROXIES, OTHER]  # the report's order


def test_a_breakdown_covers_only_what_happened_after_its_snapshot(fake_time):
    clock = PhaseClock()
    with clock.phase(GENERATE):
        fake_time.sleep(20)
    before = clock.snapshot()
    with clock.phase(GENERATE):
        fake_time.sleep(10)
    fake_time.sleep(2)
    timing = timing_since(before, clock.snapshot())
    assert timing["phases"][GENERATE] == {"seconds": 10, "count": 1}
    assert timing_line(timing) == ("time: 12.0 s (generating outputs 83 %, everything else 17 %); "
                                   "1 output generated")


def test_a_phase_that_raises_is_still_charged_and_unwound(fake_time, monkeypatch):
    clock = PhaseClock()
    with pytest.raises(RuntimeError):
        with clock.phase(PROXIES):
            with clock.phase(SWITCH):
                fake_time.sleep(1)
                raise RuntimeError("out of memory")
    assert clock.seconds[SWITCH] == 1 and clock.counts[SWITCH] == 1
    assert clock.seconds[PROXIES] == 0 and not clock._stack

    # The device reporting an error when the phase ends: charged and unwound all the same.
    def broken(device):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    working = clock_module.synchronize
    with clock.phase(PROXIES):
        with pytest.raises(RuntimeError, match="illegal memory access"):
            with clock.phase(GENERATE):
                fake_time.sleep(4)
                monkeypatch.setattr(clock_module, "synchronize", broken)
        monkeypatch.setattr(clock_module, "synchronize", working)
        fake_time.sleep(1)
    assert clock.seconds[GENERATE] == 4 and clock.seconds[PROXIES] == 1 and not clock._stack
