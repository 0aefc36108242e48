"""The downsampled loss series and what the plot takes from it."""

from __future__ import annotations

import math

from loopscope.shared.history import Series
from loopscope.ui.plot import plot_points


def _filled(values: list[float], capacity: int = 8) -> Series:
    series = Series(capacity)
    for x, value in enumerate(values, start=1):
        series.add(x, value)
    return series


def test_means_are_the_finite_bucket_means_that_points_reports():
    values = [1.0, 3.0, math.nan, math.inf, 2.0, 4.0, math.nan, math.nan] * 5  # buckets of 8 after merging
    series = _filled(values)
    expected = [(p.x, p.mean) for p in series.points() if p.count > p.nonfinite]
    assert list(zip(*series.means())) == expected
    assert len(expected) == len(series) and series.width == 8
    assert expected[0] == (8, 2.5)  # the finite values of the first 8: 1, 3, 2, 4 (inf never counts)


def test_a_bucket_with_no_finite_value_is_left_out_of_the_plot():
    series = _filled([1.0, math.nan, 2.0])
    assert plot_points(series, width=60) == ([1, 3], [1.0, 2.0])


def test_plot_points_on_a_log_axis_drop_non_positive_losses():
    series = _filled([100.0, 0.0, 10.0, -1.0])
    xs, ys = plot_points(series, width=60, log=True)
    assert xs == [1, 3] and ys == [2.0, 1.0]


def test_plot_points_stay_within_two_per_column_however_long_the_run():
    series = Series(4096)
    for x in range(100_000):
        series.add(x, 1.0 / (x + 1))
    xs, ys = plot_points(series, width=50)
    assert 50 < len(xs) <= 100
    assert xs[-1] == 99_999 and ys == sorted(ys, reverse=True)  # ends at the latest point; still falling
