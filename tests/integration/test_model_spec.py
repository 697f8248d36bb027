"""A model's revision and trust_remote_code reach every load (issue 20, item 13): an adapter saved with
lora.merge: false records its base's revision, so later stages load the base at it rather than at main; `rlhf eval`
takes --revision and --trust-remote-code for model references and says which prompts it evaluates.

The hub is a local Hugging Face cache holding `acme/tiny` at the tag `v1` only (no `main`), read offline: loading
the base at any other revision fails, as it would fetch another model online. The custom-code model is the tiny
model with its class in a file beside its config (`auto_map`), which transformers runs only when trusted."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT, tiny_sft_block, write_yaml


@pytest.fixture
def hub(tmp_path, tiny_path):
    """HF_HUB_CACHE with acme/tiny at refs/v1 (a copy of the tiny model), and nothing at main."""
    cache = tmp_path / "hub"
    commit = "1" * 40
    snapshot = cache / "models--acme--tiny" / "snapshots" / commit
    shutil.copytree(tiny_path, snapshot)
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "v1").write_text(commit)
    return cache


def _rlhf(tmp_path, hub, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1",
           "HF_MODULES_CACHE": str(tmp_path / "modules")}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=600)


def test_an_adapter_policy_records_its_base_revision_for_later_stages(tmp_path, hub):
    run = tmp_path / "run"
    sft = tiny_sft_block(model="base", tuning="lora", lora={"r": 4, "alpha": 8, "merge": False},
                         optim={"max_steps": 1})
    evaluate = {"stage": "evaluate", "policies": {"sft": "stage:sft", "base": "base"}, "prompts": "synthetic:prompts",
                "max_prompts": 2, "sampling": {"max_new_tokens": 4}}
    cfg = write_yaml(tmp_path / "p.yaml", {"run_dir": str(run), "models": {"base": {"ref": "acme/tiny",
                                                                                     "revision": "v1"}},
                                           "stages": [sft, evaluate]})
    res = _rlhf(tmp_path, hub, "run", str(cfg))
    assert res.returncode == 0, res.stderr[-3000:]
    adapter = json.loads((run / "sft" / "model" / "adapter_config.json").read_text())
    assert (adapter["base_model_name_or_path"], adapter["revision"]) == ("acme/tiny", "v1")
    assert (run / "evaluate" / "manifest.json").exists()  # the evaluate stage loaded the adapter's base at v1


def test_rlhf_eval_takes_revision_and_trust_remote_code_and_says_which_prompts(tmp_path, hub, tiny_path):
    custom = tmp_path / "custom"
    shutil.copytree(tiny_path, custom)
    (custom / "configuration_custom.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass CustomConfig(LlamaConfig):\n    model_type = 'tiny_custom'\n")
    (custom / "modeling_custom.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_custom import CustomConfig\n\n\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="tiny_custom", architectures=["CustomForCausalLM"],
                  auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (custom / "config.json").write_text(json.dumps(config))
    args = ["eval", "hub=acme/tiny", f"custom={custom}", "--prompts", "synthetic:prompts", "--max-prompts", "2",
            "--max-new-tokens", "4"]

    res = _rlhf(tmp_path, hub, *args, "--revision", "hub=v1", "--trust-remote-code", "-o", str(tmp_path / "a"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert ("2 policies x 2 prompts (prompts of synthetic:prompts: eval_fraction 0, none split off; the first 2 "
            "of 192)") in res.stdout
    assert "held-out" not in res.stdout

    res = _rlhf(tmp_path, hub, *args, "--trust-remote-code", "-o", str(tmp_path / "b"))
    assert res.returncode == 2 and "acme/tiny" in res.stderr  # no revision: the hub's main, which is not there
    res = _rlhf(tmp_path, hub, *args, "--revision", "hub=v1", "-o", str(tmp_path / "c"))
    assert res.returncode == 2 and "needs Python code it ships" in res.stderr
    res = _rlhf(tmp_path, hub, *args, "--revision", "nope=v1", "-o", str(tmp_path / "d"))
    assert res.returncode == 2 and "--revision nope=v1: expected NAME=VALUE with NAME one of hub, custom" in res.stderr
    res = _rlhf(tmp_path, hub, *args, "--revision", f"custom=v1", "-o", str(tmp_path / "e"))
    assert res.returncode == 2 and "revision has no effect for" in res.stderr  # a local directory pins nothing
