"""A data file with no rows is an error (`FILE: no rows`, exit 1) everywhere a file is read: data validate,
data import and every stage that reads preference, SFT or prompt files."""

import pytest

from pipeline.cli import main
from tests.conftest import ROOT, tiny_sft_block, write_yaml

EMPTY = {"empty.jsonl": "", "blank-lines.jsonl": "\n  \n\n", "empty-array.json": "[]", "header-only.csv": "prompt,chosen,rejected\n"}


@pytest.fixture(params=sorted(EMPTY))
def empty_file(request, tmp_path):
    path = tmp_path / request.param
    path.write_text(EMPTY[request.param])
    return path


def test_data_commands_refuse_a_file_without_rows(empty_file, tmp_path, capsys):
    assert main(["data", "validate", str(empty_file)]) == 1
    assert f"{empty_file}: no rows" in capsys.readouterr().err
    out = tmp_path / "out.jsonl"
    assert main(["data", "import", str(empty_file), "-o", str(out)]) == 1
    assert f"{empty_file}: no rows" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("stage", ["sft", "preferences", "ppo", "grpo", "ai_preferences"])
def test_every_stage_refuses_a_file_without_rows(stage, tmp_path, capsys):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    block = {
        "sft": tiny_sft_block(data={"train": str(path)}),
        "preferences": {"stage": "preferences", "data": {"path": str(path)}},
        "ppo": {"stage": "ppo", "policy": "tiny", "reward": {"rule": "feedback.synthetic:rule_score"},
                "prompts": str(path)},
        "grpo": {"stage": "grpo", "policy": "tiny", "reward": {"rule": "feedback.synthetic:rule_score"}, "prompts": str(path),
                 "optim": {"batch_size": 4}},
        "ai_preferences": {"stage": "ai_preferences", "policy": "tiny", "prompts": str(path),
                           "judge": str(ROOT / "configs" / "judges" / "rule.yaml")},
    }[stage]
    cfg = write_yaml(tmp_path / "p.yaml", {"run_dir": str(tmp_path / "run"), "stages": [block]})
    assert main(["run", str(cfg)]) == 1
    assert f"{path}: no rows" in capsys.readouterr().err
    assert not (tmp_path / "run" / block.get("name", stage)).exists()
