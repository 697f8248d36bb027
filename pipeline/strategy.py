"""How our own training loop (PPO) runs: on one process, on several (data parallel), or on DeepSpeed ZeRO engines
(pipeline/deepspeed.py), behind one interface, so that the loop never asks which (as OpenRLHF's strategies do).

    strategy = pipeline.deepspeed.select(ds_config)          # Local, DataParallel or DeepSpeed
    with strategy.loading():                                   # ZeRO-3: models are built sharded
        policy, critic = ...
    reference = strategy.place_frozen(reference)               # on the device, or a ZeRO-3 inference engine
    actor, critic = strategy.prepare({"actor": actor_module, "critic": critic_module}, optim)
    strategy.zero_grad()
    strategy.backward({"actor": policy_loss, "critic": value_loss})   # one micro-batch's share of each loss
    grad_norm = strategy.step(check)                           # clip each model's gradients, check, update
    strategy.save(path); strategy.load(path)                   # a resumable checkpoint
    plain = strategy.plain(module, rebuild)                    # rank 0: the trained module as a plain model
    with strategy.whole(actor): ...                            # every weight present (ZeRO-3: gathered) to sample

Every loss a loop hands to `backward` is already its share of the minibatch's loss (a token sum over the minibatch's
token count on every process), so the strategies add gradients up: DataParallel sums them over the processes once
per minibatch, and DeepSpeed undoes its engines' division by the accumulation steps and their mean over processes.
Each model (the policy with its value head; a critic) gets its own AdamW, schedule and gradient clipping, as a
DeepSpeed engine (and OpenRLHF's optimizers) would.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from pipeline import distributed
from rlhf.errors import InvalidInput, UsageError


def adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where the parameters' device has one (CPU and CUDA do): the same update,
    about ten times faster on a CPU than the per-tensor loop torch picks there by default (what transformers'
    default `adamw_torch_fused`, and so TRL, uses too)."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except RuntimeError:  # a device or dtype without the fused kernel
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


@dataclass
class Optim:
    """How the trained models are optimised: an optimizer per model from `make(params)` (default AdamW(lr,
    weight_decay)), each model's gradients clipped to max_grad_norm, and `schedule(optimizer)`, a learning-rate
    schedule stepped once per update (None: constant)."""

    lr: float
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    schedule: Callable | None = None
    make: Callable | None = None

    def optimizer(self, params):
        return self.make(params) if self.make else adamw(params, self.lr, self.weight_decay)


def local_sizes(cfg, world: int) -> tuple[int, int]:
    """PPO on `world` processes: (prompts per process per step, minibatch rows per process); every process takes an
    equal share of each step's prompts and of each minibatch, in the same number of equal micro-batches. Uneven
    shares are refused, saying which."""
    pps, mb, micro = cfg.rollout.prompts_per_step, cfg.ppo.minibatch_size, cfg.ppo.micro_batch_size
    where = f"stages.{cfg.name or 'ppo'}"
    if pps % world or mb % world:
        raise UsageError(f"{where}: rollout.prompts_per_step ({pps}) and ppo.minibatch_size ({mb}) must divide "
                         f"by the number of processes ({world})")
    if world > 1 and ((pps // world) % (mb // world) or (mb // world) % micro):
        raise UsageError(f"{where}: on several processes every process runs the same number of equal micro-batches: "
                         f"need prompts_per_step/processes ({pps // world}) divisible by minibatch_size/processes "
                         f"({mb // world}), and that by ppo.micro_batch_size ({micro})")
    return pps // world, mb // world


class Local:
    """One process: the models on this machine's accelerator (or CPU), a torch optimizer each."""

    name = "one process"
    shards_weights = False  # ZeRO-3: no process holds a whole model (the reference is loaded, not copied)
    shards_frozen = False  # the frozen models (reference, reward model) are sharded too
    sync_generation = False  # sampling runs on shards, every process stepping together

    def __init__(self):
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        self.names: list[str] = []
        self.modules: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, object] = {}
        self.max_grad_norm = 1.0

    def describe(self) -> str:
        return self.name

    def loading(self):
        """While alive, models load as this strategy holds them (only ZeRO-3 does anything: built sharded)."""
        return contextlib.nullcontext()

    def place_frozen(self, module: nn.Module | None) -> nn.Module | None:
        """A frozen model (reference, reward model) where the loop uses it: whole, on this strategy's device."""
        return module.to(self.device) if module is not None else None

    def prepare(self, modules: dict[str, nn.Module | None], optim: Optim) -> list:
        """Train these models (None: absent): each on the device with its own optimizer and schedule. Returns what
        the loop calls for each, in the same order (the modules themselves here)."""
        self.max_grad_norm = optim.max_grad_norm
        out = []
        for name, module in modules.items():
            if module is None:
                out.append(None)
                continue
            module.to(self.device)
            self._broadcast(module)
            opt = optim.optimizer([p for p in module.parameters() if p.requires_grad])
            self.names.append(name)
            self.modules[name], self.optimizers[name] = module, opt
            self.schedulers[name] = optim.schedule(opt) if optim.schedule else None
            out.append(module)
        return out

    def _broadcast(self, module: nn.Module) -> None:
        pass  # one process: nothing to agree on

    @property
    def lr(self) -> float:
        return self.optimizers[self.names[0]].param_groups[0]["lr"]

    def zero_grad(self) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)

    def backward(self, losses: dict[str, torch.Tensor]) -> None:
        """One micro-batch's share of each model's loss (its token sums over the minibatch's token count): added up
        over the micro-batches, the gradients are the minibatch's."""
        sum(losses.values()).backward()

    def _reduce(self) -> None:
        pass  # one process: the gradients are the minibatch's already

    def step(self, check) -> float:
        """Clip each model's gradients to max_grad_norm, `check(grad_norm=...)` before anything is applied (it raises
        on a non-finite norm), update, step the schedules. Returns the norm over all models, before clipping."""
        self._reduce()
        norms = torch.stack([torch.nn.utils.clip_grad_norm_(
            [p for p in self.modules[n].parameters() if p.requires_grad], self.max_grad_norm) for n in self.names])
        norm = norms.square().sum().sqrt()
        check(grad_norm=norm)  # before the update: a non-finite gradient never reaches the weights
        for n in self.names:
            self.optimizers[n].step()
            if self.schedulers[n] is not None:
                self.schedulers[n].step()
        return norm.item()

    def save(self, path) -> None:
        """Weights (safetensors), optimizer and schedule states of every trained model, by name."""
        from safetensors.torch import save_model

        if not distributed.is_main():
            return  # data parallel: every process holds the same
        for n in self.names:
            save_model(self.modules[n], str(path / f"{n}.safetensors"))
            torch.save(self.optimizers[n].state_dict(), path / f"{n}-optimizer.pt")
            if self.schedulers[n] is not None:
                torch.save(self.schedulers[n].state_dict(), path / f"{n}-scheduler.pt")

    def load(self, path) -> None:
        """save()'s files back (torch.load only with weights_only=True); a missing one is an error naming it."""
        from safetensors.torch import load_model

        for n in self.names:
            files = [path / f"{n}.safetensors", path / f"{n}-optimizer.pt"]
            if self.schedulers[n] is not None:
                files.append(path / f"{n}-scheduler.pt")
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise InvalidInput(f"{path}: no {', '.join(missing)}; the checkpoint was written by another version "
                                   "or set-up of this stage")
            load_model(self.modules[n], str(files[0]))
            self.optimizers[n].load_state_dict(torch.load(files[1], weights_only=True))
            if self.schedulers[n] is not None:
                self.schedulers[n].load_state_dict(torch.load(files[2], weights_only=True))

    def plain(self, module: nn.Module | None, rebuild: Callable[[], nn.Module]) -> nn.Module | None:
        """On rank 0, the trained `module` as a plain model to save (the module itself here; under ZeRO its gathered
        weights loaded into `rebuild()`); None on other processes. Every process calls it."""
        return module if distributed.is_main() else None

    @contextlib.contextmanager
    def whole(self, prepared):
        """While open, every weight of a prepared model is present on every process (for sampling)."""
        yield prepared


class DataParallel(Local):
    """Several processes, each holding the whole models: each process backwards its share of every minibatch, and
    the gradients are summed over the processes (one all-reduce per model, per update) before clipping, so every
    process applies the same update and the weights stay equal (they are made equal at start-up, from rank 0).
    torch's DistributedDataParallel does the same reduction, overlapped with the backward pass; done once per
    minibatch here, it needs no bookkeeping of which micro-batch ends the accumulation."""

    name = "data parallel"

    def describe(self) -> str:
        return f"{self.name}, {distributed.world_size()} processes"

    def _broadcast(self, module: nn.Module) -> None:
        import torch.distributed as dist

        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)

    def _reduce(self) -> None:
        """Sum every trained parameter's gradient over the processes, one flat buffer per model."""
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        for n in self.names:
            params = [p for p in self.modules[n].parameters() if p.requires_grad]
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = [p.grad for p in params]
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat)
            for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(reduced)
