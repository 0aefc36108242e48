"""The run-mode probe schedule: screen-rate probing for cheap probes, budgeted for costly ones."""

from loopscope.engine.probe_schedule import ProbeSchedule


def simulate(plain: float, probed: float, seconds: float = 60.0) -> float:
    """Fraction of the run's time spent on probing, with iterations of the given costs."""
    schedule, now, extra = ProbeSchedule(), 0.0, 0.0
    while now < seconds:
        probe = schedule.should_probe(now)
        cost = probed if probe else plain
        schedule.record(probe, now, cost)
        extra += cost - plain
        now += cost
    return extra / now


def test_cheap_probes_run_at_the_panels_rate():
    schedule, now, probes = ProbeSchedule(), 0.0, 0
    while now < 10.0:
        probe = schedule.should_probe(now)
        schedule.record(probe, now, 0.0011 if probe else 0.001)
        probes += probe
        now += 0.001
    assert 40 <= probes <= 55  # about 5 a second, the rate the detail panels redraw at


def test_a_slow_first_probe_does_not_starve_the_screen():
    # The first probed iteration pays one-off costs (20 ms here); the later ones cost 3 ms.
    schedule, now, probes = ProbeSchedule(), 0.0, 0
    while now < 2.0:
        probe = schedule.should_probe(now)
        cost = (0.020 if probes == 0 else 0.003) if probe else 0.001
        schedule.record(probe, now, cost)
        probes += probe
        now += cost
    assert probes >= 8  # the panels' 5 a second from the start, not one a second


def test_costly_probes_stay_within_the_budget():
    assert simulate(plain=0.030, probed=0.090) < 0.03  # a CNN whose full statistics triple an iteration
    assert simulate(plain=0.001, probed=0.050) < 0.03
