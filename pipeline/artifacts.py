"""Run directories, manifests, atomic writes and input checks.

A stage is built in `RUN_DIR/.<stage>.partial/` and swapped into `RUN_DIR/<stage>/` only when
its manifest (written last) says it is complete, so a crash never leaves a half-written artifact
where a good one was:

    RUN_DIR/
      sft/
        manifest.json     # written last, atomically; status "complete"
        config.yaml       # the resolved stage config
        metrics.jsonl     # one JSON object per logged step
        model/            # safetensors weights + tokenizer (or preferences.jsonl, ...)
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from pipeline.errors import InvalidInput, UsageError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
KINDS = ("policy", "reward_model", "preferences", "eval")


# --------------------------------------------------------------------------- atomic writes


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it. Only rank 0 writes."""
    from pipeline.distributed import is_main

    if not is_main():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(tmp, mode, **({} if isinstance(data, bytes) else {"encoding": "utf-8"})) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str | Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    n = 0
    lines = []
    for row in rows:
        lines.append(json.dumps(row, ensure_ascii=False))
        n += 1
    write_atomic(path, "\n".join(lines) + ("\n" if lines else ""))
    return n


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory `src` to `dst`, keeping the old `dst` until the new one is in place."""
    old = dst.with_name(f".{dst.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    if old.exists():
        shutil.rmtree(old)


# --------------------------------------------------------------------------- hashes and versions


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_hash(stage_dir: str | Path) -> str:
    return file_sha256(Path(stage_dir) / MANIFEST)


def package_versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name, dist in [
        ("torch", "torch"),
        ("transformers", "transformers"),
        ("trl", "trl"),
        ("peft", "peft"),
        ("deepspeed", "deepspeed"),
        ("rlhf", "rlhf-pipeline"),
    ]:
        try:
            out[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_sha() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = res.stdout.strip()
    return sha if res.returncode == 0 and sha else None


# --------------------------------------------------------------------------- manifests


@dataclass
class Artifact:
    """A complete stage output that another stage reads."""

    path: Path
    manifest: dict

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    def output(self, key: str) -> Path:
        rel = self.manifest.get("outputs", {}).get(key)
        if rel is None:
            raise InvalidInput(f"{self.path / MANIFEST}: the artifact has no output '{key}'")
        return self.path / rel


def read_manifest(stage_dir: str | Path) -> dict | None:
    p = Path(stage_dir) / MANIFEST
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"{p}: unreadable manifest: {exc}") from None


def load_artifact(stage_dir: str | Path, kinds: str | tuple[str, ...], role: str = "input") -> Artifact:
    """Open an input artifact, refusing one that is missing, incomplete or of the wrong kind."""
    stage_dir = Path(stage_dir)
    kinds = (kinds,) if isinstance(kinds, str) else kinds
    if not stage_dir.is_dir():
        raise UsageError(f"{role}: {stage_dir} does not exist (run the stage that produces it first)")
    m = read_manifest(stage_dir)
    if m is None:
        partial = stage_dir.with_name(f".{stage_dir.name}.partial")
        hint = f"; an unfinished run left {partial}" if partial.exists() else ""
        raise InvalidInput(f"{role}: {stage_dir} has no {MANIFEST}: the artifact is incomplete{hint}")
    if m.get("status") != "complete":
        raise InvalidInput(f"{role}: {stage_dir}/{MANIFEST} has status {m.get('status')!r}, not 'complete'")
    if m.get("kind") not in kinds:
        raise InvalidInput(
            f"{role}: {stage_dir} is a '{m.get('kind')}' artifact (stage '{m.get('stage')}'), "
            f"but this needs {' or '.join(repr(k) for k in kinds)}"
        )
    for rel in m.get("outputs", {}).values():
        if not (stage_dir / rel).exists():
            raise InvalidInput(f"{role}: {stage_dir}/{rel}, listed in the manifest, is missing")
    return Artifact(stage_dir, m)


def build_manifest(
    *,
    stage: str,
    kind: str,
    config_hash: str,
    inputs: dict[str, dict],
    outputs: dict[str, str],
    metrics: dict[str, Any] | None = None,
    counts: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict:
    assert kind in KINDS, kind
    m = {
        "schema_version": SCHEMA_VERSION,
        "stage": stage,
        "kind": kind,
        "status": "complete",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config_hash": config_hash,
        "inputs": inputs,
        "outputs": outputs,
        "metrics": metrics or {},
        "counts": counts or {},
        "versions": package_versions(),
        "git_sha": git_sha(),
    }
    m.update(extra or {})
    return m


def file_input(path: str | Path) -> dict:
    """Manifest entry for a data file input: its path and content hash."""
    p = Path(path)
    return {"path": str(p), "sha256": file_sha256(p)}


def artifact_input(art: Artifact) -> dict:
    return {"path": str(art.path), "manifest_hash": manifest_hash(art.path)}


def inputs_unchanged(recorded: dict[str, dict], current: dict[str, dict]) -> str | None:
    """None if the recorded inputs match the current ones; otherwise a reason."""
    if set(recorded) != set(current):
        return f"inputs changed ({sorted(recorded)} -> {sorted(current)})"
    for name, cur in current.items():
        rec = recorded[name]
        for key in ("manifest_hash", "sha256", "ref"):
            if cur.get(key) != rec.get(key):
                return f"input '{name}' changed"
    return None
