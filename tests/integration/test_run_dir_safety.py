"""Configs cannot delete outside the run: stage names are safe directory names, the runner writes and removes
only inside run_dir and only what it made, symlinked stage directories are unlinked (never followed), and -o
outputs never replace a directory."""

import os

import pytest

from pipeline.cli import main
from tests.conftest import write_yaml

PREFS = {"stage": "preferences", "data": {"path": "synthetic:preferences"}}


def _victim(path):
    path.mkdir(parents=True)
    (path / "precious.txt").write_text("keep me")
    return path


@pytest.mark.parametrize("name", ["../victim", "VICTIM_ABS", ".", "..", "a/b", ".hidden", "x y", "", "sft\n"])
def test_unsafe_stage_names_are_refused_and_nothing_outside_is_touched(name, tmp_path, capsys):
    victim = _victim(tmp_path / "victim")
    name = str(victim) if name == "VICTIM_ABS" else name
    run = tmp_path / "run"
    cfg = write_yaml(tmp_path / "p.yaml", {"run_dir": str(run), "stages": [{**PREFS, "name": name}]})
    assert main(["run", str(cfg)]) == 2
    assert "is not a safe directory name" in capsys.readouterr().err
    assert (victim / "precious.txt").read_text() == "keep me" and os.listdir(victim) == ["precious.txt"]
    assert not run.exists() or not any(run.iterdir())


def test_run_dir_never_replaces_a_directory_it_did_not_make(tmp_path, capsys):
    """--run-dir pointed at a directory that already holds a folder named like a stage: refused, kept."""
    home = tmp_path / "home"
    victim = _victim(home / "preferences")
    cfg = write_yaml(tmp_path / "p.yaml", {"run_dir": str(tmp_path / "unused"), "stages": [PREFS]})
    assert main(["run", str(cfg), "--run-dir", str(home)]) == 2
    assert "is not an artifact of this pipeline" in capsys.readouterr().err
    assert os.listdir(victim) == ["precious.txt"]
    # a stray work directory that rlhf did not make is not removed either
    stray = _victim(home / ".other.partial")
    cfg = write_yaml(tmp_path / "q.yaml", {"run_dir": str(home), "stages": [{**PREFS, "name": "other"}]})
    assert main(["run", str(cfg)]) == 2
    assert "was not made by rlhf" in capsys.readouterr().err and os.listdir(stray) == ["precious.txt"]


def test_a_symlinked_stage_directory_is_replaced_by_unlinking_never_followed(tmp_path):
    run = tmp_path / "run"
    cfg = write_yaml(tmp_path / "p.yaml", {"run_dir": str(run), "stages": [PREFS]})
    assert main(["run", str(cfg)]) == 0
    elsewhere = tmp_path / "elsewhere"
    os.replace(run / "preferences", elsewhere)  # the artifact moved to another disk, linked back
    (elsewhere / "precious.txt").write_text("keep me")
    os.symlink(elsewhere, run / "preferences")
    for _ in range(2):  # the second run must not fail on anything the first left behind
        assert main(["run", str(cfg), "--force"]) == 0
        assert (run / "preferences").is_dir() and not (run / "preferences").is_symlink()
    assert (elsewhere / "precious.txt").read_text() == "keep me" and (elsewhere / "manifest.json").exists()
    assert sorted(p.name for p in run.iterdir()) == ["preferences"]


def test_output_paths_never_replace_a_directory(tmp_path, capsys):
    victim = _victim(tmp_path / "out.jsonl")
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    assert main(["data", "import", str(src), "-o", str(victim)]) == 2
    assert "is a directory" in capsys.readouterr().err and os.listdir(victim) == ["precious.txt"]
