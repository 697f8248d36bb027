"""The static HTML report of a run: one self-contained page per run directory.

    rlhf report runs/tiny              # writes runs/tiny/report.html
    rlhf report runs/tiny -o out.html

The page reads only what the run wrote (manifests, config.yaml, metrics.jsonl, samples and the rows
left out) and shows: the run (directory, dates, git sha, versions) and its stages in config order
with their status; per stage the training curves (PNG plots made with matplotlib, embedded as data
URIs), final metrics, time, peak memory, counts, the extra manifest blocks and the resolved config;
the data (rows accepted and rejected by reason, skipped pairs, AI labels, judge agreement); and for
an `eval` stage the per-policy table, win rates with their 95% intervals and sample answers side by
side. It works on a partial run (stages not run yet, in progress or killed are marked) and on
DeepSpeed runs (memory per process). There is no JavaScript and no external URL; every piece of
text taken from the run is escaped: model outputs and data files are untrusted.

With `tracking: {wandb: true}` the runner calls `log_to_wandb` after each stage: the same plots (and
the evaluate table) go to that stage's wandb run.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import InvalidInput, UsageError

MANIFEST = "manifest.json"
SAMPLE_ROWS = 5  # rows shown of skipped/rejected/unlabelled files, samples, and evaluate prompts
# manifest keys every stage has; the others (model, normalization, judge, ...) are shown as extra blocks
STANDARD_KEYS = {"schema_version", "stage", "kind", "status", "created_at", "config_hash", "inputs", "outputs",
                 "metrics", "counts", "versions", "git_sha", "check", "evaluate"}
LEFT_OUT = ("rejected.jsonl", "skipped.jsonl", "unlabelled.jsonl")

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


# --------------------------------------------------------------------------- reading the run


@dataclass
class Stage:
    """What the run directory holds for one stage name."""

    name: str
    status: str  # complete | incomplete | in progress or killed | not run yet
    dir: Path | None = None  # where its files are read from: the artifact, else the partial directory
    manifest: dict | None = None
    config: dict = field(default_factory=dict)
    config_text: str = ""
    note: str = ""
    started: float = 0.0  # config.yaml's mtime: when the stage started (orders stages with no dependency)

    @property
    def kind(self) -> str:
        return (self.manifest or {}).get("kind") or ("eval" if self.config.get("stage") == "evaluate" else "")


def _read_json(path: Path) -> dict | None:
    if path.is_symlink():  # a link in a run directory could show any file of this machine (see _stage)
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    """The JSON objects of a JSONL file; unreadable lines (a stage killed mid-write) are left out."""
    rows: list[dict] = []
    if not path.is_file() or path.is_symlink():
        return rows
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
                if limit is not None and len(rows) >= limit:
                    break
    return rows


def _read_config(stage: Stage) -> None:
    from pipeline.blocks import load_yaml_text
    from pipeline.errors import UsageError

    path = stage.dir / "config.yaml" if stage.dir else None
    if path is None or not path.is_file() or path.is_symlink():
        return
    stage.config_text = path.read_text(encoding="utf-8", errors="replace")
    stage.started = path.stat().st_mtime
    try:
        loaded = load_yaml_text(stage.config_text, str(path))  # refuses alias bombs, which walking would expand
    except UsageError:
        loaded = None
    stage.config = loaded if isinstance(loaded, dict) else {}


def _stage(run_dir: Path, name: str) -> Stage:
    """One stage's status: its complete artifact, else its partial directory, else whatever is left."""
    final, partial = run_dir / name, run_dir / f".{name}.partial"
    manifest = _read_json(final / MANIFEST) if (final / MANIFEST).is_file() else None
    if manifest is not None and manifest.get("status") == "complete":
        st = Stage(name, "complete", final, manifest)
        if partial.is_dir():
            st.note = f"a rerun is in progress or was killed ({partial.name}); showing the previous complete artifact"
    elif partial.is_dir():
        st = Stage(name, "in progress or killed", partial, note=f"no complete artifact; files read from {partial.name}")
    else:
        why = "unreadable manifest" if (final / MANIFEST).is_file() else f"no {MANIFEST}"
        st = Stage(name, "incomplete", final, manifest, note=f"{why}: the artifact is not complete")
    links = [p.name for p in st.dir.iterdir() if p.is_symlink()] if st.dir and st.dir.is_dir() else []
    if links:  # skipped, never followed: an artifact from elsewhere could link its config.yaml to a key
        st.note = (st.note + "; " if st.note else "") + f"symbolic links not read: {', '.join(sorted(links))}"
        print(f"warning: {st.dir}: symbolic links not read: {', '.join(sorted(links))}", file=sys.stderr)
    _read_config(st)
    return st


def _references(stage: Stage) -> set[str]:
    """The stages this stage reads (`stage:NAME` values anywhere in its config)."""
    found: set[str] = set()

    def walk(v):
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, str) and v.startswith("stage:"):
            found.add(v[6:])

    walk(stage.config)
    return found - {stage.name}


def _in_config_order(stages: dict[str, Stage]) -> list[Stage]:
    """Stages in the order the pipeline config runs them: every stage after the stages it reads (config order
    guarantees that), the others by when they started. Stages named by a reference but absent are 'not run yet'."""
    for st in list(stages.values()):
        for ref in _references(st):
            if ref not in stages:
                stages[ref] = Stage(ref, "not run yet", note=f"read by {st.name}; nothing in the run directory yet")
    deps = {n: _references(st) & set(stages) for n, st in stages.items()}
    order: list[Stage] = []
    done: set[str] = set()
    while len(order) < len(stages):
        ready = [st for n, st in stages.items() if n not in done and deps[n] <= done]
        ready = ready or [st for n, st in stages.items() if n not in done]  # a cycle: never expected, never stuck
        nxt = min(ready, key=lambda s: (s.status == "not run yet", s.started or math.inf, s.name))
        order.append(nxt)
        done.add(nxt.name)
    return order


def read_run(run_dir: str | Path) -> list[Stage]:
    """The run's stages: directories holding a manifest or a config.yaml, `.NAME.partial` work directories, and
    stages referenced by those, in config order."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: not a directory (expected a run directory, e.g. runs/tiny)")
    names = set()
    for p in run_dir.iterdir():
        m = re.fullmatch(r"\.([A-Za-z0-9_-]+)\.partial", p.name)
        if m and p.is_dir():
            names.add(m.group(1))
        elif p.is_dir() and not p.name.startswith(".") and ((p / MANIFEST).exists() or (p / "config.yaml").exists()):
            names.add(p.name)
    if not names:
        raise InvalidInput(f"{run_dir}: no stages found (no */{MANIFEST}, */config.yaml or .NAME.partial/)")
    return _in_config_order({n: _stage(run_dir, n) for n in names})


# --------------------------------------------------------------------------- formatting


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _e(value: Any) -> str:
    """Escape text from the run for HTML (model outputs and data are untrusted); control characters, which a
    sampled response can hold, are shown as \\xNN."""
    return html.escape(_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value)), quote=True)


def _fmt(v: Any) -> str:
    """A value as short escaped text: 4 significant digits for floats, thousands separators for ints."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return _e(v)
        return f"{v:,.0f}" if abs(v) >= 1e5 or (v.is_integer() and abs(v) >= 1e3) else f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v) if all(not isinstance(x, (dict, list)) for x in v) else _e(
            json.dumps(v))
    if isinstance(v, dict):
        return _e(json.dumps(v, sort_keys=True))
    return _e(v)


def _seconds(s: Any) -> str:
    if not isinstance(s, (int, float)) or isinstance(s, bool):
        return "—"
    if s < 60:
        return f"{s:.1f} s"
    return f"{int(s // 60)} min {s % 60:.0f} s" if s < 3600 else f"{int(s // 3600)} h {int(s % 3600 // 60)} min"


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _kv_table(items: dict[str, Any], per_row: int = 3, cls: str = "kv") -> str:
    """name/value pairs, `per_row` pairs to a row (final metrics, counts, manifest blocks)."""
    pairs = list(items.items())
    if not pairs:
        return "<p class=muted>none</p>"
    rows = []
    for i in range(0, len(pairs), per_row):
        cells = "".join(f"<th>{_e(k)}</th><td>{_fmt(v)}</td>" for k, v in pairs[i:i + per_row])
        rows.append(f"<tr>{cells}</tr>")
    return f"<table class={cls}>{''.join(rows)}</table>"


def _table(header: list[str], rows: list[list[str]], cls: str = "grid") -> str:
    """A table whose cells are already HTML (escape what comes from the run before calling)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table class={cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _plain(value: Any) -> str:
    """A prompt or response (a string or a list of chat messages) as plain text, to escape with _e."""
    if isinstance(value, list):
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" if isinstance(m, dict) else str(m)
                         for m in value)
    return "" if value is None else str(value)


# --------------------------------------------------------------------------- plots


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


def _img(png: bytes, alt: str) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="{_e(alt)}">'


def stage_plots(stage: Stage) -> dict[str, bytes]:
    """{title: PNG} for a stage: its curve groups, and the win-rate chart of an eval stage."""
    out = {title: plot_curves(title, series)
           for title, series in curve_groups(read_jsonl(stage.dir / "metrics.jsonl") if stage.dir else []).items()}
    if stage.kind == "eval" and stage.manifest:
        chart = _win_rate_chart(stage.manifest)
        if chart:
            out["Win rate"] = chart
    return out


# --------------------------------------------------------------------------- the evaluate stage


def eval_policies(manifest: dict) -> list[str]:
    """The evaluated policies: those the manifest describes, then any other named in its metrics; baseline first."""
    ev = manifest.get("evaluate") or {}
    names = list((ev.get("policies") or {}).keys())
    for key in manifest.get("metrics") or {}:
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "eval" and parts[1] not in names:
            names.append(parts[1])
    base = ev.get("baseline")
    return ([base] if base in names else []) + [n for n in names if n != base]


def _win_rate_chart(manifest: dict) -> bytes | None:
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


EVAL_COLUMNS = (("reward", "reward_mean"), ("rule reward", "rule_reward_mean"), ("KL", "kl"),
                ("length", "response_length"), ("EOS rate", "eos_rate"), ("distinct-1", "distinct_1"),
                ("distinct-2", "distinct_2"))


def eval_table(manifest: dict) -> tuple[list[str], list[list[Any]]]:
    """The per-policy table as plain values: (header, rows); rendered in the page and logged to wandb."""
    m, ev = manifest.get("metrics") or {}, manifest.get("evaluate") or {}
    info = ev.get("policies") or {}
    header = ["policy", "ref", "kind", *[c for c, _ in EVAL_COLUMNS], "win rate", "95% interval", "pairs",
              "trainable parameters", "parameters", "tuning", "training time (s)", "peak memory (MiB)", "eval loss"]
    rows = []
    for n in eval_policies(manifest):
        p = info.get(n) or {}
        low, high = m.get(f"eval/{n}/win_rate_low"), m.get(f"eval/{n}/win_rate_high")
        interval = f"[{_fmt(low)}, {_fmt(high)}]" if low is not None and high is not None else None
        rows.append([n, p.get("ref"), p.get("kind"), *[m.get(f"eval/{n}/{k}") for _, k in EVAL_COLUMNS],
                     m.get(f"eval/{n}/win_rate"), interval, m.get(f"eval/{n}/pairs"), p.get("trainable"),
                     p.get("parameters"), p.get("tuning"), p.get("train_seconds"), p.get("peak_rss_mib"),
                     p.get("eval_loss")])
    return header, rows


def _eval_policy_table(manifest: dict) -> str:
    """The per-policy table, one column per policy (a handful) and one row per metric (many)."""
    ev = manifest.get("evaluate") or {}
    header, rows = eval_table(manifest)
    heads = [_e(r[0]) + "".join(f" <span class=tag>{role}</span>" for role in ("baseline", "reference")
                                if ev.get(role) == r[0]) for r in rows]
    body = []
    for i, label in enumerate(header[1:], 1):
        values = [r[i] for r in rows]
        if label in ("win rate", "95% interval", "pairs") or any(v is not None for v in values):
            body.append(f"<tr><th>{_e(label)}</th>" + "".join(f"<td>{_fmt(v)}</td>" for v in values) + "</tr>")
    head = "<tr><th>policy</th>" + "".join(f"<th>{h}</th>" for h in heads) + "</tr>"
    return f"<table class='grid num'><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>"


def _verdict(v: Any) -> str:
    v = str(v) if v else "—"
    cls = v if v in ("win", "loss", "tie", "abstain", "baseline") else "none"
    return f'<span class="verdict {cls}">{_e(v)}</span>'


def _eval_samples(stage: Stage, policies: list[str], baseline: str | None) -> str:
    """The first prompts: the prompt, then each policy's answer side by side with its scores and verdict."""
    out = []
    for i, row in enumerate(read_jsonl(stage.dir / "samples.jsonl", SAMPLE_ROWS)):
        responses, scores, verdicts = (row.get(k) if isinstance(row.get(k), dict) else {}
                                       for k in ("responses", "scores", "verdicts"))
        cols = []
        for n in policies:
            s = scores.get(n) if isinstance(scores.get(n), dict) else {}
            facts = " · ".join(f"{label} {_fmt(s.get(k))}" for label, k in (
                ("reward", "reward"), ("rule", "rule"), ("KL", "kl"), ("length", "length"), ("EOS", "eos"))
                if s.get(k) is not None)
            verdict = _verdict("baseline" if n == baseline else verdicts.get(n))
            cols.append(f"<div class=answer><h4>{_e(n)} {verdict}</h4><pre>{_e(_plain(responses.get(n)))}</pre>"
                        f"<p class=scores>{facts}</p></div>")
        out.append(f"<div class=sample><p class=label>prompt {i + 1}</p><pre class=prompt>"
                   f"{_e(_plain(row.get('prompt')))}</pre><div class=answers>{''.join(cols)}</div></div>")
    return "".join(out) or "<p class=muted>no samples.jsonl</p>"


def _eval_body(stage: Stage) -> str:
    m = stage.manifest or {}
    ev = m.get("evaluate") or {}
    policies = eval_policies(m)
    judge = ev.get("judge")
    facts = {"prompts": ev.get("prompts"), "baseline": ev.get("baseline"), "reference": ev.get("reference"),
             **{f"sampling.{k}": v for k, v in (ev.get("sampling") or {}).items()}}
    parts = ["<h3>Policies</h3>", _eval_policy_table(m), _kv_table(facts, per_row=4)]
    if judge:
        parts += ["<h4>judge</h4>", _kv_table(_flatten(judge), per_row=3)]
    chart = _win_rate_chart(m)
    if chart:
        parts += ["<h3>Win rates against the baseline</h3>", f"<div class=plots>{_img(chart, 'win rates')}</div>"]
    else:
        parts.append("<p class=muted>no win rates (no judge)</p>")
    parts += ["<h3>Sample answers</h3>", _eval_samples(stage, policies, ev.get("baseline"))]
    return "".join(parts)


# --------------------------------------------------------------------------- one stage


def peak_memory(manifest: dict) -> str:
    """Peak resident memory: the largest over the processes, and each process's under DeepSpeed."""
    metrics, dist = manifest.get("metrics") or {}, manifest.get("distributed") or {}
    per = (dist.get("memory_per_process") or {}).get("peak_rss_mib") or []
    per = [v for v in per if isinstance(v, (int, float))]
    peak = metrics.get("memory/peak_rss_mib", metrics.get("train/memory/peak_rss_mib"))
    peak = peak if isinstance(peak, (int, float)) else (max(per) if per else None)
    if peak is None:
        return "—"
    text = f"{peak:,.0f} MiB"
    if len(per) > 1:
        text += " (per process: " + ", ".join(f"{v:,.0f}" for v in per) + ")"
    gpu = (dist.get("memory_per_process") or {}).get("peak_gpu_mib") or []
    if gpu:
        text += "; GPU " + ", ".join(f"{v:,.0f}" for v in gpu if isinstance(v, (int, float))) + " MiB"
    return text


def _processes(manifest: dict) -> str:
    dist = manifest.get("distributed") or {}
    ws = dist.get("world_size")
    if not isinstance(ws, int):
        return "—"
    return f"{ws}" + (f" (ZeRO-{_fmt(dist['zero_stage'])})" if dist.get("zero_stage") else "")


def headline(stage: Stage) -> str:
    """The one result that says how the stage went, for the stage table."""
    m = (stage.manifest or {}).get("metrics") or {}
    counts = (stage.manifest or {}).get("counts") or {}
    if stage.kind == "eval":
        wins = [(n, m[f"eval/{n}/win_rate"]) for n in eval_policies(stage.manifest or {})
                if isinstance(m.get(f"eval/{n}/win_rate"), (int, float))]
        return "; ".join(f"{_e(n)} win rate {_fmt(v)}" for n, v in wins) or f"{_fmt(counts.get('prompts'))} prompts"
    for key in ("eval/rule_reward_mean", "eval/reward_mean", "eval/accuracy", "eval/loss", "train/loss"):
        if isinstance(m.get(key), (int, float)):
            before = m.get(f"{key}_initial")
            return f"{_e(key)} " + (f"{_fmt(before)} → " if isinstance(before, (int, float)) else "") + _fmt(m[key])
    if "pairs" in counts:
        return f"{_fmt(counts['pairs'])} pairs" + (f", {_fmt(counts['rejected'])} rows rejected"
                                                   if counts.get("rejected") else "")
    return ""


def _summary(stage: Stage) -> str:
    m = stage.manifest or {}
    metrics = m.get("metrics") or {}
    facts = {"method": _fmt(stage.config.get("stage")), "kind": _fmt(m.get("kind")), "finished": _fmt(m.get(
             "created_at")), "time": _seconds(metrics.get("time/seconds")), "training time": _seconds(metrics.get(
             "train/seconds")), "peak memory": peak_memory(m), "processes": _processes(m)}
    return "<p class=facts>" + " · ".join(f"<b>{k}</b> {v}" for k, v in facts.items() if v != "—") + "</p>"


def _extras(manifest: dict) -> str:
    """The manifest's own blocks (model, normalization, calibration, judge, distributed, ppo_state, ...)."""
    parts, simple = [], {}
    for key, value in manifest.items():
        if key in STANDARD_KEYS or key == "judge":  # the judge of AI labels is shown under Data
            continue
        if isinstance(value, dict) and value:
            parts.append(f"<h4>{_e(key)}</h4>" + _kv_table(_flatten(value)))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            cols = list(dict.fromkeys(k for v in value for k in v))
            parts.append(f"<h4>{_e(key)}</h4>" + _table(cols, [[_fmt(v.get(c)) for c in cols] for v in value]))
        else:
            simple[key] = value
    if simple:
        parts.insert(0, _kv_table(simple))
    return "".join(parts)


def _ppo_samples(stage: Stage) -> str:
    """The last training step's logged samples and the first held-out (final-eval) samples."""
    rows = read_jsonl(stage.dir / "samples.jsonl")
    if not rows:
        return ""
    final = [r for r in rows if r.get("step") == "final-eval"][:SAMPLE_ROWS]
    steps = [r.get("step") for r in rows if isinstance(r.get("step"), int)]
    last = [r for r in rows if steps and r.get("step") == max(steps)][:SAMPLE_ROWS]
    table = _table(["step", "prompt", "response", "score"], [[_e(r.get("step")), _e(_plain(r.get("prompt"))),
                                                             _e(_plain(r.get("response"))), _fmt(r.get("score"))]
                                                            for r in last + final], cls="grid samples")
    return "<h3>Samples</h3>" + table


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _left_out(stage: Stage) -> str:
    """The first rows of rejected.jsonl / skipped.jsonl / unlabelled.jsonl, each with its reason."""
    parts = []
    for fname in LEFT_OUT:
        path = stage.dir / fname
        rows = read_jsonl(path, SAMPLE_ROWS)
        if not rows:
            continue
        table = []
        for r in rows:
            where = r.get("where") or r.get("id") or r.get("line") or ""
            rest = {k: v for k, v in r.items() if k not in ("where", "line", "id", "reason", "code")}
            text = json.dumps(rest, ensure_ascii=False)
            table.append([_e(where), _e(r.get("reason", "")), _e(text if len(text) <= 240 else text[:239] + "…")])
        parts.append(f"<h4>{_e(fname)} (first {len(rows)} of {_count_lines(path)})</h4>"
                     + _table(["where", "reason", "row"], table, cls="grid rows"))
    return "".join(parts)


def _ai_labels(manifest: dict) -> str:
    judge = manifest.get("judge")
    if not isinstance(judge, dict):
        return ""
    counts, metrics = manifest.get("counts") or {}, manifest.get("metrics") or {}
    stats = judge.get("stats") or {}
    identity = {k: v for k, v in judge.items() if k != "stats"}
    consistency = metrics.get("judge/position_consistency", stats.get("position_consistency"))
    facts = {"pairs labelled": counts.get("pairs"), "ties": counts.get("ties"),
             "abstentions (unlabelled)": counts.get("unlabelled"), "position consistency": consistency}
    return ("<h4>AI labels</h4>" + _kv_table(facts, per_row=4) + "<p class=label>judge</p>"
            + _kv_table(_flatten(identity)) + "<p class=label>judge stats</p>" + _kv_table(_flatten(stats)))


def _data(stage: Stage) -> str:
    """Rows rejected by reason, AI labels, the first rows left out (skipped, rejected, unlabelled) with their
    reasons; the counts themselves (rows read, accepted, rejected, skipped) are in the stage's Counts table."""
    m = stage.manifest or {}
    counts = m.get("counts") or {}
    parts = []
    by_reason = counts.get("rejected_by_reason")
    if isinstance(by_reason, dict) and by_reason:
        most = sorted(by_reason.items(), key=lambda kv: -kv[1] if isinstance(kv[1], (int, float)) else 0)
        parts.append(_table(["rejected because", "rows"], [[_e(k), _fmt(v)] for k, v in most]))
    parts.append(_ai_labels(m))
    if stage.dir:
        parts.append(_left_out(stage))
    body = "".join(parts)
    return f"<h3>Data</h3>{body}" if body else ""


def _agreement(run_dir: Path) -> str:
    """Judge agreement with human labels, from any agreement.json in the run directory (rlhf feedback agree)."""
    files = sorted({*run_dir.glob("agreement.json"), *run_dir.glob("*agreement*.json"),
                    *run_dir.glob("*/agreement.json")})
    rows = []
    for path in files:
        a = _read_json(path)
        if a is None or "accuracy" not in a:
            continue
        judge = a.get("judge") or {}
        rows.append([_e(path.relative_to(run_dir)), _e(judge.get("name", "")), _fmt(a.get("pairs")),
                     _fmt(a.get("accuracy")), _fmt(a.get("cohen_kappa")), _fmt(a.get("tie_rate")),
                     _fmt(a.get("abstain_rate")), _fmt(a.get("position_consistency"))])
    if not rows:
        return ""
    return ("<section id=agreement><h2>Judge agreement with humans</h2>"
            + _table(["file", "judge", "pairs", "accuracy", "Cohen's kappa", "tie rate", "abstain rate",
                      "position consistency"], rows, cls="grid num") + "</section>")


STATUS_CLASS = {"complete": "ok", "incomplete": "bad", "in progress or killed": "warn", "not run yet": "idle"}


def _badge(status: str) -> str:
    return f'<span class="badge {STATUS_CLASS.get(status, "idle")}">{_e(status)}</span>'


def _stage_section(stage: Stage) -> str:
    parts = [f'<section id="stage-{_e(stage.name)}" class=stage><h2>{_e(stage.name)} {_badge(stage.status)}</h2>']
    if stage.note:
        parts.append(f"<p class=note>{_e(stage.note)}</p>")
    if stage.status == "not run yet":
        return "".join(parts) + "</section>"
    parts.append(_summary(stage))
    m = stage.manifest or {}
    if stage.kind == "eval" and m:
        parts.append(_eval_body(stage))
    else:
        plots = stage_plots(stage)
        if plots:
            parts.append("<h3>Training curves</h3><div class=plots>"
                         + "".join(_img(png, f"{stage.name}: {title}") for title, png in plots.items()) + "</div>")
        if m:
            parts += ["<h3>Final metrics</h3>", _kv_table(m.get("metrics") or {})]
            counts = {k: v for k, v in (m.get("counts") or {}).items() if k != "rejected_by_reason"}
            parts += ["<h3>Counts</h3>", _kv_table(_flatten(counts), per_row=4)]
        parts.append(_data(stage))
        extras = _extras(m)
        if extras:
            parts.append("<h3>Details</h3>" + extras)
        if stage.dir:
            parts.append(_ppo_samples(stage))
    if stage.config_text:
        parts.append(f"<details><summary>resolved config (config.yaml)</summary><pre>{_e(stage.config_text)}</pre>"
                     "</details>")
    return "".join(parts) + "</section>"


def _header(run_dir: Path, stages: list[Stage]) -> str:
    manifests = [s.manifest for s in stages if s.manifest]
    latest = max(manifests, key=lambda m: str(m.get("created_at", "")), default={})
    shas = list(dict.fromkeys(str(m["git_sha"]) for m in manifests if m.get("git_sha")))
    dates = sorted(str(m["created_at"]) for m in manifests if m.get("created_at"))
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    sha = (", ".join(shas) or "—") + (" (stages built at different commits)" if len(shas) > 1 else "")
    facts = {"run directory": str(run_dir.resolve()),
             "stages finished": f"{dates[0]} … {dates[-1]}" if dates else "—",
             "report written": now, "git sha": sha}
    versions = latest.get("versions") or {}
    rows = [[f'<a href="#stage-{_e(s.name)}">{_e(s.name)}</a>', _fmt(s.config.get("stage")), _fmt(s.kind or None),
             _badge(s.status), _fmt((s.manifest or {}).get("created_at")),
             _seconds(((s.manifest or {}).get("metrics") or {}).get("time/seconds")),
             peak_memory(s.manifest or {}), headline(s)] for s in stages]
    return ("<header><h1>rlhf run report</h1>" + _kv_table(facts, per_row=2, cls="kv head")
            + "<p class=label>versions</p>" + _kv_table(versions, per_row=4, cls="kv head") + "</header>"
            + "<section id=stages><h2>Stages</h2>"
            + _table(["stage", "method", "kind", "status", "finished", "time", "peak memory", "result"], rows)
            + "</section>")


def render(run_dir: str | Path) -> str:
    """The report page for a run directory, as one HTML string."""
    run_dir = Path(run_dir)
    stages = read_run(run_dir)
    body = _header(run_dir, stages) + _agreement(run_dir) + "".join(_stage_section(s) for s in stages)
    # No script may run, whatever the page holds: the policy allows inline styles and data: images only.
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            "<meta http-equiv=Content-Security-Policy content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'\">"
            f"<meta name=viewport content='width=device-width'><title>rlhf report: {_e(run_dir.name)}</title>"
            f"<link rel=icon href='data:,'><style>{CSS}</style></head><body>{body}</body></html>\n")


def write_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write the report of `run_dir` to `output` (default RUN_DIR/report.html), atomically; returns its path."""
    from pipeline.artifacts import write_atomic

    out = Path(output) if output else Path(run_dir) / "report.html"
    write_atomic(out, render(run_dir))
    return out


CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;color:#1d2330;
 max-width:1240px;margin:0 auto;padding:16px 20px 60px;background:#fafbfc}
h1{font-size:24px;margin:4px 0 10px}h2{font-size:19px;margin:0 0 8px}h3{font-size:15px;margin:16px 0 6px;
 color:#33415c}h4{font-size:13px;margin:12px 0 4px;color:#444}
header,section{background:#fff;border:1px solid #e2e6ec;border-radius:8px;padding:14px 18px;margin:0 0 16px}
table{border-collapse:collapse;font-size:12.5px;margin:4px 0 8px}
th,td{border:1px solid #e4e7ec;padding:3px 8px;text-align:left;vertical-align:top}
thead th,table.kv th{background:#f3f5f8;font-weight:600}table.kv th{color:#4a5568;font-weight:500}
table.kv td{font-variant-numeric:tabular-nums;min-width:60px}table.head{width:100%}
table.num td{font-variant-numeric:tabular-nums}table.grid{min-width:50%}
table.samples td,table.rows td{max-width:520px;word-break:break-word}
.badge{font-size:11.5px;padding:1px 8px;border-radius:10px;font-weight:600;vertical-align:middle;white-space:nowrap}
.ok{background:#dcf5e3;color:#186a32}.bad{background:#fde0dd;color:#a01b12}.warn{background:#fff1c9;color:#8a5a00}
.idle{background:#eceff3;color:#555}
.tag{font-size:11px;background:#e8eefb;color:#2b4a8b;border-radius:8px;padding:0 6px;font-weight:500}
.note{background:#fff8e1;border-left:3px solid #f0b400;padding:4px 10px;margin:4px 0 8px}
.facts{color:#333;margin:2px 0 6px}.facts b{color:#5a6476;font-weight:500}
.muted,.label{color:#6b7280;font-size:12px;margin:6px 0 2px}
.plots{display:flex;flex-wrap:wrap;gap:8px}.plots img{border:1px solid #e4e7ec;border-radius:4px;background:#fff}
pre{white-space:pre-wrap;word-break:break-word;font:12px/1.4 ui-monospace,'DejaVu Sans Mono',monospace;margin:2px 0}
details{margin-top:12px}summary{cursor:pointer;color:#33415c}details pre{background:#f6f8fa;padding:8px;
 border-radius:4px;max-height:420px;overflow:auto}
.sample{border-top:1px solid #e4e7ec;padding:6px 0 8px}.sample pre.prompt{background:#f6f8fa;padding:4px 8px;
 border-radius:4px}
.answers{display:grid;grid-template-columns:repeat(auto-fit,minmax(220px,1fr));gap:8px;margin-top:6px}
.answer{border:1px solid #e4e7ec;border-radius:6px;padding:4px 8px;background:#fff}.answer h4{margin:2px 0}
.scores{color:#555;font-size:11.5px;margin:4px 0 0}
.verdict{font-size:11px;border-radius:8px;padding:0 6px;font-weight:600}.verdict.win{background:#dcf5e3;color:#186a32}
.verdict.loss{background:#fde0dd;color:#a01b12}.verdict.tie{background:#eceff3;color:#444}
.verdict.abstain,.verdict.none{background:#f4f4f4;color:#777}.verdict.baseline{background:#e8eefb;color:#2b4a8b}
a{color:#2456b3;text-decoration:none}
"""


# --------------------------------------------------------------------------- wandb


def tracking_on(stage: Stage) -> bool:
    """Whether the run was configured with `tracking: {wandb: true}` (the stage's resolved config says)."""
    tracking = stage.config.get("tracking") or {}
    return bool(tracking.get("wandb")) and tracking.get("wandb_mode") != "disabled"


def log_to_wandb(run_dir: str | Path, name: str) -> bool:
    """Log a completed stage's plots (wandb.Image) and, for an eval stage, its per-policy table (wandb.Table) to
    the stage's wandb run, then finish that run: one wandb run per stage. The run is the one
    pipeline.tracking.stage_wandb opened for the stage (reopened if the stage finished it), or, outside the runner,
    a new run named after the stage in the run directory's group. Returns whether the stage's run was logged to."""
    import wandb

    from pipeline.tracking import wandb_init_args

    run_dir = Path(run_dir)
    stage = _stage(run_dir, name)
    if not tracking_on(stage) or stage.status != "complete":
        return False
    args = wandb_init_args(stage.config.get("tracking") or {}, run_dir, name)
    run = wandb.run if wandb.run is not None and wandb.run.id == args.get("id") else None
    if run is None:
        if wandb.run is not None:
            wandb.run.finish()  # another stage's run, left open: never log into it
        run = wandb.init(**args)
    try:
        values = _wandb_values(stage)
        if values:
            run.log(values)
    finally:
        run.finish()
    return True


def _wandb_values(stage: Stage) -> dict[str, Any]:
    """{key: wandb.Image | wandb.Table}: the stage's plots as report/<title>, an eval stage's table as
    report/evaluate."""
    import wandb
    from PIL import Image

    values: dict[str, Any] = {"report/" + re.sub(r"\W+", "_", title.lower()): wandb.Image(
        Image.open(io.BytesIO(png)), caption=f"{stage.name}: {title}") for title, png in stage_plots(stage).items()}
    if stage.kind == "eval" and stage.manifest:
        header, rows = eval_table(stage.manifest)
        values["report/evaluate"] = wandb.Table(columns=header, data=[[_wandb_cell(v) for v in r] for r in rows])
    return values


def _wandb_cell(v: Any) -> Any:
    return v if v is None or isinstance(v, (int, float, str)) else str(v)
