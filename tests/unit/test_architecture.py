"""The structure the code promises (docs/design.md): every module imports on its own in any order, the
config tree's leaves import no stage, `feedback` imports no torch, and a stage is added through the registry
alone: its module and one entry."""

import json
import os
import pkgutil
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from pipeline.cli import main
from tests.conftest import ROOT, write_yaml

PACKAGES = ("pipeline", "feedback", "reward")


def _modules() -> list[str]:
    import importlib

    names = []
    for pkg in PACKAGES:
        names.append(pkg)
        mod = importlib.import_module(pkg)
        names += [m.name for m in pkgutil.walk_packages(mod.__path__, prefix=f"{pkg}.")]
    return names


def _fresh(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_every_module_imports_alone_in_a_fresh_interpreter_in_random_order():
    """No import cycle, no module that works only after another was imported first."""
    names = _modules()
    assert len(names) > 40
    seed = random.randrange(1 << 30)
    random.Random(seed).shuffle(names)
    with ThreadPoolExecutor(2) as pool:  # one interpreter per module; two at a time on two cores
        results = list(pool.map(lambda n: (n, _fresh(f"import {n}")), names))
    failed = {n: r.stderr.strip().splitlines()[-1:] for n, r in results if r.returncode != 0}
    assert not failed, f"(shuffle seed {seed}) {failed}"


def test_the_config_tree_imports_no_stage_and_feedback_no_torch():
    code = ("import sys, json, importlib\n"
            "out = {}\n"
            "for name in ('pipeline.blocks', 'pipeline.config', 'feedback', 'feedback.readers', 'feedback.validate',"
            " 'pipeline.judging'):\n"
            "    importlib.import_module(name)\n"
            "    out[name] = sorted(m for m in sys.modules if m.startswith('pipeline.stages') or m == 'torch')\n"
            "print(json.dumps(out))")
    res = _fresh(code)
    assert res.returncode == 0, res.stderr
    loaded = json.loads(res.stdout.splitlines()[-1])
    assert loaded == {name: [] for name in loaded}, loaded


TOY_STAGE = '''
"""A toy stage: writes a fixed preference pair set as a preferences artifact."""
from typing import Literal

from pipeline.blocks import StageBlock


class Config(StageBlock):
    stage: Literal["toy"]
    prompt: str = "Tell me about the river."


def run(cfg, ctx):
    from feedback.schema import PreferencePair, write_pairs

    pairs = [PreferencePair(cfg.prompt, "The river is calm.", "The river is dull.")]
    write_pairs(ctx.work_dir / "preferences.jsonl", pairs)
    write_pairs(ctx.work_dir / "eval.jsonl", pairs)
    return {"kind": "preferences", "outputs": {"train": "preferences.jsonl", "eval": "eval.jsonl"},
            "counts": {"pairs": 1}, "summary": "1 toy pair"}
'''


def test_a_stage_is_added_through_the_registry_alone(tmp_path, monkeypatch, capsys):
    from pipeline import artifacts
    from pipeline.stages import REGISTRY

    (tmp_path / "toy_stage.py").write_text(TOY_STAGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import toy_stage

    monkeypatch.setitem(REGISTRY, "toy", toy_stage)  # the one registry line
    run = tmp_path / "run"
    cfg = write_yaml(tmp_path / "p.yaml", {"run_dir": str(run), "stages": [
        {"stage": "toy", "prompt": "Describe the sea."},
        {"stage": "reward", "model": "tiny", "preferences": "stage:toy", "max_length": 64, "precision": "fp32",
         "optim": {"max_steps": 1, "batch_size": 1, "logging_steps": 1}}]})
    assert main(["run", str(cfg)]) == 0
    toy = artifacts.load_artifact(run / "toy", "preferences")
    assert toy.manifest["counts"] == {"pairs": 1}
    assert artifacts.load_artifact(run / "reward", "reward_model").manifest["counts"]["trained_on"] == 1
    assert main(["run", str(cfg), "--stage", "toy"]) == 0 and "[toy] up to date" in capsys.readouterr().out
    # a typo in the toy block is reported like any other stage's
    bad = write_yaml(tmp_path / "bad.yaml", {"run_dir": str(run), "stages": [{"stage": "toy", "promt": "x"}]})
    assert main(["run", str(bad), "--check"]) == 2 and "stages.toy.promt: unknown key; did you mean 'prompt'?" in capsys.readouterr().err


TOY_TRAINING_STAGE = '''
"""A toy training stage: language-model fine-tuning on one repeated text, on TRL's SFTTrainer, through the shared
stage steps (pipeline.stages.common). What it declares is all the planner needs."""
from typing import Literal

from pydantic import Field

from pipeline.blocks import OptimConfig, TrainingBlock


class Config(TrainingBlock):
    stage: Literal["toy_lm"]
    model: str
    text: str = "The river is calm and the library is quiet."
    max_length: int = Field(32, ge=8)
    optim: OptimConfig = Field(default_factory=OptimConfig)

    def inputs(self):
        return {"model": (self.model, "model")}


def run(cfg, ctx):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from pipeline.stages.common import fit, load_policy, save_policy, training_args

    _, info, tok, model = load_policy(ctx, cfg.model, role="model", merged=False)
    args = training_args(SFTConfig, cfg, ctx, "fp32", max_length=cfg.max_length, dataset_num_proc=None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list([{"text": cfg.text}] * 8),
                         processing_class=tok)
    fit(trainer, ctx, cfg)
    save_policy(trainer, trainer.model, tok, ctx.work_dir / "model", merge=True)
    return {"kind": "policy", "outputs": {"model": "model"}, "summary": f"{trainer.state.global_step} steps"}
'''


def test_a_training_stage_is_added_through_the_registry_alone_and_planned(tmp_path, monkeypatch, capsys):
    """A new training stage needs its module and one registry line: it trains through the shared steps, and
    `rlhf plan` plans it from what its config declares (TrainingBlock.memory), with no change to the planner."""
    from pipeline import artifacts
    from pipeline.stages import REGISTRY

    (tmp_path / "toy_lm_stage.py").write_text(TOY_TRAINING_STAGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import toy_lm_stage

    monkeypatch.setitem(REGISTRY, "toy_lm", toy_lm_stage)  # the one registry line
    run = tmp_path / "run"
    cfg = write_yaml(tmp_path / "p.yaml", {"run_dir": str(run), "stages": [
        {"stage": "toy_lm", "model": "tiny", "precision": "fp32", "optim": {"max_steps": 2, "per_device_batch_size": 4}}]})
    assert main(["run", str(cfg)]) == 0
    assert artifacts.load_artifact(run / "toy_lm", "policy").output("model").is_dir()
    capsys.readouterr()
    assert main(["plan", str(cfg), "--gpus", "1", "--gpu-memory", "24GB", "--cpu"]) == 0
    out = capsys.readouterr().out
    assert "toy_lm (toy_lm, fp32): 0.00B parameters, 287,104 trained" in out and "fastest that fits" in out, out
