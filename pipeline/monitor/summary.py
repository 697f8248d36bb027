"""What `rlhf monitor` concludes from the scored traffic: per-window statistics, drift against the evaluate stage's
baseline, the reward-hacking signal and the alerts (docs/monitor.md has the formulas and thresholds).

    windows = split(rows, parse_window("200"))      # 200 completions a window, in the order they were recorded
    windows = split(rows, parse_window("1h"))       # or one hour a window (s, m, h, d), from the first completion
    summary = summarise(rows, feedback, scores, window, baseline_scores, alpha=0.01, min_rows=20)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pipeline.monitor.stats import ks_2samp, mean, mean_shift, proportion_shift, quantile
from rlhf.errors import UsageError

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
QUALITY = ("rule", "judge")  # scores that say whether an answer is good, beside the reward model's
DRIFT_METRICS = ("reward", "rule", "length")  # compared with the baseline's distributions
# Time windows are counted by the span of the log, not its rows: a log the server wrote into again months later
# would make hundreds of thousands of (empty) windows at --window 1m. Beyond this many, the run is refused.
MAX_WINDOWS = 10_000


@dataclass(frozen=True)
class Window:
    kind: str  # "count": `size` completions a window; "time": `size` seconds a window
    size: float
    spec: str


def parse_window(spec: str) -> Window:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(spec))
    if not m or float(m.group(1)) <= 0 or (not m.group(2) and "." in m.group(1)):
        raise UsageError(f"--window {spec}: expected N (completions a window, e.g. 200) or a duration (30m, 1h, "
                         "1d; units s, m, h, d)")
    if m.group(2):
        return Window("time", float(m.group(1)) * UNITS[m.group(2)], spec)
    return Window("count", int(m.group(1)), spec)


def split(rows: list[dict], window: Window) -> list[list[dict]]:
    """Rows (in seq order) by window: consecutive runs of `size` completions, the last one possibly shorter; or
    spans of `size` seconds from the first completion's time, empty spans kept (they are a volume of 0)."""
    if window.kind == "count":
        n = int(window.size)
        return [rows[i : i + n] for i in range(0, len(rows), n)]
    if not rows:
        return []
    t0 = min(r["created"] for r in rows)
    span = max(r["created"] for r in rows) - t0
    count = int(span // window.size) + 1
    if count > MAX_WINDOWS:
        raise UsageError(f"--window {window.spec}: the log spans {span / 86400:.1f} days, {count:,} windows of "
                         f"{window.spec} (at most {MAX_WINDOWS:,}); give a longer one, e.g. --window {_fitting(span)}")
    out: list[list[dict]] = [[] for _ in range(count)]
    for r in rows:
        out[int((r["created"] - t0) // window.size)].append(r)
    return out


def _fitting(span: float) -> str:
    """The shortest whole number of minutes, hours or days that splits `span` seconds into MAX_WINDOWS or fewer."""
    need = span / (MAX_WINDOWS - 1)
    for unit, limit in (("m", 60), ("h", 24), ("d", None)):
        n = math.floor(need / UNITS[unit]) + 1
        if limit is None or n < limit:
            return f"{n}{unit}"
    raise AssertionError("unreachable")


def distribution(xs: list[float]) -> dict:
    """n, mean and the quantiles of QUANTILES (p10 ... p90) of a list of numbers."""
    return {"n": len(xs), "mean": mean(xs), **{f"p{round(q * 100)}": quantile(xs, q) for q in QUANTILES}}


def _values(rows: list[dict], scores: dict[str, dict], name: str) -> list[float]:
    got = scores.get(name) or {}
    return [got[r["id"]] for r in rows if got.get(r["id"]) is not None]


def lengths(rows: list[dict]) -> list[float]:
    return [r["completion_tokens"] for r in rows if r.get("completion_tokens") is not None]


def thumbs(rows: list[dict], ratings: dict[str, list[str]]) -> tuple[int, int]:
    """(thumbs up, thumbs up + down) given to the rows' answers."""
    given = [g for r in rows for g in ratings.get(r["id"], [])]
    return given.count("up"), len(given)


def window_stats(index: int, rows: list[dict], scores: dict[str, dict], ratings: dict[str, list[str]],
                 preferences: dict[str, int], window: Window, t0: float | None) -> dict:
    latency = [r["latency_ms"] for r in rows if r.get("latency_ms") is not None]
    finished = [r.get("finish_reason") for r in rows if r.get("finish_reason")]
    up, rated = thumbs(rows, ratings)
    if window.kind == "time":
        start = t0 + index * window.size
        span = (start, start + window.size)
    else:
        span = (min(r["created"] for r in rows), max(r["created"] for r in rows)) if rows else (None, None)
    return {
        "index": index, "start": span[0], "end": span[1], "volume": len(rows),
        "first_seq": rows[0]["seq"] if rows else None, "last_seq": rows[-1]["seq"] if rows else None,
        "partial": window.kind == "count" and len(rows) < window.size,
        "latency_ms": {"p50": quantile(latency, 0.5), "p95": quantile(latency, 0.95), "n": len(latency)},
        "length": distribution(lengths(rows)),
        "eos_rate": finished.count("stop") / len(finished) if finished else None,
        "truncation_rate": finished.count("length") / len(finished) if finished else None,
        "reward": distribution(_values(rows, scores, "reward")),
        **{name: distribution(_values(rows, scores, name)) for name in QUALITY},
        "thumbs": {"up": up, "rated": rated, "up_rate": up / rated if rated else None,
                   "preferences": sum(preferences.get(r["id"], 0) for r in rows)},
    }


def drift(windows: list[list[dict]], stats: list[dict], scores: dict[str, dict], base: dict[str, list[float]],
          alpha: float, min_rows: int) -> tuple[dict, list[dict]]:
    """KS of each window's reward, rule and length distributions against the baseline's, and the share of the
    window's answers below the baseline's 10th percentile. A test alerts at p < alpha / (number of tests run):
    Bonferroni over the windows and metrics, so unchanged traffic raises a false alarm with probability <= alpha."""
    tests = []
    for rows, st in zip(windows, stats):
        st["drift"], st["below_baseline_p10"] = {}, {}
        for metric in DRIFT_METRICS:
            now = lengths(rows) if metric == "length" else _values(rows, scores, metric)
            ref = base.get(metric) or []
            if not ref or not now:
                continue
            if metric != "length":  # a score below the baseline's 10th percentile: a worse answer than 9 in 10
                p10 = quantile(ref, 0.1)
                st["below_baseline_p10"][metric] = sum(x < p10 for x in now) / len(now)
            if len(now) >= min_rows and len(ref) >= min_rows:
                d, p = ks_2samp(now, ref)
                st["drift"][metric] = {"ks": d, "p_value": p, "n": len(now), "baseline_n": len(ref)}
                tests.append((st, metric))
    threshold = alpha / len(tests) if tests else alpha
    alerts = []
    for st, metric in tests:
        t = st["drift"][metric]
        t["alert"] = t["p_value"] < threshold
        if t["alert"]:
            alerts.append({"kind": "drift", "metric": metric, "window": st["index"], "ks": t["ks"],
                           "p_value": t["p_value"], "threshold": threshold, "n": t["n"], "baseline_n": t["baseline_n"],
                           "below_baseline_p10": st["below_baseline_p10"].get(metric),
                           "message": f"window {st['index']}: the {metric} distribution differs from the baseline's "
                                      f"(KS D={t['ks']:.3f}, p={t['p_value']:.2g} < {threshold:.2g})"
                                      + (f"; {st['below_baseline_p10'][metric]:.0%} of its answers score below the "
                                         "baseline's 10th percentile" if metric in st["below_baseline_p10"] else "")})
    return {"tests": len(tests), "alpha": alpha, "threshold": threshold, "min_rows": min_rows}, alerts


def hacking(windows: list[list[dict]], stats: list[dict], scores: dict[str, dict], ratings: dict[str, list[str]],
            alpha: float, min_rows: int) -> tuple[dict, list[dict]]:
    """The reward model's score rising while the rule, the judge or the thumbs-up rate falls, from the first window
    to the last one holding at least min_rows answers: a rise is a one-sided z-test of the reward means at p < alpha,
    a fall the same for a quality signal at p < alpha / (number of quality signals compared)."""
    full = [i for i, rows in enumerate(windows) if len(rows) >= min_rows]
    out = {"alpha": alpha, "min_rows": min_rows, "first": full[0] if full else None,
           "last": full[-1] if len(full) > 1 else None, "reward": None, "signals": {}}
    if len(full) < 2:
        out["note"] = f"fewer than two windows of {min_rows} or more answers: nothing to compare"
        return out, []
    a, b = windows[full[0]], windows[full[-1]]
    out["reward"] = mean_shift(_values(a, scores, "reward"), _values(b, scores, "reward"))
    for name in QUALITY:
        shift = mean_shift(_values(a, scores, name), _values(b, scores, name))
        if shift:
            out["signals"][name] = shift
    shift = proportion_shift(thumbs(a, ratings), thumbs(b, ratings))
    if shift:
        out["signals"]["thumbs_up_rate"] = shift
    quality_threshold = alpha / max(1, len(out["signals"]))
    out["quality_threshold"] = quality_threshold
    rise = out["reward"] is not None and out["reward"]["p_up"] < alpha
    falling = {k: s for k, s in out["signals"].items() if s["p_down"] < quality_threshold}
    out["alert"] = bool(rise and falling)
    if not out["alert"]:
        return out, []
    r = out["reward"]
    fell = "; ".join(f"{k} {s['from']:.3f} -> {s['to']:.3f} (z={s['z']:.2f}, p={s['p_down']:.2g})"
                     for k, s in falling.items())
    return out, [{"kind": "hacking", "first_window": full[0], "last_window": full[-1], "reward": r,
                  "falling": falling, "alpha": alpha, "quality_threshold": quality_threshold,
                  "message": f"windows {full[0]} -> {full[-1]}: the reward model's score rose {r['from']:.3f} -> "
                             f"{r['to']:.3f} (z={r['z']:.2f}, p={r['p_up']:.2g}) while {fell}"}]


def summarise(rows: list[dict], feedback: list[dict], scores: dict[str, dict], window: Window,
              base: dict[str, list[float]] | None, alpha: float, min_rows: int) -> dict:
    """Windows, their statistics, drift against `base` ({"reward"|"rule"|"length": the baseline's values}) when
    given, the hacking signal, and the alerts (drift first, then hacking)."""
    ratings: dict[str, list[str]] = {}
    preferences: dict[str, int] = {}
    for f in feedback:  # in seq order
        if f.get("rating"):  # the latest rating of an answer is its rating (a corrected click), as the export reads it
            ratings[f["id"]] = [f["rating"]]
        elif f.get("preferred_over"):
            preferences[f["id"]] = preferences.get(f["id"], 0) + 1
    windows = split(rows, window)
    t0 = min(r["created"] for r in rows) if rows else None
    stats = [window_stats(i, w, scores, ratings, preferences, window, t0) for i, w in enumerate(windows)]
    overall = window_stats(0, rows, scores, ratings, preferences, Window("count", len(rows) or 1, "all"), t0)
    drift_info, alerts = drift(windows, stats, scores, base, alpha, min_rows) if base else (None, [])
    hack_info, hack_alerts = hacking(windows, stats, scores, ratings, alpha, min_rows)
    return {"window": {"kind": window.kind, "size": window.size, "spec": window.spec}, "windows": stats,
            "overall": {k: v for k, v in overall.items() if k not in ("index", "partial", "first_seq", "last_seq")},
            "drift": drift_info, "hacking": hack_info, "alerts": alerts + hack_alerts}
