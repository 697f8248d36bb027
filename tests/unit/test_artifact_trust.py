"""Artifacts from others (a copied run directory, a downloaded policy) are data, never instructions: they run no
code of theirs unless the user says so on the command line or in their own config, and the files they link to or
name outside themselves are never read, copied, served or shown."""

import json
import os
import shutil
from pathlib import Path

from pipeline.cli import main

CANARY = "CANARY-7731 api_key=sk-live-f00d"


def _artifact(run: Path, tiny_path: str, name: str = "sft", kind: str = "policy", **manifest) -> Path:
    """RUN/NAME holding the tiny model as a complete artifact of `kind`, as if copied from someone else."""
    stage = run / name
    shutil.copytree(tiny_path, stage / "model")
    (stage / "manifest.json").write_text(json.dumps({
        "schema_version": 1, "stage": name, "kind": kind, "status": "complete", "outputs": {"model": "model"},
        **manifest}))
    return stage


def test_links_inside_an_artifact_leak_no_file(tmp_path, tiny_path, capsys):
    """A model/chat_template.jinja linked to a secret was copied by `rlhf export`, and a config.yaml linked to one
    was embedded in `rlhf report`. Now an artifact holding links is refused (export, serve, every stage input), and
    the report skips links with a warning."""
    from pipeline.errors import InvalidInput
    from pipeline.serve import policy_model

    secret = tmp_path / "secret.txt"
    secret.write_text(CANARY)
    run = tmp_path / "run"
    art = _artifact(run, tiny_path)
    (art / "model" / "chat_template.jinja").unlink()
    os.symlink(secret, art / "model" / "chat_template.jinja")
    os.symlink(secret, art / "config.yaml")
    for src in (art, art / "model"):
        assert main(["export", str(src), "-o", str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err
        assert "symbolic links" in err and "model/chat_template.jinja" in err and CANARY not in err
        assert not (tmp_path / "out").exists()
    try:
        policy_model(str(art))
        raise AssertionError("serve policy opened an artifact holding links")
    except InvalidInput as exc:
        assert "symbolic links" in str(exc)

    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert CANARY not in page and "symbolic links not read: config.yaml" in page
    assert "symbolic links not read: config.yaml" in capsys.readouterr().err


def test_an_artifact_cannot_name_outputs_outside_itself(tmp_path, tiny_path, capsys):
    """outputs are files of the artifact: a manifest saying {"model": "/home/me/private-model"} or "../x" would
    export (or train on, or serve) a directory of this machine instead."""
    private = tmp_path / "private-model"
    shutil.copytree(tiny_path, private)
    for target in (str(private), "../../private-model"):
        run = tmp_path / f"run{len(target)}"
        art = _artifact(run, tiny_path)
        manifest = json.loads((art / "manifest.json").read_text())
        manifest["outputs"]["model"] = target
        (art / "manifest.json").write_text(json.dumps(manifest))
        assert main(["export", str(art), "-o", str(tmp_path / "out")]) == 1
        assert "which is not a path inside the artifact" in capsys.readouterr().err
        assert not (tmp_path / "out").exists()


def test_export_onto_a_link_is_a_clear_error(tmp_path, tiny_path, capsys):
    """`rlhf export -o LINK` (a link to an empty directory, or a dangling one) raised a bare NotADirectoryError."""
    art = _artifact(tmp_path / "run", tiny_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    for i, target in enumerate((empty, tmp_path / "nowhere")):
        link = tmp_path / f"link{i}"
        os.symlink(target, link)
        assert main(["export", str(art), "-o", str(link)]) == 2
        assert "is a symbolic link" in capsys.readouterr().err
        assert link.is_symlink() and not any(empty.iterdir())
