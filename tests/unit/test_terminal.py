"""What the terminal shows: trainer logs as readable lines, no DeepSpeed accelerator notice outside a launch."""

import os
import subprocess
import sys

from pipeline.tracking import log_line
from tests.conftest import ROOT


def test_a_trainer_log_is_one_readable_line():
    logs = {"loss": 6.2904, "grad_norm": 2.0912, "learning_rate": 0.0011765, "mean_token_accuracy": 0.02825,
            "num_tokens": 10960.0, "epoch": 0.0735, "total_flos": 1.0e12}
    assert log_line("sft", logs, 5, 68) == ("[sft] step 5/68 epoch 0.07: loss 6.29 · grad_norm 2.09 · lr 0.00118 · "
                                            "token_acc 0.0283 · num_tokens 10,960")
    assert log_line("dpo", {"learning_rate": 4.9e-5, "rewards/margins": 0.0}, 1, 2) == \
        "[dpo] step 1/2: lr 4.90e-05 · rewards/margins 0"
    end = {"train_runtime": 16.24, "train_samples_per_second": 33.41, "train_loss": 2.62}
    assert log_line("sft", end, 68, 68) == ("[sft] step 68/68: train_runtime 16.2 s · train_samples_per_second 33.4 · "
                                            "train_loss 2.62")


def _accelerator_notice(world_size: str | None) -> bool:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "DS_ACCELERATOR", "RLHF_VERBOSE")}
    if world_size:
        env["WORLD_SIZE"] = world_size
    code = ("from pipeline.tracking import quiet_libraries; quiet_libraries()\n"
            "from deepspeed.accelerator import get_accelerator; get_accelerator()")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return "Setting accelerator to CPU" in res.stdout + res.stderr


def test_deepspeed_accelerator_notice_only_under_a_launch():
    """accelerate imports DeepSpeed in every run; its 'Setting accelerator to CPU' concerns only a DeepSpeed launch."""
    assert not _accelerator_notice(None)
    assert _accelerator_notice("2")  # the check can fail: under a launcher the notice stays
