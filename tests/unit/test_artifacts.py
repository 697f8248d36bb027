"""Artifacts: atomic writes, directory swap, and refusing bad input artifacts."""

import json
import os

import pytest

from pipeline import artifacts
from rlhf.errors import InvalidInput, UsageError


def test_write_atomic_leaves_no_temporary(tmp_path):
    p = tmp_path / "a" / "f.json"
    artifacts.write_json(p, {"x": 1})
    artifacts.write_json(p, {"x": 2})
    assert json.loads(p.read_text()) == {"x": 2}
    assert os.listdir(p.parent) == ["f.json"]


def test_replace_dir_swaps_in_the_new_version(tmp_path):
    old, new = tmp_path / "sft", tmp_path / ".sft.partial"
    old.mkdir(); (old / "v").write_text("old"); (old / "manifest.json").write_text("{}")
    new.mkdir(); (new / "v").write_text("new")
    artifacts.replace_dir(new, old, tmp_path)
    assert (old / "v").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["sft"]


def _manifest(d, **over):
    d.mkdir(parents=True, exist_ok=True)
    (d / "model").mkdir(exist_ok=True)
    m = artifacts.build_manifest(stage=d.name, kind="policy", config_hash="h", inputs={}, outputs={"model": "model"})
    m.update(over)
    artifacts.write_json(d / "manifest.json", m)
    return m


def test_load_artifact_refuses_missing_incomplete_and_wrong_kind(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        artifacts.load_artifact(tmp_path / "nope", "policy")
    d = tmp_path / "sft"
    d.mkdir()
    with pytest.raises(InvalidInput, match="no manifest.json: the artifact is incomplete"):
        artifacts.load_artifact(d, "policy")
    _manifest(d, status="running")
    with pytest.raises(InvalidInput, match="status 'running', not 'complete'"):
        artifacts.load_artifact(d, "policy")
    _manifest(d, kind="preferences")
    with pytest.raises(InvalidInput, match="is a 'preferences' artifact .* but this needs 'policy'"):
        artifacts.load_artifact(d, "policy")
    _manifest(d)
    (d / "model").rmdir()
    with pytest.raises(InvalidInput, match="listed in the manifest, is missing"):
        artifacts.load_artifact(d, "policy")
    (d / "model").mkdir()
    art = artifacts.load_artifact(d, ("policy", "reward_model"))
    assert art.kind == "policy" and art.output("model") == d / "model"


def test_manifest_records_versions_and_contract_fields(tmp_path):
    m = _manifest(tmp_path / "x")
    for key in ("schema_version", "stage", "kind", "status", "created_at", "config_hash", "inputs", "outputs",
                "metrics", "counts", "versions", "git_sha"):
        assert key in m
    assert m["versions"]["torch"] and m["versions"]["python"]
