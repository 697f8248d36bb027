"""Processes: ranks, one voice, and the few collectives the stages need (any, mean, gather).

Launched on N processes (`deepspeed --num_gpus N --module pipeline run ...` or `torchrun`), every
process runs the same stages; only rank 0 speaks (say) and writes artifacts and manifests. On one
process every function here is an identity. DeepSpeed itself lives in pipeline/deepspeed.py.
"""

from __future__ import annotations

import atexit
import os


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
    # the launcher's MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE (env://); DeepSpeed's engines use this group
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    # a run that ends in an error (or stops early, exit 3) never reaches shutdown(): its buffer goes at exit too.
    # Unlinking only removes the name; a process still mapping it keeps its memory until it exits.
    atexit.register(_remove_deepspeed_shm)


def shutdown() -> None:
    """Leave the process group cleanly once the work is done (every process together): without it, gloo's threads
    can be torn down during interpreter exit and abort a process that finished its work."""
    if not _active():
        return
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    _remove_deepspeed_shm()


def _remove_deepspeed_shm() -> None:
    """DeepSpeed's CPU all-reduce gives each process a shared-memory buffer (/dev/shm/deepspeed_allreduce_buffer_
    UID_ADDR_PORT_RANK, 66 MiB) and never removes it, so every CPU DeepSpeed run left its buffers in RAM until the
    machine filled (16 GB after a day of tests here). Once every process has left the group, each removes its own."""
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank()}")
    try:
        os.unlink(name)
    except OSError:  # none (no DeepSpeed all-reduce ran, or not on CPU): nothing to remove
        pass


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
    """The concatenation along the first dimension of a tensor of the same shape from every process, in rank order
    (on t's device, in t's dtype)."""
    if not _active():
        return t
    import torch
    import torch.distributed as dist

    local = t.detach().to(_comm_device()).contiguous()
    if local.dtype == torch.bool:  # gloo has no boolean all-gather
        local = local.to(torch.uint8)
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(device=t.device, dtype=t.dtype)


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every process (picklable objects: a few numbers or strings)."""
    if not _active():
        return [obj]
    import torch.distributed as dist

    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def sum_over_ranks(t):
    """The elementwise sum of a tensor over the processes (a new tensor; t itself on one process)."""
    if not _active():
        return t
    import torch.distributed as dist

    local = t.detach().to(_comm_device()).clone()
    dist.all_reduce(local)
    return local.to(t.device)
