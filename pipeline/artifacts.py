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
import re
import shutil
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from rlhf.errors import InvalidInput, UsageError
from rlhf.io import write_atomic, write_json, write_jsonl  # noqa: F401  (artifacts write with these)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
KINDS = ("policy", "reward_model", "preferences", "unpaired_preferences", "eval")


# --------------------------------------------------------------------------- atomic writes
# write_atomic / write_json / write_jsonl live in rlhf.io (imported above): feedback/ writes with them too.


def fsync_tree(root: Path) -> None:
    """Flush every file under `root`, and every directory, to disk: done before a manifest is written, so that a
    power loss cannot leave a complete manifest over weights still in the page cache. Links are not followed."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def umask() -> int:
    """The process's umask, read without changing it (os.umask can only read it by setting it, which races with
    other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def follow_umask(root: Path) -> None:
    """Give every file under `root` (links are not followed) the mode the umask gives new files. safetensors writes
    weights with mode 0600 whatever the umask, while every other file follows it: in a shared cache or run
    directory no one else could read the weights, and another user's run judged such a cache entry incomplete."""
    mode = 0o666 & ~umask()
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) != mode:
                os.chmod(p, mode)


OWNED = ".rlhf"  # marks a directory this pipeline created (a stage's work directory, then its artifact)
STAGE_NAME = re.compile(r"[A-Za-z0-9_-]+\Z")  # \Z: "$" would also match before a final newline


def inside(path: Path, root: Path) -> Path:
    """`path` if it lies inside `root` (its parent's real location, the last part not followed: a link there is
    the link itself); otherwise a usage error. Every directory the runner writes or removes passes here."""
    real = Path(os.path.realpath(path.parent)) / path.name
    base = Path(os.path.realpath(root))
    if real == base or base not in real.parents:
        raise UsageError(f"{path} is not inside the run directory {root}; refusing to write or remove it")
    return path


def owned(path: Path) -> bool:
    """A directory this pipeline created: an artifact (manifest.json) or a work directory (the .rlhf mark)."""
    return path.is_dir() and not path.is_symlink() and ((path / MANIFEST).is_file() or (path / OWNED).is_file())


def remove(path: Path) -> None:
    """Delete a file or directory this pipeline made, never following links: a symlink is unlinked and its
    target left alone (shutil.rmtree does not follow the links inside a tree either)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def make_work_dir(work: Path, root: Path) -> None:
    """A fresh, empty work directory marked as ours; an existing one is removed only if it is ours."""
    inside(work, root)
    if work.is_symlink() or work.exists():
        if not (work.is_symlink() or owned(work)):
            raise UsageError(f"{work} exists and was not made by rlhf (no {OWNED} mark); move it away")
        remove(work)
    work.mkdir(parents=True)
    (work / OWNED).write_text("made by rlhf: a stage's work directory, then its artifact\n")


def replace_dir(src: Path, dst: Path, root: Path) -> None:
    """Move the finished directory `src` to `dst`, keeping the old `dst` until the new one is in place.

    Both must lie inside `root` (the run directory). An existing `dst` is replaced only if this pipeline
    made it (an artifact with a manifest) or it is a symlink, which is unlinked: its target is never touched.
    """
    inside(src, root)
    inside(dst, root)
    old = dst.with_name(f".{dst.name}.old")
    for p in (dst, old):
        if (p.is_symlink() or p.exists()) and not (p.is_symlink() or owned(p)):
            raise UsageError(f"{p} exists and is not an artifact of this pipeline (no {MANIFEST}); refusing to "
                             "replace it: move it away, or choose another run_dir or stage name")
    remove(old)
    if dst.is_symlink() or dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    remove(old)


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


def links_inside(root: str | Path) -> list[Path]:
    """Every symbolic link under `root` (files and directories; none is followed). `root` itself may be a link."""
    found = []
    for dirpath, dirs, files in os.walk(root):
        found += [Path(dirpath, n) for n in dirs + files if os.path.islink(os.path.join(dirpath, n))]
    return sorted(found)


def refuse_links(root: str | Path, role: str) -> None:
    """An artifact is refused when it holds symbolic links: a `model/chat_template.jinja` or `config.yaml` that
    links to a key or any other file of this machine would be read as the artifact's own, then copied by
    `rlhf export`, embedded in a report or served. Artifacts this pipeline writes hold none."""
    links = links_inside(root)
    if links:
        shown = ", ".join(f"{p.relative_to(root)} -> {os.readlink(p)}" for p in links[:5])
        more = f" and {len(links) - 5} more" if len(links) > 5 else ""
        raise InvalidInput(f"{role}: {root} holds symbolic links ({shown}{more}); links inside an artifact are "
                           "refused, since they can point at any file on this machine: replace each with a copy of "
                           "the file it points to, if that file is meant to be part of the artifact")


def load_artifact(stage_dir: str | Path, kinds: str | tuple[str, ...], role: str = "input") -> Artifact:
    """Open an input artifact, refusing one that is missing, incomplete, of the wrong kind or holding links."""
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
        if not isinstance(rel, str) or Path(rel).is_absolute() or ".." in Path(rel).parts:
            # an output is a file of the artifact: "/home/me/private" or "../x" would open something else
            raise InvalidInput(f"{role}: {stage_dir}/{MANIFEST} lists the output {rel!r}, which is not a path inside "
                               "the artifact")
        if not (stage_dir / rel).exists():
            raise InvalidInput(f"{role}: {stage_dir}/{rel}, listed in the manifest, is missing")
    refuse_links(stage_dir, role)
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


def inputs_unchanged(recorded: dict[str, dict], current: dict[str, dict]) -> str | None:
    """None if the recorded inputs match the current ones; otherwise a reason."""
    if set(recorded) != set(current):
        return f"inputs changed ({sorted(recorded)} -> {sorted(current)})"
    for name, cur in current.items():
        rec = recorded[name]
        for key in ("manifest_hash", "sha256", "ref", "revision", "trust_remote_code"):
            default = False if key == "trust_remote_code" else None  # manifests from before these were recorded
            if cur.get(key, default) != rec.get(key, default):
                return f"input '{name}' changed"
    return None
