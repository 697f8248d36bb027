"""Config loading: every shipped YAML loads; bad configs fail naming the file and key path."""


import pytest

from pipeline.cli import main
from pipeline.blocks import load_yaml_text
from pipeline.config import apply_override, load_pipeline
from rlhf.errors import UsageError
from tests.conftest import ROOT, tiny_sft_block, write_yaml

# pipeline configs; configs/judges/ has its own test
CONFIGS = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "configs" / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_loads(path):
    cfg = load_pipeline(path)
    assert cfg.stages and all(s.name for s in cfg.stages)
    first = path.read_text().splitlines()[0]
    assert " run " in first and path.name in first, "each YAML begins with the command that runs it"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_yaml_begins_with_the_command_that_uses_it(path):
    head = "".join(path.read_text().splitlines(keepends=True)[:3])
    assert head.startswith("# ") and ("rlhf " in head or "pipeline run" in head), path


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_every_zero_config_loads_and_fills_from_the_stage(path):
    from pipeline.blocks import OptimConfig
    from pipeline.deepspeed import load_zero_config

    cfg = load_zero_config(path, OptimConfig(batch_size=4, grad_accum=2, max_grad_norm=0.5), "bf16", "stages.sft")
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_clipping"] == 0.5
    assert cfg["zero_optimization"]["stage"] in (1, 2, 3)


def test_scientific_notation_is_a_number():
    assert load_yaml_text("lr: 2e-5\nb: 1E3\nc: -3.5e+2\nd: '2e-5'", "x") == {"lr": 2e-5, "b": 1000.0, "c": -350.0,
                                                                             "d": "2e-5"}


def _cfg(tmp_path, **over):
    return {"run_dir": str(tmp_path / "run"), "models": {"base": "tiny"}, "stages": [tiny_sft_block(**over)]}


def _error(tmp_path, data, overrides=None) -> str:
    path = write_yaml(tmp_path / "x.yaml", data)
    with pytest.raises(UsageError) as exc:
        load_pipeline(path, overrides)
    return str(exc.value)


def test_wrong_type_names_file_and_key_path(tmp_path):
    data = _cfg(tmp_path)
    data["stages"][0]["optim"]["lr"] = "fast"
    msg = _error(tmp_path, data)
    assert msg == f"{tmp_path / 'x.yaml'}: stages.sft.optim.lr: expected a number, got 'fast'"


def test_unknown_key_and_bad_choice(tmp_path):
    data = _cfg(tmp_path, tuning="half")
    data["stages"][0]["optim"]["learning_rate"] = 1e-3
    data["extra_top"] = 1
    msg = _error(tmp_path, data)
    assert "stages.sft.optim.learning_rate: unknown key; did you mean 'lr'?" in msg
    assert "stages.sft.tuning: expected one of 'full', 'lora', 'freeze' or 'prompt_tuning', got 'half'" in msg
    assert "extra_top: unknown key" in msg


def test_errors_name_the_stage_and_the_close_key(tmp_path):
    """A stage by its name (as --set writes it), an unknown key with the key it is close to, at any depth."""
    data = _cfg(tmp_path)
    data["stages"].append({"stage": "sft", "name": "second", "model": "base", "data": {"train": "synthetic:sft",
                           "evl": 0.1}, "tunning": "lora", "optim": {"max_step": 3}})
    data["models"]["base"] = {"reff": "tiny"}
    msg = _error(tmp_path, data).splitlines()
    src = tmp_path / "x.yaml"
    for line in (f"{src}: stages.second.optim.max_step: unknown key; did you mean 'max_steps'?",
                 f"{src}: stages.second.tunning: unknown key; did you mean 'tuning'?",
                 f"{src}: stages.second.data.evl: unknown key; did you mean 'eval'?",
                 f"{src}: models.base.reff: unknown key; did you mean 'ref'?"):
        assert line in msg, (line, msg)
    data = _cfg(tmp_path)
    data["stages"].append(dict(data["stages"][0], optim={"zzz": 1}))  # two stages named sft: by index
    assert f"{src}: stages[1].optim.zzz: unknown key" in _error(tmp_path, data).splitlines()


def test_unknown_stage_and_forward_reference(tmp_path):
    data = _cfg(tmp_path)
    data["stages"].append({"stage": "sftt", "model": "base"})
    assert "stages.sftt: unknown stage 'sftt'" in _error(tmp_path, data)
    data = _cfg(tmp_path, model="stage:later")
    assert "stages.sft.model: 'stage:later' names no earlier stage" in _error(tmp_path, data)


def test_names_with_a_trailing_newline_are_refused(tmp_path):
    """`$` also matches before a final newline: "sft\\n" passed the name check and named RUN_DIR/"sft\\n"."""
    assert "is not a safe directory name" in _error(tmp_path, _cfg(tmp_path, name="sft\n"))
    data = _cfg(tmp_path)
    data["stages"].append({"stage": "evaluate", "policies": {"sft": "stage:sft", "base\n": "tiny"},
                           "prompts": "synthetic:prompts"})
    assert "policies: names are letters, digits" in _error(tmp_path, data)


def test_set_overrides(tmp_path):
    path = write_yaml(tmp_path / "x.yaml", _cfg(tmp_path))
    cfg = load_pipeline(path, ["stages.sft.optim.lr=1e-4", "stages.0.tuning=lora", "seed=7", "stages.sft.lora.r=4"])
    st = cfg.stages[0]
    assert st.optim.lr == 1e-4 and isinstance(st.optim.lr, float)
    assert (st.tuning, cfg.seed, st.lora.r) == ("lora", 7, 4)
    msg = _error(tmp_path, _cfg(tmp_path), ["stages.sft.optim.lr=fast"])
    assert "(with --set overrides): stages.sft.optim.lr: expected a number, got 'fast'" in msg
    with pytest.raises(UsageError, match="no list item named 'nope'"):
        apply_override({"stages": [{"stage": "sft"}]}, "stages.nope.x=1")
    with pytest.raises(UsageError, match="expected KEY.PATH=VALUE"):
        apply_override({}, "seed")


def test_cli_bad_config_exits_2_with_message(tmp_path, capsys):
    data = _cfg(tmp_path)
    data["stages"][0]["optim"]["lr"] = "fast"
    path = write_yaml(tmp_path / "x.yaml", data)
    assert main(["run", str(path)]) == 2
    assert "stages.sft.optim.lr: expected a number, got 'fast'" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2


def _every_command(parser, prefix=()):
    """Every parser of the CLI, walked through its subcommands: (argv prefix, parser)."""
    import argparse

    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _every_command(sub, (*prefix, name))


def test_cli_help_describes_every_command(capsys):
    from pipeline.cli import build_parser

    commands = list(_every_command(build_parser()))
    assert len(commands) >= 17  # rlhf; run; data {validate, import, stats}; reward score; feedback {label, agree};
    # serve {judge, policy}; models {list, prepare}: each group counts too
    for prefix, _ in commands:
        with pytest.raises(SystemExit) as exc:
            main([*prefix, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert "usage: rlhf" in out and len(out.splitlines()) > 3, prefix


def test_settings_that_do_nothing_are_refused(tmp_path, capsys):
    """The audit of every stage field: keys no code reads are gone (PPO's optim block takes only what PPO uses),
    and settings that have no effect in the config they sit in are errors, not silently ignored."""
    from pipeline.cli import main
    from tests.conftest import tiny_sft_block, write_yaml

    ppo = {"stage": "ppo", "policy": "tiny", "reward": {"rule": "feedback.synthetic:rule_score"},
           "prompts": "synthetic:prompts"}
    dpo = {"stage": "dpo", "policy": "tiny", "preferences": "stage:preferences"}
    prefs = {"stage": "preferences", "data": {"path": "synthetic:preferences"}}
    cases = [
        ([{**ppo, "optim": {"epochs": 2}}], "stages.ppo.optim.epochs: unknown key"),
        ([{**ppo, "kl": {"target": 3.0}}], "stages.ppo.kl: target has no effect without adaptive: true"),
        ([{**ppo, "kl": {"on_ceiling": "warn"}}], "on_ceiling has no effect without a ceiling"),
        ([prefs, {**dpo, "eval_rule": "feedback.synthetic:rule_score"}], "eval_rule and eval_prompts work together"),
        ([prefs, {**dpo, "eval_max_new_tokens": 8}], "eval_max_new_tokens has no effect without eval_rule"),
        ([tiny_sft_block(freeze_layers=2)], "freeze_layers has no effect without tuning: freeze"),
        ([tiny_sft_block(data={"train": "synthetic:sft", "eval": "synthetic:sft", "eval_fraction": 0.3})],
         "eval_fraction has no effect with an eval file"),
        ([prefs, {"stage": "reward", "model": "tiny", "preferences": "stage:preferences", "tuning": "lora",
                  "lora": {"merge": False}}], "lora.merge: false has no effect here"),
        ([{"stage": "grpo", "policy": "tiny", "prompts": "synthetic:prompts", "reward": {"rule": "feedback.synthetic:rule_score"},
           "eval_rule": "feedback.synthetic:rule_score", "eval_fraction": 0}], "eval_rule has no effect with eval_fraction: 0"),
        ([{"stage": "ai_preferences", "policy": "tiny", "prompts": "synthetic:prompts", "judge": "j.yaml",
           "candidates": {"temperature": 0, "top_p": 0.9}}], "candidates.temperature: 0 is greedy decoding"),
    ]
    for stages, message in cases:
        cfg = write_yaml(tmp_path / "p.yaml", {"run_dir": str(tmp_path / "run"), "stages": stages})
        assert main(["run", str(cfg), "--check"]) == 2, message
        assert message in capsys.readouterr().err, message


def _alias_bomb(levels: int, width: int = 9) -> str:
    """A YAML document of a few lines standing for width**levels strings (each level lists the one before 9 times)."""
    lines = ["l0: &l0 [" + ", ".join(["x"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_is_refused_and_error_messages_stay_small(tmp_path):
    """A few lines of aliases that expand tenfold per level: the config is refused when read, and an error message
    about a huge value serialises only what it shows (it used to serialise the whole value, then cut it)."""
    import tracemalloc

    from pipeline.blocks import _describe

    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb(6) + "run_dir: *l5\nstages: [{stage: sft}]\n")
    with pytest.raises(UsageError, match="YAML aliases"):
        load_pipeline(path)
    with pytest.raises(UsageError, match="contains it"):
        load_yaml_text("a: &a [1, *a]", "x")
    assert load_yaml_text("base: &b {lr: 1e-3}\nuse: *b", "x") == {"base": {"lr": 1e-3}, "use": {"lr": 1e-3}}

    leaf = ["x"] * 9
    value = leaf
    for _ in range(5):  # 9**6 strings once expanded: about 3.7 MB as JSON
        value = [value] * 9
    tracemalloc.start()
    shown = _describe(value)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert shown.startswith('[[[[[["x", "x"') and shown.endswith("...") and len(shown) <= 83
    assert peak < 100_000, f"describing the value allocated {peak} bytes"


def test_an_adapter_kept_on_an_adapter_is_refused_before_training(tmp_path, capsys, tiny_path):
    """A stage keeping a LoRA adapter (lora.merge: false) trained on another adapter would save an adapter whose
    base (the first adapter merged, in the stage's temporary inputs) is gone once the stage ends: the artifact
    could not be loaded. Refused by `--check` for an earlier stage, and before any training for an adapter
    directory given as the model."""
    from peft import LoraConfig, get_peft_model

    from pipeline.models import load_causal_lm, load_tokenizer

    kept = {"r": 4, "alpha": 8, "merge": False}
    dpo = {"stage": "dpo", "policy": "stage:sft", "preferences": "stage:preferences", "max_length": 64,
           "precision": "fp32", "tuning": "lora", "lora": kept, "optim": {"max_steps": 1}}
    prefs = {"stage": "preferences", "data": {"path": "synthetic:preferences"}}
    stages = [tiny_sft_block(tuning="lora", lora=kept), prefs, dpo]
    cfg = write_yaml(tmp_path / "p.yaml", {"run_dir": str(tmp_path / "run"), "stages": stages})
    assert main(["run", str(cfg), "--check"]) == 2
    err = capsys.readouterr().err
    assert "stages.dpo.lora.merge: false keeps a new adapter on 'stage:sft', itself a LoRA adapter" in err, err
    # either side merged is fine
    for merged in ([tiny_sft_block(tuning="lora", lora={**kept, "merge": True}), prefs, dpo],
                   [tiny_sft_block(tuning="lora", lora=kept), prefs, {**dpo, "lora": {**kept, "merge": True}}]):
        cfg = write_yaml(tmp_path / "p.yaml", {"run_dir": str(tmp_path / "run"), "stages": merged})
        assert main(["run", str(cfg), "--check"]) == 0
    capsys.readouterr()
    # an adapter directory (an earlier run's artifact) as the model: refused when the stage starts, before training
    adapter = tmp_path / "adapter"
    model = get_peft_model(load_causal_lm(tiny_path), LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM"))
    model.save_pretrained(adapter)
    load_tokenizer(tiny_path).save_pretrained(adapter)
    sft = tiny_sft_block(model=str(adapter), tuning="lora", lora=kept, optim={"max_steps": 1})
    cfg = write_yaml(tmp_path / "q.yaml", {"run_dir": str(tmp_path / "run2"), "stages": [sft]})
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"sft.lora.merge: false keeps a new adapter on '{adapter}', itself a LoRA adapter" in err, err
    assert not (tmp_path / "run2" / ".sft.partial" / "checkpoints").exists()


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path, capsys):
    """A second `optim:` pasted into a stage (configs/my-data.yaml's dpo stage already has one): PyYAML keeps the
    last mapping, so lr 2e-4 and the batch size were dropped and `--check` said "valid"."""
    text = (ROOT / "configs" / "my-data.yaml").read_text()
    assert text.count("    beta: 0.1\n") == 1
    path = tmp_path / "dup.yaml"
    path.write_text(text.replace("    beta: 0.1\n", "    beta: 0.1\n    optim: {max_steps: 20}\n"))
    line = text.splitlines().index("    beta: 0.1") + 2  # the pasted line, 1-based
    assert main(["run", str(path), "--check"]) == 2
    err = capsys.readouterr().err
    assert f"found the key 'optim' twice (first on line {line})" in err and f"line {line + 2}" in err, err
    # a YAML merge (`<<: *base`) overrides on purpose and stays allowed
    assert load_yaml_text("base: &b {lr: 1, epochs: 2}\noptim:\n  <<: *b\n  lr: 3\n", "x")["optim"] == {"lr": 3,
                                                                                                      "epochs": 2}


def test_a_set_override_naming_a_stage_close_to_one_suggests_it(tmp_path):
    """`--set stages.dpp.beta=0.2` on configs/my-data.yaml: the stage-name typo is named with the close stage and
    the stages there are, as an unknown key is."""
    data = load_yaml_text((ROOT / "configs" / "my-data.yaml").read_text(), "my-data.yaml")
    with pytest.raises(UsageError, match=r"--set stages.dpp: no list item named 'dpp'; did you mean 'dpo'\? "
                                         r"\(the items: preferences, reward, dpo, evaluate\)"):
        apply_override(data, "stages.dpp.beta=0.2")
