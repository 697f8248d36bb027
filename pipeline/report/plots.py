"""The report's plots, as PNG bytes (matplotlib, Agg): one small chart per group of related metrics a stage
logged in metrics.jsonl (`curve_groups`, `plot_curves`), and an eval stage's win rates with their 95% intervals
(`plot_win_rates`). `stage_plots` gives a stage's charts by title, for the page and for wandb alike.
"""

from __future__ import annotations

import io
import math
import re

from pipeline.report.run import Stage, eval_policies, read_jsonl

# One plot per group of related metrics: (title, pattern on the metric name). First match wins.
GROUPS = (
    ("Loss", r"^(train|eval)/loss$"),
    ("PPO losses", r"^ppo/(policy|value)_loss$"),
    ("Reward", r"(^|/)(reward|rewards|reward_mean|rule_reward_mean|mean_reward|margin|margin_mean)$|"
               r"(^|/)rewards/(chosen|rejected|margins)$"),
    ("Accuracy", r"(^|/)(accuracy|accuracies|mean_token_accuracy)$"),
    ("KL", r"(^|/)(kl|approx_kl)$"),
    ("KL coefficient", r"(^|/)kl_coef$"),
    ("Clip fraction", r"(^|/)(clipfrac|vf_clipfrac)$|clip_ratio"),
    ("Entropy", r"(^|/)entropy$"),
    ("Response length", r"(^|/)response_length$|completions/mean_length$"),
    ("Learning rate", r"(^|/)(learning_rate|lr)$"),
)


def curve_groups(rows: list[dict]) -> dict[str, dict[str, tuple[list, list]]]:
    """metrics.jsonl rows -> {plot title: {metric: (steps, values)}} for the metrics a stage logged, grouped by
    GROUPS; metrics that are not curves (`*_initial`, runtimes, counts) are left out."""
    series: dict[str, tuple[list, list]] = {}
    for i, row in enumerate(rows):
        step = row.get("step", i)
        if not isinstance(step, (int, float)) or isinstance(step, bool):
            continue
        for k, v in row.items():
            if k == "step" or k.endswith("_initial") or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            if math.isfinite(v):
                xs, ys = series.setdefault(k, ([], []))
                xs.append(step)
                ys.append(v)
    groups: dict[str, dict[str, tuple[list, list]]] = {}
    for name in sorted(series):
        for title, pattern in GROUPS:
            if re.search(pattern, name):
                groups.setdefault(title, {})[name] = series[name]
                break
    return {title: groups[title] for title, _ in GROUPS if title in groups}


def _pyplot():
    # deferred for its import cost (a few tenths of a second): `rlhf` imports this package for every command
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _pyplot().close(fig)
    return buf.getvalue()


def plot_curves(title: str, series: dict[str, tuple[list, list]]) -> bytes:
    """One small PNG: the curves of a group of related metrics against the step."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(3.8, 2.5), layout="constrained")  # three to a row
    densest = max(len(xs) for xs, _ in series.values())
    for name, (xs, ys) in series.items():
        sparse = len(xs) * 4 <= densest  # e.g. eval/loss before and after training: points, not a trend
        ax.plot(xs, ys, marker="o" if len(xs) < 12 else None, markersize=4 if sparse else 3,
                linestyle="none" if sparse else "-", linewidth=1.4, label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if title == "Learning rate":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.legend(fontsize=7, frameon=False)
    return _png(fig)


def plot_win_rates(names: list[str], rates: list[float], lows: list[float], highs: list[float],
                   baseline: str) -> bytes:
    """Win rate of each policy against the baseline with its 95% interval as error bars; 0.5 is a draw."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * len(names), 2.8), layout="constrained")
    err = [[max(r - lo, 0) for r, lo in zip(rates, lows)], [max(hi - r, 0) for r, hi in zip(rates, highs)]]
    bars = ax.bar(range(len(names)), rates, yerr=err, capsize=5, color="#4c78a8", width=0.6)
    for bar, rate in zip(bars, rates):  # the value at the foot of its bar, clear of the error bar and 0.5 line
        ax.text(bar.get_x() + bar.get_width() / 2, 0.03, f"{rate:.2f}", ha="center", color="white", fontsize=8)
    ax.axhline(0.5, color="#888", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"win rate vs {baseline}", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title("Win rate (95% interval)", fontsize=10)
    return _png(fig)


def stage_plots(stage: Stage) -> dict[str, bytes]:
    """{title: PNG} for a stage: its curve groups, and the win-rate chart of an eval stage."""
    out = {title: plot_curves(title, series)
           for title, series in curve_groups(read_jsonl(stage.dir / "metrics.jsonl") if stage.dir else []).items()}
    if stage.kind == "eval" and stage.manifest:
        chart = win_rate_chart(stage.manifest)
        if chart:
            out["Win rate"] = chart
    return out


def win_rate_chart(manifest: dict) -> bytes | None:
    m = manifest.get("metrics") or {}
    names = [n for n in eval_policies(manifest) if isinstance(m.get(f"eval/{n}/win_rate"), (int, float))]
    if not names:
        return None

    def get(n, k):
        v = m.get(f"eval/{n}/{k}")
        return v if isinstance(v, (int, float)) else m[f"eval/{n}/win_rate"]

    return plot_win_rates(names, [get(n, "win_rate") for n in names], [get(n, "win_rate_low") for n in names],
                          [get(n, "win_rate_high") for n in names], str((manifest.get("evaluate") or {}).get(
                              "baseline", "baseline")))

