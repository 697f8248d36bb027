"""The monitor's plots over time, as PNG bytes (matplotlib through pipeline/report/plots.py): one small chart per
quantity, the windows along the x axis. `monitor_plots(summary)` gives them by title, for the monitor page and for
`rlhf report` (which shows the first few beside the alerts).
"""

from __future__ import annotations

import math

from pipeline.report.plots import _png, _pyplot


def _num(v) -> float:
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else math.nan


def _series(windows: list[dict], *path: str) -> list[float]:
    out = []
    for w in windows:
        v = w
        for key in path:
            v = v.get(key) if isinstance(v, dict) else None
        out.append(_num(v))
    return out


def _chart(title: str, ylabel: str, draw) -> bytes:
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(3.8, 2.5), layout="constrained")  # three to a row, like the report's curves
    draw(ax)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("window", fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, frameon=False)
    return _png(fig)


def _band(ax, xs, windows, metric: str, color: str, label: str, baseline: dict | None = None) -> None:
    """The mean of a distribution per window, its p25-p75 and p10-p90 bands, and the baseline's median and 10th
    percentile as dashed lines."""
    mean = _series(windows, metric, "mean")
    ax.fill_between(xs, _series(windows, metric, "p10"), _series(windows, metric, "p90"), color=color, alpha=0.15,
                    label="p10-p90")
    ax.fill_between(xs, _series(windows, metric, "p25"), _series(windows, metric, "p75"), color=color, alpha=0.3,
                    label="p25-p75")
    ax.plot(xs, mean, marker="o", markersize=3, color=color, label=label)
    ref = (baseline or {}).get(metric) or {}
    for key, style in (("p50", "--"), ("p10", ":")):
        if isinstance(ref.get(key), (int, float)):
            ax.axhline(ref[key], color="#555", linestyle=style, linewidth=1, label=f"baseline {key}")


def monitor_plots(summary: dict) -> dict[str, bytes]:
    """{title: PNG}: reward (with its quantile bands), quality (rule, judge, thumbs-up rate), drift p-values, volume,
    latency, length, EOS and truncation rates; charts with nothing to show are left out."""
    windows = summary.get("windows") or []
    if not windows:
        return {}
    xs = [w.get("index", i) for i, w in enumerate(windows)]
    base = (summary.get("baseline") or {}).get("scores")
    out = {}

    def has(*path):
        return any(not math.isnan(v) for v in _series(windows, *path))

    if has("reward", "mean"):
        out["Reward model score"] = _chart("Reward model score", "normalised reward",
                                           lambda ax: _band(ax, xs, windows, "reward", "#4c78a8", "mean", base))

    def quality(ax):
        for path, label, color in ((("rule", "mean"), "rule", "#54a24b"), (("judge", "mean"), "judge win rate",
                                   "#b279a2"), (("thumbs", "up_rate"), "thumbs-up rate", "#f58518")):
            if has(*path):
                ax.plot(xs, _series(windows, *path), marker="o", markersize=3, label=label, color=color)
        ax.set_ylim(-0.05, 1.05)

    if has("rule", "mean") or has("judge", "mean") or has("thumbs", "up_rate"):
        out["Quality: rule, judge, users"] = _chart("Quality: rule, judge, users", "mean / rate", quality)
    drift = summary.get("drift") or {}
    metrics = sorted({m for w in windows for m in (w.get("drift") or {})})
    if metrics:
        def pvalues(ax):
            for m in metrics:
                ax.plot(xs, [max(v, 1e-300) for v in _series(windows, "drift", m, "p_value")], marker="o",
                        markersize=3, label=m)
            ax.set_yscale("log")
            ax.axhline(drift.get("threshold", 0.01), color="#c0392b", linestyle="--", linewidth=1, label="alert below")

        out["Drift: KS p-value vs baseline"] = _chart("Drift: KS p-value vs baseline", "p-value", pvalues)
    out["Volume"] = _chart("Volume", "completions", lambda ax: ax.bar(xs, _series(windows, "volume"),
                                                                        color="#4c78a8", width=0.7))

    def latency(ax):
        ax.plot(xs, _series(windows, "latency_ms", "p50"), marker="o", markersize=3, label="p50")
        ax.plot(xs, _series(windows, "latency_ms", "p95"), marker="o", markersize=3, label="p95")

    if has("latency_ms", "p50"):
        out["Latency"] = _chart("Latency", "ms", latency)
    if has("length", "mean"):
        out["Response length"] = _chart("Response length", "tokens",
                                        lambda ax: _band(ax, xs, windows, "length", "#72b7b2", "mean",
                                                         (summary.get("baseline") or {}).get("scores")))

    def finish(ax):
        ax.plot(xs, _series(windows, "eos_rate"), marker="o", markersize=3, label="EOS (stop)")
        ax.plot(xs, _series(windows, "truncation_rate"), marker="o", markersize=3, label="truncated (length)")
        ax.set_ylim(-0.05, 1.05)

    if has("eos_rate"):
        out["How answers end"] = _chart("How answers end", "share", finish)
    return out
