"""The generated config reference (pipeline/reference.py -> docs/config-reference.md): up to date with the typed
configs, every field described, and the walk reaching nested blocks of the pipeline config and every stage."""

from typing import Literal

from pydantic import Field

from pipeline import reference
from pipeline.blocks import Strict
from pipeline.config import PipelineConfig
from pipeline.stages import REGISTRY
from tests.conftest import ROOT


def test_the_committed_reference_is_what_the_configs_say():
    page = ROOT / "docs" / "config-reference.md"
    assert page.read_text(encoding="utf-8") == reference.render(), (
        "docs/config-reference.md is stale: run `python -m pipeline.reference` (make docs) and commit it")


def test_every_field_of_every_config_has_a_description():
    missing = reference.missing_descriptions(PipelineConfig)
    for method, module in REGISTRY.items():
        missing += [f"{method}: {path}" for path in reference.missing_descriptions(module.Config)]
    assert not missing, f"add description= to these fields: {missing}"


def test_the_walk_reaches_nested_blocks_and_every_stage():
    page = reference.render()
    for method in REGISTRY:
        assert f"`{method}`" in page.split("## The pipeline config")[1]
    ppo = dict((path, row) for path, *row in reference.rows(REGISTRY["ppo"].Config))
    assert ppo["ppo.forward_batch_size"] == ["int | null (>= 1)", "null", ppo["ppo.forward_batch_size"][2]]
    assert ppo["ppo.forward_batch_size"][2].startswith("the rollout's no-grad forwards")
    assert ppo["kl.coef"][:2] == ["float (>= 0)", "0.05"]
    assert ppo["reward.model"][1] == "null"  # OnlineRLBlock's reward block, inherited
    top = dict((path, row) for path, *row in reference.rows(PipelineConfig))
    assert top["models.NAME.ref"][:2] == ["str", "required"]
    assert top["tracking.wandb_mode"][:2] == ['"offline" | "online" | "disabled"', "offline"]
    sft = dict((path, row) for path, *row in reference.rows(REGISTRY["sft"].Config))
    assert sft["optim.lr"][:2] == ["float (> 0)", "2e-05"]
    assert sft["optim"][1] == "see below"
    dpo = dict((path, row) for path, *row in reference.rows(REGISTRY["dpo"].Config))
    assert dpo["optim.lr"][1] == "5e-07"  # a method's own default, not the shared block's


def test_a_field_without_a_description_is_found_also_inside_a_nested_block():
    class Inner(Strict):
        described: int = Field(1, description="has one")
        bare: int = 2

    class Outer(Strict):
        mode: Literal["a", "b"] = "a"
        inner: Inner = Field(default_factory=Inner, description="a block")

    assert reference.missing_descriptions(Outer) == ["mode", "inner.bare"]
    rows = {path: row for path, *row in reference.rows(Outer)}
    assert rows["mode"] == ['"a" | "b"', "a", ""]
    assert rows["inner"] == ["block", "see below", "a block"]


def test_check_mode_fails_on_a_stale_page_and_passes_on_a_fresh_one(tmp_path, capsys):
    page = tmp_path / "config-reference.md"
    page.write_text(reference.render().replace("seed of every stage", "an old description"), encoding="utf-8")
    assert reference.main(["--check", "-o", str(page)]) == 1
    assert "stale" in capsys.readouterr().err
    assert reference.main(["-o", str(page)]) == 0
    assert reference.main(["--check", "-o", str(page)]) == 0
    assert page.read_text(encoding="utf-8") == reference.render()
