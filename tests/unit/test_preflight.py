"""Checks that need the number of processes or the installed TRL run before the first stage starts (and in
`rlhf run --check --processes N`), so a launch that cannot work fails at once, not after the stages before it
have trained."""

from pipeline.cli import main
from tests.conftest import ROOT, write_yaml

SFT = {"stage": "sft", "model": "tiny", "data": {"train": "synthetic:sft"}, "optim": {"max_steps": 1}}
PPO = {"stage": "ppo", "policy": "stage:sft", "reward": {"rule": "feedback.synthetic:rule_score"},
       "prompts": "synthetic:prompts", "rollout": {"prompts_per_step": 8},
       "ppo": {"minibatch_size": 8, "micro_batch_size": 8}}
ZERO2 = str(ROOT / "configs" / "deepspeed" / "zero2.json")


def _cfg(tmp_path, *stages):
    return str(write_yaml(tmp_path / "p.yaml", {"run_dir": str(tmp_path / "run"), "stages": [SFT, *stages]}))


def test_a_bad_later_stage_stops_the_run_before_the_first_stage_trains(tmp_path, capsys):
    cfg = _cfg(tmp_path, {"stage": "preferences", "data": {"path": "synthetic:preferences"}},
               {"stage": "dpo", "policy": "stage:sft", "preferences": "stage:preferences", "loss_type": "sigmoidd"})
    assert main(["run", cfg]) == 2
    err = capsys.readouterr().err
    assert "stages.dpo.loss_type: 'sigmoidd' is not a DPO loss of the installed TRL" in err and "'sigmoid'" in err
    assert not (tmp_path / "run" / "sft").exists() and not (tmp_path / "run" / ".sft.partial").exists()
    assert main(["run", cfg, "--check"]) == 2
    assert "sigmoidd" in capsys.readouterr().err


def test_check_takes_the_number_of_processes(tmp_path, capsys):
    """PPO's micro-batch arithmetic on several processes: 8 prompts, minibatch 8, micro-batches of 8 fit one process
    but not two (4 each), under DeepSpeed or not. As a user following the README would launch it, the refusal now
    comes first."""
    cfg = _cfg(tmp_path, PPO)
    assert main(["run", cfg, "--check", "--deepspeed", ZERO2]) == 0
    assert "checked for 1 process" in capsys.readouterr().out
    assert main(["run", cfg, "--check", "--deepspeed", ZERO2, "--processes", "2"]) == 2
    assert "by ppo.micro_batch_size (8)" in capsys.readouterr().err
    # two processes without DeepSpeed (data parallel): the same shares
    assert main(["run", cfg, "--check", "--processes", "2"]) == 2
    assert "by ppo.micro_batch_size (8)" in capsys.readouterr().err
    assert main(["run", cfg, "--check", "--processes", "2", "--set", "stages.ppo.ppo.micro_batch_size=4"]) == 0
    # ZeRO-3 shards in CPU memory need ZeRO-3: said before the first stage, not after SFT has trained
    assert main(["run", cfg, "--check", "--deepspeed", ZERO2, "--set", "stages.ppo.frozen.offload=true"]) == 2
    assert "stages.ppo.frozen.offload: needs a ZeRO-3 config" in capsys.readouterr().err
    zero3 = ZERO2.replace("zero2", "zero3")
    assert main(["run", cfg, "--check", "--deepspeed", zero3, "--set", "stages.ppo.frozen.offload=true"]) == 0
    for bad in (["--processes", "0", "--check"], ["--processes", "2"]):
        assert main(["run", cfg, *bad]) == 2
        assert "--processes N (N >= 1) goes with --check" in capsys.readouterr().err


def test_group_methods_need_whole_groups_over_all_processes(tmp_path, capsys):
    """TRL's check is on batch_size x grad_accum x processes: 2 x 1 x 2 = 4 holds whole groups of 4 on two
    processes, although 2 x 1 alone does not (a config TRL accepts on 2 processes used to be refused)."""
    grpo = {"stage": "grpo", "policy": "stage:sft", "prompts": "synthetic:prompts",
            "reward": {"rule": "feedback.synthetic:rule_score"}, "num_generations": 4,
            "optim": {"per_device_batch_size": 2, "grad_accum": 1}}
    cfg = _cfg(tmp_path, grpo)
    assert main(["run", cfg, "--check", "--processes", "2"]) == 0
    assert main(["run", cfg, "--check"]) == 2
    assert "2 x 1 x 1 = 2) must be a multiple of num_generations (4)" in capsys.readouterr().err


def test_grpo_loss_choices_are_checked(tmp_path, capsys):
    base = {"stage": "grpo", "policy": "stage:sft", "prompts": "synthetic:prompts",
            "reward": {"rule": "feedback.synthetic:rule_score"}}
    for extra, message in (({"loss_type": "grpoo"}, "'grpoo' is not a GRPO loss of the installed TRL"),
                           ({"loss_type": "luspo"}, "set importance_sampling_level: sequence"),
                           ({"stage": "rloo", "scale_rewards": "batch"}, "scale_rewards has no effect in RLOO")):
        assert main(["run", _cfg(tmp_path, {**base, **extra}), "--check"]) == 2
        assert message in capsys.readouterr().err
    assert main(["run", _cfg(tmp_path, {**base, "loss_type": "grpo", "importance_sampling_level": "sequence",
                                        "epsilon_high": 0.28, "scale_rewards": "none"}), "--check"]) == 0
