"""Processes and DeepSpeed: ranks, the process group, and ZeRO configs filled from the stage config.

Launch any stage on N processes (GPUs, or CPUs with the gloo backend):

    deepspeed --num_gpus 2 --module pipeline run configs/tiny.yaml --stage sft --deepspeed configs/deepspeed/zero3.json
    torchrun --nproc_per_node 2 -m pipeline run configs/tiny.yaml --stage sft --deepspeed configs/deepspeed/zero2.json

Batch size, gradient accumulation, clipping and precision in a ZeRO JSON are "auto" and filled
from the stage's `optim` and `precision`; a number there that disagrees with the stage is an
error before launch, not a DeepSpeed assertion later. Only rank 0 writes artifacts and
manifests; every rank takes part in training and in gathering ZeRO-3 weights for saving.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.errors import UsageError


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def say(*args, **kwargs) -> None:
    """print() from rank 0 only: one voice for all processes."""
    if is_main():
        print(*args, **kwargs)


def init() -> None:
    """Set up the process group when launched on several processes (gloo on CPU, nccl on GPUs)."""
    if world_size() <= 1:
        return
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def barrier() -> None:
    if world_size() <= 1:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _active() -> bool:
    if world_size() <= 1:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _comm_device():
    """Where collective tensors must live: the current GPU under NCCL, else the CPU (gloo)."""
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True on every process when `flag` is True on any of them (so that they stop together)."""
    if not _active():
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """The mean of each value over the processes (every process passes the same keys)."""
    if not _active():
        return values
    import torch
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return {k: v / world_size() for k, v in zip(keys, t.tolist())}


def gather(t):
    """The concatenation of a 1-D tensor of the same length from every process, in rank order (on t's device)."""
    if not _active():
        return t
    import torch
    import torch.distributed as dist

    local = t.detach().to(_comm_device()).contiguous()
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(t.device)


def broadcast_error(message: str | None) -> str | None:
    """Share rank 0's error (or None) with every rank, so that all ranks fail together."""
    if world_size() <= 1:
        return message
    import torch.distributed as dist

    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def load_zero_config(path: str | Path, optim, precision: str, where: str) -> dict:
    """A ZeRO JSON with its "auto" values filled from the stage; disagreements are errors.

    Every stage run under DeepSpeed comes through here, so this is also where DeepSpeed's checkpoint
    reader is switched to torch.load(weights_only=True) (safe_deepspeed_loading) before any resume."""
    safe_deepspeed_loading()
    try:
        cfg = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"--deepspeed {path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    want = {
        "train_micro_batch_size_per_gpu": optim.batch_size,
        "gradient_accumulation_steps": optim.grad_accum,
        "gradient_clipping": optim.max_grad_norm,
        "train_batch_size": optim.batch_size * optim.grad_accum * world_size(),
    }
    for key, value in want.items():
        have = cfg.get(key, "auto")
        if have != "auto" and have != value:
            raise UsageError(f"{path}: {key} is {have} but {where} gives {value}; set it to \"auto\" or make them agree")
        cfg[key] = value
    for name in ("bf16", "fp16"):
        block = cfg.setdefault(name, {})
        enabled = block.get("enabled", "auto")
        if enabled != "auto" and bool(enabled) != (precision == name):
            raise UsageError(f"{path}: {name}.enabled is {enabled} but {where}.precision is {precision}")
        block["enabled"] = precision == name
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise UsageError(f"{path}: zero_optimization.stage must be 0-3, got {stage}")
    _refuse_unsafe_checkpointing(cfg, path)
    return cfg


def _refuse_unsafe_checkpointing(cfg: dict, path) -> None:
    """Resume reads checkpoints only through DeepSpeed's torch engine, switched to weights_only loading
    (safe_deepspeed_loading). Universal checkpoints and the other checkpoint engines load through paths that
    call torch.load(weights_only=False), which runs any pickle a checkpoint holds: refused."""
    ckpt = cfg.get("checkpoint") or {}
    unsafe = []
    if ckpt.get("load_universal"):
        unsafe.append("checkpoint.load_universal")
    if ckpt.get("writer") is not None:
        unsafe.append("checkpoint.writer (the fast/decoupled checkpoint engines)")
    if (cfg.get("datastates") or {}).get("enabled"):
        unsafe.append("datastates")
    if "nebula" in cfg:
        unsafe.append("nebula")
    if unsafe:
        raise UsageError(f"{path}: {', '.join(unsafe)}: not supported here; these load checkpoints with "
                         "torch.load(weights_only=False), which can run code from a checkpoint file. Remove the key: "
                         "checkpoints are written and read by DeepSpeed's torch engine with weights-only loading")


def zero_stage(ds_config: dict | None) -> int:
    return int((ds_config or {}).get("zero_optimization", {}).get("stage", 0))


def safe_deepspeed_loading() -> None:
    """DeepSpeed's checkpoint reader (resume) calls torch.load with weights_only=False; make it load with
    weights_only=True, allowing only the few plain DeepSpeed types its checkpoints hold. Idempotent."""
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if getattr(TorchCheckpointEngine.load, "_weights_only", False):
        return

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(_deepspeed_checkpoint_types()):
            return torch.load(path, map_location=map_location, weights_only=True)

    load._weights_only = True
    TorchCheckpointEngine.load = load


def _deepspeed_checkpoint_types() -> list:
    """The non-tensor types a ZeRO optimizer checkpoint pickles (enums and loss-scaler settings)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]
