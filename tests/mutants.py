"""Wiring mutants: defects the test suite must catch. Each mutant is one line changed in a copy of the project (the
way a setting or a mask stops reaching the maths); the tests that should notice run on that copy, and a mutant
that survives them is reported. Not collected by pytest (it runs pytest itself, on copies).

    python tests/mutants.py              # each mutant against the tests named for it (about 10 minutes)
    python tests/mutants.py --all        # each mutant against the whole suite (hours)
    python tests/mutants.py --only kl    # the mutants whose name contains "kl"

Exit code 0 when every mutant is caught, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (name, file, the line as it is, the mutated line, the tests that must catch it)
MUTANTS = [
    ("response mask drops the EOS token", "pipeline/rl/losses.py",
     "after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0", "after_eos = is_eos.long().cumsum(1) > 0",
     ["tests/unit/test_rl_losses.py"]),
    ("ppo_step given a KL coefficient of 0", "pipeline/rl/ppo.py",
     "losses.shape_rewards(ro.scores, kl, ro.mask, kl_ctl.value,", "losses.shape_rewards(ro.scores, kl, ro.mask, 0.0,",
     ["tests/integration/test_ppo_details.py"]),
    ("DPO's beta replaced by 2.0", "pipeline/stages/dpo.py", "beta=cfg.beta,", "beta=2.0,",
     ["tests/integration/test_wiring.py"]),
    ("reward pairs with chosen and rejected swapped", "reward/pairs.py",
     'row = {"chosen_ids": c, "rejected_ids": r}', 'row = {"chosen_ids": r, "rejected_ids": c}',
     ["tests/integration/test_reward.py"]),
    ("each micro-batch's own token mean", "pipeline/rl/ppo.py",
     "hp.clip, hp.dual_clip, n_tokens)", "hp.clip, hp.dual_clip, None)",
     ["tests/integration/test_ppo_invariance.py"]),
    ("DeepSpeed's own division by accumulation steps and processes left in", "pipeline/deepspeed.py",
     "engine.backward(loss * engine.dp_world_size, scale_wrt_gas=False)", "engine.backward(loss)",
     ["tests/distributed/test_zero.py::test_one_ppo_step_is_the_same_update_on_one_and_two_processes"]),
    ("log-probs without the model's logit post-processing", "pipeline/rl/models.py",
     "    base = _base(model)\n    keep = input_ids.shape[1] - start + 1",
     "    h = response_hidden(model, input_ids, attention_mask, position_ids, start)\n"
     "    return _base(model).get_output_embeddings()(h), h\n    keep = input_ids.shape[1] - start + 1",
     ["tests/integration/test_model_families.py"]),
    ("layerdrop left on", "pipeline/rl/models.py",
     '_STOCHASTIC = ("dropout", "layerdrop", "drop_path", "drop_prob", "jitter")',
     '_STOCHASTIC = ("dropout", "drop_path", "drop_prob", "jitter")', ["tests/integration/test_model_families.py"]),
    ("GRPO's dropout rates left on", "pipeline/stages/grpo.py", "restore_rates = disable_dropout(model)",
     "restore_rates = lambda: None", ["tests/integration/test_wiring.py"]),
    ("PPO's start-up check for random layers not run", "pipeline/stages/ppo.py",
     "    models.check_deterministic()", "    pass", ["tests/integration/test_ppo_details.py"]),
    ("PPO's policy saved with its dropout rates zeroed", "pipeline/stages/ppo.py",
     "    s.models.restore_configs()", "    pass", ["tests/integration/test_ppo_details.py"]),
    ("the GRPO epsilon not passed", "pipeline/stages/grpo.py",
     'loss = {k: getattr(cfg, k) for k in ("epsilon", "epsilon_high", "mask_truncated_completions")}',
     'loss = {k: getattr(cfg, k) for k in ("epsilon_high", "mask_truncated_completions")}',
     ["tests/integration/test_wiring.py"]),
]


def _copy(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--all", action="store_true", help="run the whole suite against each mutant")
    ap.add_argument("--only", help="run the mutants whose name contains this")
    args = ap.parse_args()
    survived = []
    for name, path, before, after, tests in MUTANTS:
        if args.only and args.only not in name:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp)
            _copy(copy)
            text = (copy / path).read_text()
            if text.count(before) != 1:
                print(f"MUTANT NOT APPLIED ({path} no longer holds the line once): {name}")
                survived.append(name)
                continue
            (copy / path).write_text(text.replace(before, after))
            cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *([] if args.all else tests)]
            res = subprocess.run(cmd, cwd=copy, env={**os.environ, "PYTHONPATH": str(copy)}, capture_output=True,
                                 text=True)
            caught = res.returncode != 0
            print(f"{'caught  ' if caught else 'SURVIVED'} {name}"
                  + (f"  ({res.stdout.strip().splitlines()[-1]})" if res.stdout.strip() else ""), flush=True)
            if not caught:
                survived.append(name)
    print(f"{len(survived)} mutants survived" + (f": {survived}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
