"""The report page: one self-contained HTML string for a run directory (`render`), written atomically
(`write_report`). A header with the run; the verdict (did alignment work: each policy against the baseline, from
the evaluate stages), the served policy's monitor summary when RUN_DIR/monitor/monitor.json exists (`rlhf monitor`),
and the evaluate stages' sections (per-policy table, win rates, answers side by side); then a
table of the stages, judge agreement if the run holds any, and a section per other stage: its curves, final
metrics, counts, the data it left out with reasons, the extra manifest blocks, the samples it logged and its
resolved config.

Every piece of text taken from the run goes through `_e` (model outputs and data files are untrusted), and a
Content-Security-Policy forbids any script; the page has no JavaScript and no external URL.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import re
from pathlib import Path
from typing import Any

from pipeline.artifacts import write_atomic
from pipeline.mfu import describe
# the module, not its function: pipeline.monitor.plots imports pipeline.report.plots, whose package imports this
# module, so when that import comes first this line finds pipeline.monitor.plots still being loaded
from pipeline.monitor import plots as monitor_charts
from pipeline.report.plots import stage_plots, win_rate_chart
from pipeline.report.run import Stage, eval_policies, read_json, read_jsonl, read_run

SAMPLE_ROWS = 5  # rows shown of skipped/rejected/unlabelled files, samples, and evaluate prompts
# manifest keys every stage has; the others (model, normalization, judge, ...) are shown as extra blocks
STANDARD_KEYS = {"schema_version", "stage", "kind", "status", "created_at", "config_hash", "inputs", "outputs",
                 "metrics", "counts", "versions", "git_sha", "check", "evaluate"}
LEFT_OUT = ("rejected.jsonl", "skipped.jsonl", "unlabelled.jsonl")


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
        # from 10,000 on, .4g would switch to an exponent (a peak of 10434.8 MiB as 1.043e+04): whole numbers there
        return f"{v:,.0f}" if abs(v) >= 1e4 or (v.is_integer() and abs(v) >= 1e3) else f"{v:.4g}"
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


def _img(png: bytes, alt: str) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="{_e(alt)}">'


# --------------------------------------------------------------------------- the evaluate stage


EVAL_COLUMNS = (("reward", "reward_mean"), ("rule reward", "rule_reward_mean"), ("KL", "kl"),
                ("length", "response_length"), ("EOS rate", "eos_rate"), ("distinct-1", "distinct_1"),
                ("distinct-2", "distinct_2"))


def _columns(manifest: dict) -> list[tuple[str, str]]:
    """EVAL_COLUMNS with each independent scorer's mean score after the reward model's."""
    scorers = list(((manifest.get("evaluate") or {}).get("scorers") or {}))
    return [EVAL_COLUMNS[0], *[(f"{sn} score", f"{sn}_mean") for sn in scorers], *EVAL_COLUMNS[1:]]


def eval_table(manifest: dict) -> tuple[list[str], list[list[Any]]]:
    """The per-policy table as plain values: (header, rows); rendered in the page and logged to wandb."""
    m, ev = manifest.get("metrics") or {}, manifest.get("evaluate") or {}
    info = ev.get("policies") or {}
    columns = _columns(manifest)
    header = ["policy", "ref", "kind", *[c for c, _ in columns], "win rate", "95% interval", "pairs",
              "trainable parameters", "parameters", "tuning", "training time (s)", "peak memory (MiB)", "eval loss"]
    rows = []
    for n in eval_policies(manifest):
        p = info.get(n) or {}
        low, high = m.get(f"eval/{n}/win_rate_low"), m.get(f"eval/{n}/win_rate_high")
        interval = f"[{_fmt(low)}, {_fmt(high)}]" if low is not None and high is not None else None
        rows.append([n, p.get("ref"), p.get("kind"), *[m.get(f"eval/{n}/{k}") for _, k in columns],
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
    # the judge's rows stay, empty, only when nothing gives win rates (so that their absence shows); a run whose
    # win rates come from a reward model or scorer has them in the win-rate table below instead
    judged = ("win rate", "95% interval", "pairs") if not win_rate_sources(manifest) else ()
    for i, label in enumerate(header[1:], 1):
        values = [r[i] for r in rows]
        if label in judged or any(v is not None for v in values):
            body.append(f"<tr><th>{_e(label)}</th>" + "".join(f"<td>{_fmt(v)}</td>" for v in values) + "</tr>")
    head = "<tr><th>policy</th>" + "".join(f"<th>{h}</th>" for h in heads) + "</tr>"
    return f"<table class='grid num'><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>"


def win_rate_sources(manifest: dict) -> list[tuple[str, str]]:
    """(label, metric prefix) of each source of win rates in an evaluate manifest: the judge, the reward model (what
    the policies optimised), each independent scorer."""
    m, ev = manifest.get("metrics") or {}, manifest.get("evaluate") or {}
    names = eval_policies(manifest)
    sources = [("judge", ""), ("reward model", "reward_"),
               *[(scorer_label(sn), f"{sn}_") for sn in (ev.get("scorers") or {})]]
    return [(label, pre) for label, pre in sources if any(isinstance(m.get(f"eval/{n}/{pre}win_rate"), (int, float))
                                                           for n in names)]


def scorer_label(name: str) -> str:
    """'independent scorer NAME', or just 'independent scorer' for one named scorer (not 'scorer scorer')."""
    return "independent scorer" if name == "scorer" else f"independent scorer {name}"


def _interval(m: dict, n: str, key: str) -> str:
    v = [m.get(f"eval/{n}/{key}{x}") for x in ("", "_low", "_high")]
    return f"{_fmt(v[0])} [{_fmt(v[1])}, {_fmt(v[2])}]" if all(isinstance(x, (int, float)) for x in v) else "—"


def _win_rate_table(manifest: dict) -> str:
    """Every source's win rate against the baseline, raw and length-controlled, with 95% intervals."""
    m, ev = manifest.get("metrics") or {}, manifest.get("evaluate") or {}
    sources = win_rate_sources(manifest)
    if not sources:
        return ""
    header = ["policy", *[f"{h} ({label})" for label, _ in sources for h in ("win rate", "length-controlled")], "KL"]
    rows = [[_e(n), *[_e(_interval(m, n, pre + k)) for _, pre in sources for k in ("win_rate", "win_rate_lc")],
             _fmt(m.get(f"eval/{n}/kl"))] for n in eval_policies(manifest) if n != ev.get("baseline")]
    return (f"<h3>Win rates against {_e(ev.get('baseline'))}</h3>" + _table(header, rows, "grid num")
            + "<p class=muted>95% intervals. Length-controlled: a logistic regression of each outcome (win 1, tie "
            "0.5, loss 0) on the length difference in tokens; the win rate it predicts at equal length.</p>")


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
            scorers = [(sn, sn) for sn in ((stage.manifest or {}).get("evaluate") or {}).get("scorers") or {}]
            facts = " · ".join(f"{label} {_fmt(s.get(k))}" for label, k in (
                ("reward", "reward"), *scorers, ("rule", "rule"), ("KL", "kl"), ("length", "length"), ("EOS", "eos"))
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
    parts = ["<h3>Policies</h3>", _eval_policy_table(m), _kv_table(facts, per_row=4), _win_rate_table(m)]
    if judge:
        parts += ["<h4>judge</h4>", _kv_table(_flatten(judge), per_row=3)]
    chart = win_rate_chart(m)
    if chart:
        parts += ["<h3>Win rates against the baseline</h3>", f"<div class=plots>{_img(chart, 'win rates')}</div>"]
    elif not win_rate_sources(m):
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


def mfu(metrics: dict) -> str:
    """The stage's model FLOPs utilisation and what it is the ratio of (docs/mfu.md)."""
    return describe(metrics) or "—"


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
             "train/seconds")), "peak memory": peak_memory(m), "MFU": mfu(metrics), "processes": _processes(m)}
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


def _is_step(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _samples(stage: Stage) -> str:
    """The samples a stage logged while it ran (samples.jsonl: rows with a prompt and a response, a `step`, and
    any scores): the rows of the last numbered step, then the first rows of each other step label (e.g. held-out
    samples labelled `final-eval`), or the first rows when there are no steps. Every field the rows hold is a
    column: text as text, numbers formatted."""
    rows = read_jsonl(stage.dir / "samples.jsonl")
    if not rows:
        return ""
    steps = [r["step"] for r in rows if _is_step(r.get("step"))]
    shown = [r for r in rows if steps and r.get("step") == max(steps)][:SAMPLE_ROWS]
    others: dict[str, list[dict]] = {}  # by label (str: a label read from a file may be any JSON value)
    for r in rows:
        if not _is_step(r.get("step")):
            others.setdefault(str(r.get("step")), []).append(r)
    for labelled in others.values():
        shown += labelled[:SAMPLE_ROWS]
    columns = list(dict.fromkeys(["step", *(k for r in shown for k in r)] if any("step" in r for r in shown)
                                 else [k for r in shown for k in r]))

    def cell(v: Any) -> str:
        return _fmt(v) if v is None or isinstance(v, (bool, int, float)) else _e(_plain(v))

    table = _table(columns, [[cell(r.get(c)) for c in columns] for r in shown], cls="grid samples")
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
        a = read_json(path)
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
            parts.append(_samples(stage))
    if stage.config_text:
        parts.append(f"<details><summary>resolved config (config.yaml)</summary><pre>{_e(stage.config_text)}</pre>"
                     "</details>")
    return "".join(parts) + "</section>"


def _header(run_dir: Path, stages: list[Stage]) -> str:
    manifests = [s.manifest for s in stages if s.manifest]
    shas = list(dict.fromkeys(str(m["git_sha"]) for m in manifests if m.get("git_sha")))
    dates = sorted(str(m["created_at"]) for m in manifests if m.get("created_at"))
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    sha = (", ".join(shas) or "—") + (" (stages built at different commits)" if len(shas) > 1 else "")
    facts = {"run directory": str(run_dir.resolve()),
             "stages finished": f"{dates[0]} … {dates[-1]}" if dates else "—",
             "report written": now, "git sha": sha}
    return "<header><h1>rlhf run report</h1>" + _kv_table(facts, per_row=2, cls="kv head") + "</header>"


def _stages_table(stages: list[Stage]) -> str:
    manifests = [s.manifest for s in stages if s.manifest]
    latest = max(manifests, key=lambda m: str(m.get("created_at", "")), default={})
    rows = [[f'<a href="#stage-{_e(s.name)}">{_e(s.name)}</a>', _fmt(s.config.get("stage")), _fmt(s.kind or None),
             _badge(s.status), _fmt((s.manifest or {}).get("created_at")),
             _seconds(((s.manifest or {}).get("metrics") or {}).get("time/seconds")),
             peak_memory(s.manifest or {}), headline(s)] for s in stages]
    return ("<section id=stages><h2>Stages</h2>"
            + _table(["stage", "method", "kind", "status", "finished", "time", "peak memory", "result"], rows)
            + "<p class=label>versions</p>" + _kv_table(latest.get("versions") or {}, per_row=4, cls="kv head")
            + "</section>")


def verdicts(manifest: dict) -> list[tuple[str, str, str]]:
    """Per judged policy of an evaluate stage: (policy, verdict class, sentence). A win is a 95% interval above
    one half, a loss one below it; otherwise the prompts do not tell the two apart."""
    m, ev = manifest.get("metrics") or {}, manifest.get("evaluate") or {}
    base, out = ev.get("baseline"), []
    # the judge's win rates; without a judge, the last independent scorer's (else the reward model's)
    sources = win_rate_sources(manifest)
    label, pre = (sources[0] if sources[0][1] == "" else sources[-1]) if sources else ("judge", "")
    by = f" by the {label}" if pre else ""
    for n in eval_policies(manifest):
        rate, low, high = (m.get(f"eval/{n}/{pre}{k}") for k in ("win_rate", "win_rate_low", "win_rate_high"))
        if n == base or not all(isinstance(v, (int, float)) for v in (rate, low, high)):
            continue
        cls, word = (("win", "better than") if low > 0.5 else ("loss", "worse than") if high < 0.5
                     else ("tie", "not distinguishable from"))
        moved = [f"{label} {m[f'eval/{base}/{k}']:.2f} → {m[f'eval/{n}/{k}']:.2f}"
                 for label, k in (("reward", "reward_mean"), ("rule", "rule_reward_mean"))
                 if isinstance(m.get(f"eval/{base}/{k}"), (int, float)) and isinstance(m.get(f"eval/{n}/{k}"),
                                                                                         (int, float))]
        kl = m.get(f"eval/{n}/kl")
        lc = m.get(f"eval/{n}/{pre}win_rate_lc")
        sentence = (f"{n} is {word} {base}{by}: win rate {rate:.0%} over "
                    f"{_fmt(m.get(f'eval/{n}/pairs', ev.get('prompts')))} held-out "
                    f"prompts (95% interval {low:.0%}–{high:.0%})"
                    + (f", {lc:.0%} length-controlled" if isinstance(lc, (int, float)) else "")
                    + "".join(f"; {x}" for x in moved)
                    + (f"; KL to {ev.get('reference')} {kl:.2f}" if isinstance(kl, (int, float)) else ""))
        out.append((n, cls, sentence))
    return out


def _verdict_section(evals: list[Stage]) -> str:
    """The page's first answer: did alignment work? One line per policy of each evaluate stage, against its
    baseline; the stage's table, chart and answers follow right below."""
    if not evals:
        return ("<section id=verdict><h2>Did alignment work?</h2><p class=muted>This run has no evaluate stage, so "
                "nothing compares the policies with each other: add one (docs/evaluate.md) to get win rates against "
                "the SFT policy on held-out prompts.</p></section>")
    items = []
    for st in evals:
        lines = verdicts(st.manifest or {})
        if not lines:
            items.append(f"<li><span class='verdict none'>no judge</span> {_e(st.name)}: no win rates (the stage has "
                         "no judge); its table below has the scores</li>")
        items += [f"<li>{_verdict(cls)} {_e(sentence)}</li>" for _, cls, sentence in lines]
    return f"<section id=verdict><h2>Did alignment work?</h2><ul class=verdicts>{''.join(items)}</ul></section>"


def render(run_dir: str | Path) -> str:
    """The report page for a run directory, as one HTML string: the verdict and the evaluate stages first (what a
    reader opens the page for), then the stages table, judge agreement and every other stage's details."""
    run_dir = Path(run_dir)
    stages = read_run(run_dir)
    evals = [s for s in stages if s.kind == "eval" and s.manifest and s.status != "not run yet"]
    monitored = read_json(run_dir / MONITOR_JSON)
    body = (_header(run_dir, stages) + _verdict_section(evals)
            + (monitor_section(monitored, link=MONITOR_JSON.replace(".json", ".html"), plots=3) if monitored else "")
            + "".join(_stage_section(s) for s in evals) + _stages_table(stages) + _agreement(run_dir)
            + "".join(_stage_section(s) for s in stages if s not in evals))
    return document(f"rlhf report: {run_dir.name}", body)


def document(title: str, body: str) -> str:
    """A whole page around `body` (already HTML): the report's CSS, and a Content-Security-Policy under which no
    script may run, whatever the page holds: inline styles and data: images only."""
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            "<meta http-equiv=Content-Security-Policy content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'\">"
            f"<meta name=viewport content='width=device-width'><title>{_e(title)}</title>"
            f"<link rel=icon href='data:,'><style>{CSS}</style></head><body>{body}</body></html>\n")


# --------------------------------------------------------------------------- the served policy (rlhf monitor)


MONITOR_JSON = "monitor/monitor.json"  # where `rlhf monitor DB -o RUN_DIR/monitor` writes its summary in a run


def monitor_section(result: dict, link: str | None = None, plots: int | None = None) -> str:
    """What `rlhf monitor` found (its monitor.json): the alerts first, the traffic in one line, and the first
    `plots` of its charts (all when None); `link` points to the monitor's own page."""
    alerts = [a for a in result.get("alerts") or [] if isinstance(a, dict)]
    items = "".join(f"<li><span class='verdict loss'>alert</span> <b>{_e(a.get('kind', ''))}</b> "
                    f"{_e(a.get('message', ''))}</li>" for a in alerts) or (
        "<li><span class='verdict win'>ok</span> no alert: no drift from the baseline and no sign of reward "
        "hacking</li>")
    counts, window, base = (result.get(k) if isinstance(result.get(k), dict) else {}
                            for k in ("counts", "window", "baseline"))
    facts = {"traffic log": result.get("db"), "completions": counts.get("completions"),
             "feedback": counts.get("feedback"), "windows": len(result.get("windows") or []),
             "window": window.get("spec"), "baseline policy": base.get("policy"), "written": result.get("written_at")}
    charts = list(monitor_charts.monitor_plots(result).items())[:plots]
    more = f"<p><a href=\"{_e(link)}\">the monitor's page: every chart and window</a></p>" if link else ""
    return (f"<section id=monitor><h2>Served traffic (rlhf monitor)</h2><ul class=verdicts>{items}</ul>"
            + _kv_table(facts, per_row=4) + "<div class=plots>"
            + "".join(_img(png, title) for title, png in charts) + f"</div>{more}</section>")


def write_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write the report of `run_dir` to `output` (default RUN_DIR/report.html), atomically; returns its path."""
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
ul.verdicts{list-style:none;padding:0;margin:6px 0 0;font-size:15px}ul.verdicts li{margin:4px 0}
a{color:#2456b3;text-decoration:none}
"""
