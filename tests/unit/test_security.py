"""Security review fixes that need no model: secret redaction by whole key names, artifacts flushed to disk
before their manifest, rule modules from an allow-list only, DeepSpeed configs that would unpickle."""

import json
import os

import pytest

from pipeline.cli import main
from tests.conftest import write_yaml


def test_redaction_removes_secrets_and_keeps_ordinary_settings():
    from pipeline.tracking import redact

    canary = "sk-canary-9f2e"
    cfg = {"api_key": canary, "openai_api_key": canary, "hf_token": canary, "access_token": canary,
           "password": canary, "Authorization": canary, "nested": [{"client_secret": canary}],
           "max_new_tokens": 32, "max_tokens": 8, "tokenizer": "stage:sft", "api_key_env": "OPENAI_API_KEY",
           "num_tokens": 5, "token_budget": 100}
    out = redact(cfg)
    assert canary not in json.dumps(out)
    for k in ("max_new_tokens", "max_tokens", "tokenizer", "api_key_env", "num_tokens", "token_budget"):
        assert out[k] == cfg[k], k


def test_stage_config_keeps_settings_named_like_tokens(tmp_path):
    """config.yaml in an artifact holds the real values of tokenizer / max_length, not <redacted>."""
    run = tmp_path / "run"
    cfg = write_yaml(tmp_path / "p.yaml", {"run_dir": str(run), "stages": [
        {"stage": "preferences", "data": {"path": "synthetic:preferences"}, "tokenizer": "tiny", "max_length": 64}]})
    assert main(["run", str(cfg)]) == 0
    text = (run / "preferences" / "config.yaml").read_text()
    assert "tokenizer: tiny" in text and "<redacted>" not in text


def test_artifact_files_reach_disk_before_the_manifest(tmp_path, monkeypatch, tiny_path):
    synced = []
    real = os.fsync

    def record(fd):
        try:
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    from tests.conftest import tiny_sft_block

    run = tmp_path / "run"
    cfg = write_yaml(tmp_path / "p.yaml", {"run_dir": str(run), "stages": [
        tiny_sft_block(optim={"max_steps": 1, "logging_steps": 1})]})
    assert main(["run", str(cfg)]) == 0
    manifest_at = max(i for i, p in enumerate(synced) if ".manifest.json.tmp" in p)
    # the weights (written by save_pretrained, not by us) and every other file, before the manifest
    for f in ("model/model.safetensors", "model/tokenizer.json", "model/config.json", "metrics.jsonl"):
        first = next(i for i, p in enumerate(synced) if p.endswith(f"/.sft.partial/{f}"))
        assert first < manifest_at, f


def test_a_rule_must_come_from_a_trusted_module(tmp_path, monkeypatch, capsys):
    """`rule: shutil:rmtree` with a prompt that is a directory path deleted that directory through
    `rlhf feedback agree`; trusting all of `feedback` let `feedback.schema:write_pairs` empty a file named by a
    prompt. Now only rules registered with @rule (feedback/rules.py) or functions of modules trusted by name run."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    human = tmp_path / "human.jsonl"
    for target in (victim, victim / "precious.txt"):
        human.write_text(json.dumps({"prompt": str(target), "chosen": "a", "rejected": "b"}) + "\n")
        for rule in ("shutil:rmtree", "os:system", "feedback.judges.rule:importlib", "feedback.synthetic:_topic",
                     "feedback.schema:write_pairs", "pipeline.artifacts:write_atomic"):
            judge = write_yaml(tmp_path / "j.yaml", {"type": "rule", "rule": rule, "cache": "none"})
            assert main(["feedback", "agree", "--human", str(human), "--judge", str(judge),
                         "-o", str(tmp_path / "a.json")]) == 2, rule
            assert f"rule '{rule}'" in capsys.readouterr().err
    assert (victim / "precious.txt").read_text() == "keep me"

    from feedback.judges.rule import load_callable as load
    from rlhf.errors import UsageError as Refused

    with pytest.raises(Refused, match="not a registered rule.*feedback.synthetic:rule_score"):
        load("feedback.schema:write_pairs")
    assert (victim / "precious.txt").read_text() == "keep me"

    from feedback.judges.rule import load_callable
    from rlhf.errors import UsageError

    with pytest.raises(UsageError, match="not trusted.*RLHF_TRUSTED_MODULES=tests.helpers"):
        load_callable("tests.helpers:nan_reward")
    monkeypatch.setenv("RLHF_TRUSTED_MODULES", "tests.helpers")
    assert load_callable("tests.helpers:nan_reward")("p", "r") != 0  # NaN, from the module named in the env
    assert load_callable("feedback.synthetic:rule_score")("Tell me about the river.", "The river is calm.") > 0.5


@pytest.mark.parametrize("block", [{"checkpoint": {"load_universal": True}},
                                   {"checkpoint": {"writer": {"type": "fast"}}},
                                   {"datastates": {"enabled": True}}, {"nebula": {"enabled": True}}])
def test_deepspeed_configs_that_load_checkpoints_unsafely_are_refused(block, tmp_path):
    from pipeline.blocks import OptimConfig
    from pipeline.deepspeed import load_zero_config
    from rlhf.errors import UsageError

    ds = tmp_path / "z.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, **block}))
    with pytest.raises(UsageError, match="weights_only=False"):
        load_zero_config(ds, OptimConfig(), "fp32", "stages.sft")
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "checkpoint": {"tag_validation": "Fail"}}))
    assert load_zero_config(ds, OptimConfig(), "fp32", "stages.sft")["checkpoint"] == {"tag_validation": "Fail"}


def test_model_spec_reaches_every_load_and_the_rerun_check(tmp_path, monkeypatch, capsys):
    """revision and trust_remote_code are passed wherever a model or tokenizer is loaded (here: the preferences
    stage's tokenizer), a change of either reruns the stage, and a revision on a local or built-in model (where
    it would pin nothing) is refused."""
    import pipeline.models as models

    seen = []
    real = models.load_tokenizer
    monkeypatch.setattr(models, "load_tokenizer", lambda path, trust=False, revision=None: (
        seen.append((trust, revision)), real(path))[1])
    run = tmp_path / "run"
    stages = [{"stage": "preferences", "data": {"path": "synthetic:preferences"}, "tokenizer": "base", "max_length": 64}]
    cfg = write_yaml(tmp_path / "p.yaml", {"run_dir": str(run), "models": {"base": "tiny"}, "stages": stages})
    assert main(["run", str(cfg)]) == 0 and seen == [(False, None)]
    cfg2 = write_yaml(tmp_path / "q.yaml", {"run_dir": str(run), "stages": stages,
                                            "models": {"base": {"ref": "tiny", "trust_remote_code": True}}})
    assert main(["run", str(cfg2)]) == 0
    assert "input 'tokenizer' changed: rerunning" in capsys.readouterr().out
    assert seen[-1] == (True, None)
    cfg3 = write_yaml(tmp_path / "r.yaml", {"run_dir": str(run), "stages": stages,
                                            "models": {"base": {"ref": "tiny", "revision": "v2"}}})
    assert main(["run", str(cfg3), "--check"]) == 2
    assert "revision has no effect for 'tiny'" in capsys.readouterr().err
