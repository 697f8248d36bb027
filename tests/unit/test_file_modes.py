"""Files other users read: weights follow the umask like every other file (safetensors writes 0600 whatever the
umask), in the model cache, in artifacts and in exports; and a cache entry this user cannot read is never judged
incomplete and removed (in a shared RLHF_CACHE it is another user's)."""

import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from pipeline.cli import main
from tests.conftest import tiny_sft_block, write_yaml


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def test_weights_follow_the_umask_in_the_cache_artifacts_and_exports(tmp_path, monkeypatch, umask_027):
    monkeypatch.setenv("RLHF_CACHE", str(tmp_path / "cache"))
    from pipeline.models import resolve

    entry = Path(resolve("tiny"))
    assert _modes(entry)["model.safetensors"] == umask_027 and set(_modes(entry).values()) == {umask_027}

    run = tmp_path / "run"
    cfg = write_yaml(tmp_path / "p.yaml", {"run_dir": str(run), "stages": [
        tiny_sft_block(optim={"max_steps": 1, "logging_steps": 1})]})
    assert main(["run", str(cfg)]) == 0
    modes = _modes(run / "sft")
    assert modes["model/model.safetensors"] == umask_027 and set(modes.values()) == {umask_027}, modes

    assert main(["export", str(run / "sft"), "-o", str(tmp_path / "exported")]) == 0
    modes = _modes(tmp_path / "exported")
    assert modes["model.safetensors"] == umask_027 and set(modes.values()) == {umask_027}, modes


def _in_child(fn, as_other_user: bool) -> str:
    """fn() in a forked child (as user nobody when `as_other_user`: root reads everything); its result or
    'ExceptionType: message', through a pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave without running pytest's exit handlers
        try:
            os.close(r)
            if as_other_user:
                os.setgid(65534)
                os.setuid(65534)
            try:
                out = f"ok: {fn()}"
            except BaseException as exc:  # noqa: BLE001
                out = f"{type(exc).__name__}: {exc}"
            os.write(w, out.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    os.waitpid(pid, 0)
    return out


def test_a_cache_entry_this_user_cannot_read_is_left_alone(monkeypatch):
    """Another user built the entry with weights only they can read (an older rlhf wrote them 0600) in a shared,
    group-writable cache. A run as this user judged it incomplete, removed it and rebuilt it; now it stops and says
    why, and the entry is untouched."""
    import filelock  # noqa: F401  (imported here, before the fork: the child may not read the venv as nobody)
    import safetensors.torch  # noqa: F401

    from pipeline.models import TINY_VERSION, resolve

    root = os.geteuid() == 0
    shared = Path(tempfile.mkdtemp(prefix="rlhf-shared-cache-"))  # not under pytest's 0700 tmp: nobody must reach it
    try:
        monkeypatch.setenv("RLHF_CACHE", str(shared))
        entry = Path(resolve("tiny"))
        assert entry.name == TINY_VERSION
        for d in (shared, shared / "models", entry):
            d.chmod(0o777)  # a cache shared by a group: anyone may create and remove entries
        lock = shared / "models" / f".{TINY_VERSION}.lock"
        lock.touch()
        lock.chmod(0o666)
        weights = entry / "model.safetensors"
        assert _in_child(lambda: resolve("tiny"), root) == f"ok: {entry}", "a readable entry is used as it is"

        weights.chmod(0o600 if root else 0o000)
        before = weights.stat().st_ino, weights.read_bytes() if root else None
        out = _in_child(lambda: resolve("tiny"), root)
        assert out.startswith("UsageError: the model cache entry") and "cannot be read by this user" in out, out
        assert "not rebuilt or removed" in out and str(weights) in out
        assert weights.stat().st_ino == before[0], "the entry was not replaced"
        weights.chmod(0o644)
        assert before[1] is None or weights.read_bytes() == before[1]
    finally:
        for p in [shared, *shared.rglob("*")]:
            if not p.is_symlink():
                p.chmod(0o700 if p.is_dir() else 0o600)
        shutil.rmtree(shared)
