"""The evaluate stage's answers as the monitor's baseline (`rlhf monitor --baseline RUN_DIR/evaluate`).

From the artifact's samples.jsonl, for the served policy: each held-out prompt, its answer, the answer's length in
tokens and whether it ended in EOS; and, for a judge, the evaluate stage's own baseline policy's answer to each prompt
(the reference an answer is judged against). The served policy is the evaluated policy named like the traffic's
served stage directory (`runs/x/ppo` -> `ppo`) or served model name, or `--baseline-policy NAME`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from feedback.schema import prompt_key
from pipeline.artifacts import load_artifact
from pipeline.monitor.scoring import baseline_items
from rlhf.errors import InvalidInput, UsageError


@dataclass
class Baseline:
    dir: Path
    policy: str  # the evaluated policy the traffic is compared with
    reference: str | None  # the evaluate stage's baseline policy: the answers a judge compares against
    prompts: list = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    eos: list[bool] = field(default_factory=list)
    references: dict[str, str] = field(default_factory=dict)  # prompt_key -> the reference policy's answer
    metrics: dict = field(default_factory=dict)  # the evaluate stage's eval/<policy>/* numbers

    def items(self):
        return baseline_items(self.prompts, self.responses)


def _samples(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise UsageError(f"{path}:{line_no}: not JSON ({exc})") from None
            if not isinstance(row, dict) or not isinstance(row.get("responses"), dict):
                raise UsageError(f"{path}:{line_no}: not an evaluate sample (no 'responses' object)")
            rows.append(row)
    return rows


def served_names(rows: list[dict]) -> list[str]:
    """The names the traffic was served under: each served stage directory's name, then each served model name."""
    names = [Path(r["stage"]).name for r in rows if r.get("stage")] + [r["model"] for r in rows if r.get("model")]
    return list(dict.fromkeys(names))


def load_baseline(path: str | Path, policy: str | None, served: list[str]) -> Baseline:
    path = Path(path)
    try:
        art = load_artifact(path, "eval", role="--baseline")
    except InvalidInput as exc:  # read, but not what --baseline takes: a usage error
        raise UsageError(f"{exc} (--baseline takes an evaluate stage's artifact, e.g. runs/tiny/evaluate)") from None
    m, ev = art.manifest, art.manifest.get("evaluate") or {}
    policies = list((ev.get("policies") or {}).keys())
    if policy is None:
        matches = [n for n in served if n in policies]
        if len(set(matches)) != 1:
            raise UsageError(f"--baseline {path}: the traffic was served as {served or 'nothing'}, "
                             f"{'none' if not matches else 'more than one'} of which is an evaluated policy "
                             f"({', '.join(policies)}); name it with --baseline-policy NAME")
        policy = matches[0]
    elif policy not in policies:
        raise UsageError(f"--baseline-policy {policy}: {path} evaluated {', '.join(policies)}")
    samples = path / (m.get("outputs") or {}).get("samples", "samples.jsonl")
    if not samples.is_file():
        raise UsageError(f"--baseline {path}: no samples.jsonl (the evaluate stage writes one)")
    b = Baseline(path, policy, ev.get("baseline"),
                 metrics={k.split("/", 2)[2]: v for k, v in (m.get("metrics") or {}).items()
                          if k.startswith(f"eval/{policy}/")})
    for row in _samples(samples):
        answer, scores = row["responses"].get(policy), (row.get("scores") or {}).get(policy) or {}
        if not isinstance(answer, str):
            continue
        b.prompts.append(row.get("prompt"))
        b.responses.append(answer)
        b.lengths.append(scores.get("length"))
        b.eos.append(scores.get("eos"))
        ref = row["responses"].get(b.reference)
        if isinstance(ref, str):
            b.references[prompt_key(row.get("prompt"))] = ref
    if not b.responses:
        raise UsageError(f"--baseline {samples}: no answers of '{policy}'")
    return b
