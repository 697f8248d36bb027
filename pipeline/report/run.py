"""Reading a run directory for the report: which stages it holds and in what state (`read_run`, `read_stage`), and
what each wrote (manifest, resolved config, JSONL files), without trusting any of it: symbolic links are never
followed, unreadable files and torn lines are left out, YAML alias bombs are refused.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.artifacts import MANIFEST
from pipeline.blocks import load_yaml_text
from rlhf.errors import InvalidInput, UsageError


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


def read_json(path: Path) -> dict | None:
    if path.is_symlink():  # a link in a run directory could show any file of this machine (see read_stage)
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


def read_stage(run_dir: Path, name: str) -> Stage:
    """One stage's status: its complete artifact, else its partial directory, else whatever is left."""
    final, partial = run_dir / name, run_dir / f".{name}.partial"
    manifest = read_json(final / MANIFEST) if (final / MANIFEST).is_file() else None
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
    return _in_config_order({n: read_stage(run_dir, n) for n in names})


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


def tracking_on(stage: Stage) -> bool:
    """Whether the run was configured with `tracking: {wandb: true}` (the stage's resolved config says)."""
    tracking = stage.config.get("tracking") or {}
    return bool(tracking.get("wandb")) and tracking.get("wandb_mode") != "disabled"
