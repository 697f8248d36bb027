"""Run by test_zero.py under `torchrun --nproc_per_node 2`: one minibatch of two micro-batches through the
DeepSpeed strategy on a small model, ZeRO stage from argv; the second minibatch gets an infinite gradient on
rank 1 only. Writes OUT/rank-N.json per rank: was the bad update refused on every rank, weights unchanged."""

import json
import sys
from pathlib import Path

import torch

from pipeline import distributed
from rlhf.errors import InvalidInput
from pipeline.deepspeed import DeepSpeed, full_state_dict
from pipeline.rl.ppo import check_finite
from pipeline.strategy import Optim


def main(stage: int, out_dir: Path) -> None:
    distributed.init()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
          "zero_optimization": {"stage": stage}, "bf16": {"enabled": False}, "fp16": {"enabled": False}}
    opt = DeepSpeed(ds)
    (engine,) = opt.prepare({"model": model}, Optim(lr=0.1, max_grad_norm=1.0,
                                                    make=lambda p: torch.optim.AdamW(p, lr=0.1)))
    x = torch.randn(4, 4) + distributed.rank()

    def minibatch(rows, step):
        for i in rows:
            opt.backward({"model": engine(x[i : i + 1]).pow(2).sum() / len(rows)})  # its share of the mean
        return opt.step(lambda **v: check_finite(step, **v))

    start = full_state_dict(engine.module)
    minibatch([0, 1], 1)
    after_good = full_state_dict(engine.module)
    if distributed.rank() == 1:
        next(engine.module.parameters()).register_hook(lambda g: g * float("inf"))
    refused = None
    try:
        minibatch([2, 3], 2)
    except InvalidInput as exc:
        refused = str(exc)
    after_bad = full_state_dict(engine.module)
    out = {"rank": distributed.rank(), "refused": refused}
    if distributed.is_main():
        out["good_update_applied"] = any(not torch.equal(start[k], after_good[k]) for k in start)
        out["bad_update_applied"] = any(not torch.equal(after_good[k], after_bad[k]) for k in start)
    (out_dir / f"rank-{distributed.rank()}.json").write_text(json.dumps(out))
    distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]))
