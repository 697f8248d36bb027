"""pipeline/monitor/stats.py and summary.py: the KS statistic and its p-value checked by hand, quantiles, shifts,
windows; no model."""

import math

import pytest

from pipeline.monitor.stats import kolmogorov_sf, ks_2samp, mean_shift, proportion_shift, quantile
from pipeline.monitor.summary import parse_window, split
from rlhf.errors import UsageError


def test_ks_statistic_and_asymptotic_p_value_by_hand():
    # F_a steps at 1,2,3,4 (by 1/4), F_b at 3,4,5,6,7 (by 1/5). At x=4: F_a = 1, F_b = 2/5, the largest gap: D = 0.6.
    d, p = ks_2samp([1, 2, 3, 4], [3, 4, 5, 6, 7])
    assert d == pytest.approx(0.6)
    # lambda = sqrt(4*5/9) * 0.6 = 0.894427; Q = 2 (e^-1.6 - e^-6.4 + e^-14.4 - ...) = 2 (0.2018965 - 0.0016616
    # + 0.0000006) = 0.400471 (the series form; the code takes Jacobi's form below lambda 1.18, so both agree)
    assert p == pytest.approx(0.400471, abs=1e-6)
    # ties: the CDFs are compared at every value, so identical samples give D = 0 and p = 1
    assert ks_2samp([1, 1, 2, 2], [2, 1, 2, 1]) == (0.0, 1.0)
    # disjoint samples: D = 1
    assert ks_2samp([0] * 30, [1] * 30)[0] == 1.0 and ks_2samp([0] * 30, [1] * 30)[1] < 1e-10


def test_kolmogorov_distribution_at_known_points_and_across_the_two_forms():
    # tabulated values of the Kolmogorov distribution's survival function
    assert kolmogorov_sf(0.5) == pytest.approx(0.963945, abs=1e-6)
    assert kolmogorov_sf(1.0) == pytest.approx(0.269999, abs=1e-6)
    # 2 (e^-3.6992 - e^-14.7968) = 2 (0.0247433 - 0.0000004): near 5%, the critical value being 1.3581
    assert kolmogorov_sf(1.36) == pytest.approx(0.049486, abs=1e-6)
    assert kolmogorov_sf(1.18 - 1e-9) == pytest.approx(kolmogorov_sf(1.18 + 1e-9), abs=1e-8)
    assert kolmogorov_sf(0) == 1.0 and kolmogorov_sf(0.05) == 1.0


def test_quantiles_interpolate_like_numpy_and_shifts_are_one_sided():
    assert quantile([4, 1, 3, 2], 0.5) == 2.5 and quantile([1, 2, 3, 4, 5], 0.1) == pytest.approx(1.4)
    assert quantile([], 0.5) is None
    up = mean_shift([0, 1, 0, 1], [1, 2, 1, 2])  # +1, se = sqrt(1/3/4 * 2) = 0.408: z = 2.449
    assert up["diff"] == 1 and up["z"] == pytest.approx(1 / math.sqrt(1 / 6)) and up["p_up"] < 0.01 < up["p_down"]
    rate = proportion_shift((8, 10), (2, 10))  # 0.8 -> 0.2, pooled 0.5: se = sqrt(0.25 * 0.2) = 0.2236, z = -2.683
    assert rate["z"] == pytest.approx(-0.6 / math.sqrt(0.05)) and rate["p_down"] < 0.01
    assert proportion_shift((0, 0), (1, 2)) is None


def test_windows_by_count_or_duration():
    rows = [{"seq": i, "created": 100.0 + 10 * i} for i in range(7)]
    assert [len(w) for w in split(rows, parse_window("3"))] == [3, 3, 1]
    # 25 s windows from t=100: [100, 125) holds 100, 110, 120; [125, 150) 130, 140; [150, 175) 150, 160
    assert [len(w) for w in split(rows, parse_window("25s"))] == [3, 2, 2]
    assert parse_window("1h").size == 3600 and parse_window("2d").size == 172800
    for bad in ("0", "x", "1.5", "5w", "-3"):
        with pytest.raises(UsageError, match="--window"):
            parse_window(bad)


def test_time_windows_over_a_long_gap_are_refused_before_they_are_built():
    """A server run again into the same log three months later: `--window 1m` would make 129,601 windows (mostly
    empty, each one summarised, tested for drift and plotted: 78 s, 2 GB and a 146 MB monitor.json for 192 answers).
    The count is checked before any window is built, and the message says which window would fit."""
    rows = [{"seq": 1, "created": 0.0}, {"seq": 2, "created": 90 * 86400.0}]
    with pytest.raises(UsageError, match=r"--window 1m: .*129,601 windows.*at most 10,000.*--window 13m"):
        split(rows, parse_window("1m"))
    assert len(split(rows, parse_window("13m"))) == 9970  # 7,776,000 s / 780 s = 9969.2: windows 0 to 9969


def test_an_answer_rated_twice_counts_once_with_its_latest_rating():
    """A user who clicks thumbs-up and then corrects it to down has given one rating, the latest, as
    `rlhf feedback export` reads it; the monitor's thumbs-up rate (and the hacking test's two-proportion z-test,
    which counts ratings as independent) must not count the answer twice."""
    from pipeline.monitor.summary import summarise

    rows = [{"seq": i, "id": f"c{i}", "created": float(i), "latency_ms": 1.0, "finish_reason": "stop",
             "completion_tokens": 3} for i in range(2)]
    feedback = [{"seq": 1, "id": "c0", "rating": "up"}, {"seq": 2, "id": "c0", "rating": "down"},
                {"seq": 3, "id": "c1", "rating": "up"}, {"seq": 4, "id": "c1", "rating": "up"}]
    got = summarise(rows, feedback, {}, parse_window("10"), None, 0.01, 20)
    assert got["windows"][0]["thumbs"] == {"up": 1, "rated": 2, "up_rate": 0.5, "preferences": 0}
