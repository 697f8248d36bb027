"""The monitor's page (OUT_DIR/monitor.html): one self-contained HTML string from monitor.json's content, built with
the report's helpers, CSS and Content-Security-Policy (pipeline/report/page.py): no JavaScript, no external URL, the
plots embedded as PNG data URIs, every piece of text escaped (prompts, answers and ids come from users).

On top the alerts and the charts over time (the same section `rlhf report` shows), then the numbers per window, the
drift tests, the hacking comparison, the baseline and what each scorer scored.
"""

from __future__ import annotations

import datetime as _dt

from pipeline.report.page import _e, _flatten, _fmt, _kv_table, _table, document, monitor_section

QUALITY_COLUMNS = (("rule", ("rule", "mean")), ("judge", ("judge", "mean")), ("thumbs-up", ("thumbs", "up_rate")))


def _get(d: dict, *path):
    for key in path:
        d = d.get(key) if isinstance(d, dict) else None
    return d


def _when(t) -> str:
    if not isinstance(t, (int, float)):
        return "—"
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _windows_table(windows: list[dict]) -> str:
    header = ["window", "from (UTC)", "to (UTC)", "answers", "latency p50 / p95 (ms)", "length mean (tokens)",
              "EOS", "truncated", "reward mean", "reward p10 / p50 / p90", *[c for c, _ in QUALITY_COLUMNS],
              "rated", "KS p (reward, rule, length)", "below baseline p10 (reward)"]
    rows = []
    for w in windows:
        drift = w.get("drift") or {}
        ks = ", ".join(f"{m} {_fmt(_get(drift, m, 'p_value'))}" + (" ⚠" if _get(drift, m, "alert") else "")
                       for m in ("reward", "rule", "length") if m in drift) or "—"
        rows.append([_fmt(w.get("index")) + (" (partial)" if w.get("partial") else ""), _when(w.get("start")),
                     _when(w.get("end")), _fmt(w.get("volume")),
                     f"{_fmt(_get(w, 'latency_ms', 'p50'))} / {_fmt(_get(w, 'latency_ms', 'p95'))}",
                     _fmt(_get(w, "length", "mean")), _fmt(w.get("eos_rate")), _fmt(w.get("truncation_rate")),
                     _fmt(_get(w, "reward", "mean")),
                     " / ".join(_fmt(_get(w, "reward", k)) for k in ("p10", "p50", "p90")),
                     *[_fmt(_get(w, *path)) for _, path in QUALITY_COLUMNS], _fmt(_get(w, "thumbs", "rated")), ks,
                     _fmt(_get(w, "below_baseline_p10", "reward"))])
    return _table(header, rows, cls="grid num")


def _hacking(h: dict | None) -> str:
    if not h:
        return "<p class=muted>no comparison</p>"
    if h.get("note"):
        return f"<p class=muted>{_e(h['note'])}</p>"
    rows = []
    for name, s in [("reward", h.get("reward")), *(h.get("signals") or {}).items()]:
        if isinstance(s, dict):
            rows.append([_e(name), _fmt(s.get("from")), _fmt(s.get("to")), _fmt(s.get("z")), _fmt(s.get("p_up")),
                         _fmt(s.get("p_down"))])
    rule = (f"Window {_fmt(h.get('first'))} against window {_fmt(h.get('last'))}: an alert when the reward rises "
            f"(p_up &lt; {_fmt(h.get('alpha'))}) while a quality signal falls (p_down &lt; "
            f"{_fmt(h.get('quality_threshold'))}).")
    return f"<p>{rule}</p>" + _table(["score", "first window", "last window", "z", "p (rise)", "p (fall)"], rows,
                                     cls="grid num")


def render(result: dict) -> str:
    """The monitor page for a monitor.json result."""
    windows = result.get("windows") or []
    base = result.get("baseline")
    drift = result.get("drift")
    parts = ["<header><h1>rlhf monitor</h1>", _kv_table({"traffic log": result.get("db"), "written (UTC)":
             result.get("written_at"), **{f"{k}": v for k, v in (result.get("counts") or {}).items()}}, per_row=3,
             cls="kv head"), "</header>", monitor_section(result)]
    parts += ["<section id=windows><h2>Per window</h2>",
              f"<p class=label>window: {_e(_get(result, 'window', 'spec'))} ({_e(_get(result, 'window', 'kind'))})"
              "</p>", _windows_table(windows) if windows else "<p class=muted>no completions yet</p>"]
    overall = {k: v for k, v in (result.get("overall") or {}).items() if k not in ("start", "end")}
    parts.append("<h3>Overall</h3>" + _kv_table(_flatten(overall), per_row=4) + "</section>")
    parts.append("<section id=drift><h2>Drift against the baseline</h2>")
    if drift:
        parts.append(f"<p>Two-sample Kolmogorov-Smirnov test of each window (at least {_fmt(drift.get('min_rows'))} "
                     f"answers) against the baseline's answers; {_fmt(drift.get('tests'))} tests, an alert at p &lt; "
                     f"{_fmt(drift.get('alpha'))} / {_fmt(drift.get('tests'))} = {_fmt(drift.get('threshold'))}."
                     "</p>")
    else:
        parts.append("<p class=muted>no baseline (--baseline RUN_DIR/evaluate)</p>")
    if base:
        parts += [f"<h3>Baseline: {_e(base.get('policy'))} in {_e(base.get('dir'))}</h3>",
                  _kv_table({"answers": base.get("answers"), "judge reference": base.get("reference"),
                             "EOS rate": base.get("eos_rate"),
                             **{f"{m}.{k}": v for m, d in (base.get("scores") or {}).items() for k, v in d.items()}},
                            per_row=4),
                  "<p class=label>the evaluate stage's numbers for this policy</p>",
                  _kv_table(base.get("evaluate_metrics") or {}, per_row=4)]
    parts.append("</section><section id=hacking><h2>Reward hacking</h2>" + _hacking(result.get("hacking"))
                 + "</section>")
    scorers = result.get("scorers") or {}
    parts.append("<section id=scorers><h2>Scorers</h2>" + _table(
        ["scorer", "identity", "scored this run", "kept from earlier runs", "without a score"],
        [[_e(n), _fmt(s.get("identity")), _fmt(s.get("scored")), _fmt(s.get("cached")), _fmt(s.get("unscored"))]
         for n, s in scorers.items() if isinstance(s, dict)]) + "</section>")
    return document("rlhf monitor", "".join(parts))
