"""Artifacts from others (a copied run directory, a downloaded policy) are data, never instructions: they run no
code of theirs unless the user says so on the command line or in their own config, and the files they link to or
name outside themselves are never read, copied, served or shown."""

import json
import os
import shutil
from pathlib import Path

from pipeline.cli import main
from tests.conftest import write_yaml

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
    from rlhf.errors import InvalidInput
    from pipeline.serve.launch import policy_model

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


CUSTOM_CODE = '''"""A model type of its own, as a model that ships code has: importing this file is running it."""
import pathlib

pathlib.Path({canary!r}).write_text("the artifact's code ran")

from transformers import AutoModel, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel


class CustomConfig(LlamaConfig):
    model_type = {module!r}


class CustomModel(LlamaModel):
    config_class = CustomConfig


AutoModel.register(CustomConfig, CustomModel)  # the sequence-classification wrapper builds its body through it


class CustomCausalLM(LlamaForCausalLM):
    config_class = CustomConfig


class CustomRewardModel(LlamaForSequenceClassification):
    config_class = CustomConfig
'''


def _ship_code(model_dir: Path, canary: Path, module: str) -> None:
    """Make the model in `model_dir` one that needs its own code (`module`.py, named by config.json's auto_map),
    which leaves `canary` behind when it runs."""
    (model_dir / f"{module}.py").write_text(CUSTOM_CODE.format(canary=str(canary), module=module))
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.update(model_type=module, auto_map={"AutoConfig": f"{module}.CustomConfig",
                                            "AutoModelForCausalLM": f"{module}.CustomCausalLM",
                                            "AutoModelForSequenceClassification": f"{module}.CustomRewardModel"})
    (model_dir / "config.json").write_text(json.dumps(cfg))


def test_an_artifact_cannot_turn_on_its_own_code(tmp_path, tiny_path, capsys):
    """A copied artifact whose manifest says "trust_remote_code": true, with an auto_map to a module of its own,
    ran that module on `rlhf reward score` and `rlhf eval` (and in a reward_model judge). Now only the command line
    (--trust-remote-code) or the user's own config turns it on; without it, a clear refusal naming the flag."""
    from uuid import uuid4

    run = tmp_path / "copied"
    trusting = {"model": {"trust_remote_code": True}}
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "Tell me about the river.", "response": "The river is calm."}) + "\n")
    human = tmp_path / "human.jsonl"
    human.write_text(json.dumps({"prompt": "Tell me about the river.", "chosen": "Calm.", "rejected": "Dull."}) + "\n")
    commands = {
        "reward score": lambda art: ["reward", "score", "--model", str(art), "--input", str(rows)],
        "eval": lambda art: ["eval", f"theirs={art}", "mine=tiny", "--prompts", "synthetic:prompts", "--max-prompts",
                             "2", "--max-new-tokens", "2", "-o", str(tmp_path / "eval")],
        "reward_model judge": lambda art: ["feedback", "agree", "--human", str(human), "--judge", str(write_yaml(
            tmp_path / "judge.yaml", {"type": "reward_model", "model": str(art), "cache": "none"})),
            "-o", str(tmp_path / "agree.json")],
    }
    for what, argv in commands.items():
        module = f"shipped_{uuid4().hex[:8]}"  # a fresh module each time: Python imports a module only once
        canary = tmp_path / f"{module}.ran"
        kind = "policy" if what == "eval" else "reward_model"
        art = _artifact(run, tiny_path, name=module, kind=kind, **trusting)
        _ship_code(art / "model", canary, module)
        assert main(argv(art)) == 2, what
        err = capsys.readouterr().err
        assert "--trust-remote-code" in err and "auto_map" in err and "never turns it on" in err, (what, err)
        assert not canary.exists(), f"{what} ran the artifact's code"

    # the user's own word, on the command line, does turn it on
    module = f"shipped_{uuid4().hex[:8]}"
    canary = tmp_path / f"{module}.ran"
    art = _artifact(run, tiny_path, name=module, kind="reward_model")
    _ship_code(art / "model", canary, module)
    assert main(["reward", "score", "--model", str(art), "--input", str(rows), "--trust-remote-code"]) == 0
    assert canary.exists()


def test_a_stage_inherits_trust_from_the_config_that_trained_it_not_from_its_manifest(tmp_path, tiny_path, capsys):
    """In one pipeline config, a stage trained from a `trust_remote_code: true` base is read by later stages with
    that trust (the config says so). The same artifact read through a config whose base is not trusted is refused,
    whatever its manifest says."""
    from uuid import uuid4

    from tests.conftest import tiny_sft_block

    module = f"shipped_{uuid4().hex[:8]}"
    base = tmp_path / "custom-base"
    shutil.copytree(tiny_path, base)
    _ship_code(base, tmp_path / f"{module}.ran", module)
    run = tmp_path / "run"
    stages = [tiny_sft_block(model="base", optim={"max_steps": 1, "logging_steps": 1}),
              {"stage": "evaluate", "policies": {"sft": "stage:sft", "base": "base"}, "prompts": "synthetic:prompts",
               "eval_fraction": 0, "max_prompts": 2, "sampling": {"max_new_tokens": 2}}]
    trusted = write_yaml(tmp_path / "trusted.yaml", {"run_dir": str(run), "stages": stages, "models": {
        "base": {"ref": str(base), "trust_remote_code": True}}})
    assert main(["run", str(trusted)]) == 0, capsys.readouterr().err
    assert (tmp_path / f"{module}.ran").exists() and (run / "sft" / "model" / f"{module}.py").exists()
    manifest = json.loads((run / "sft" / "manifest.json").read_text())
    assert manifest["model"]["trust_remote_code"] is True  # recorded, for the record only

    untrusted = write_yaml(tmp_path / "untrusted.yaml", {"run_dir": str(run), "stages": stages,
                                                         "models": {"base": str(base)}})
    assert main(["run", str(untrusted), "--stage", "evaluate"]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'sft' / 'model'}: this model needs Python code it ships" in err and "trust_remote_code: true" in err
