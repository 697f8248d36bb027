"""Model FLOPs utilisation (MFU) of a training stage: the model FLOPs it did per second, over the matmul peak of this
machine (docs/mfu.md).

    counter = FlopCounter(policy=model, reference=ref)     # counts the tokens each model's forwards process
    with counter: trainer.train()                          # (or the stage's own loop)
    metrics = counter.metrics(seconds, precision)          # perf/mfu, perf/model_flops_per_second, ...

Model FLOPs, per model of N parameters (all of them: a LoRA run's frozen base included), over the T tokens a forward
processes (the positions its attention mask keeps; a generation step with a KV cache processes its new positions):
    6 * N * T   for a forward with gradients on (training: forward + backward, 2N + 4N)
    2 * N * T   for a forward without (a frozen reference, evaluation, each generated token)
Attention's own FLOPs (a term in the sequence length) are left out, so at long sequences this is an underestimate;
a LoRA run does about 4N, not 6N, per trained token (no weight gradients for the frozen base), so its MFU is an
overestimate by up to 1.5x: both are the usual conventions (Kaplan et al. 2020; PaLM, Chowdhery et al. 2022, app. B).

The peak is measured, not read from a data sheet: `matmul_peak` times torch.matmul of square matrices on the stage's
device and dtype, once per machine (device name, dtype, torch version, threads), cached in
$RLHF_CACHE/matmul_peak.json (default ~/.cache/rlhf); RLHF_MATMUL_PEAK (FLOP/s) overrides it. Run it with
`python -m pipeline.mfu` to see this machine's.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

TRAIN_FACTOR, FORWARD_FACTOR = 6, 2  # FLOPs per parameter per token: forward + backward, forward alone


def model_flops(parameters: int, tokens: int, training: bool) -> int:
    """6·N·T (training: forward and backward) or 2·N·T (a forward alone)."""
    return (TRAIN_FACTOR if training else FORWARD_FACTOR) * parameters * tokens


def _core(model):
    """The module whose forward every use of `model` runs: through a DDP or DeepSpeed wrapper (.module) and a peft
    model (its base model, which holds the adapter layers and which generate() calls directly)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module") and hasattr(model.module, "forward"):
            model = model.module
    return model


def _backbone(core):
    """Where the hook goes: the transformer body (`base_model`) of a causal LM or sequence classifier, which every
    forward runs, including those that call the body alone (PPO's values, its critic); the model itself if none."""
    body = getattr(core, "base_model", None)
    return body if body is not None and hasattr(body, "register_forward_pre_hook") else core


def _tokens(args, kwargs) -> int:
    """The tokens a forward processes: the attention mask's ones when it covers the input, else every input position
    (a generation step with a KV cache, whose mask covers the cache too)."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    if ids is None or not hasattr(ids, "shape"):
        return 0
    shape = tuple(ids.shape[:2]) if ids.dim() >= 2 else (1, int(ids.shape[0]))
    mask = kwargs.get("attention_mask")
    if mask is not None and hasattr(mask, "shape") and tuple(mask.shape) == shape:
        return int(mask.sum())
    return shape[0] * shape[1]


class FlopCounter:
    """Counts the model FLOPs of the forwards of the given models (named; None is left out, a model given twice counted
    once), while entered: a forward pre-hook on each model's transformer body reads the tokens and whether gradients
    are on, and counts them at the whole model's parameter count N."""

    def __init__(self, **models):
        from pipeline.models import count_parameters

        self.models: dict[str, tuple] = {}
        for name, model in models.items():
            core = _core(model) if model is not None else None
            if core is not None and all(core is not c for c, _ in self.models.values()):
                self.models[name] = (core, count_parameters(core)[0])
        self.tokens = {"trained": 0, "forward": 0}
        self.flops = 0
        self._hooks: list = []

    def _hook(self, parameters: int):
        def count(module, args, kwargs):
            import torch

            n = _tokens(args, kwargs)
            training = torch.is_grad_enabled()
            self.tokens["trained" if training else "forward"] += n
            self.flops += model_flops(parameters, n, training)

        return count

    def __enter__(self):
        self._hooks = [_backbone(core).register_forward_pre_hook(self._hook(n), with_kwargs=True)
                       for core, n in self.models.values()]
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def metrics(self, seconds: float, precision: str = "fp32") -> dict[str, float]:
        """perf/* for the manifest: model FLOPs, FLOP/s achieved over `seconds`, the measured peak and their ratio."""
        peak = matmul_peak(_device(self.models), precision)
        achieved = self.flops / seconds if seconds > 0 else 0.0
        return {"perf/model_flops": float(self.flops), "perf/tokens_trained": self.tokens["trained"],
                "perf/tokens_forward": self.tokens["forward"], "perf/model_flops_per_second": round(achieved, 1),
                "perf/peak_flops_per_second": round(peak, 1), "perf/mfu": achieved / peak}


def describe(metrics: dict) -> str | None:
    """A stage's MFU as the run and its report say it, from its perf/* metrics (None without them)."""
    ratio, achieved, peak = (metrics.get(k) for k in ("perf/mfu", "perf/model_flops_per_second",
                                                       "perf/peak_flops_per_second"))
    if not all(isinstance(v, (int, float)) for v in (ratio, achieved, peak)):
        return None
    return f"{ratio:.2%} ({achieved / 1e9:,.2f} of a measured {peak / 1e9:,.1f} GFLOP/s)"


def _device(models: dict) -> str:
    for core, _ in models.values():
        p = next(core.parameters(), None)
        if p is not None:
            return p.device.type
    return "cpu"


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _size(device: str) -> int:
    return 4096 if device == "cuda" else 1024


def measure_matmul(device: str = "cpu", dtype: str = "float32", seconds: float = 0.5) -> float:
    """FLOP/s of torch.matmul of two square matrices (2·n³ FLOPs each): the best of three runs of at least `seconds`."""
    import torch

    n = _size(device)
    a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    torch.matmul(a, b)  # warm-up: kernels chosen, memory touched
    sync()
    best = 0.0
    for _ in range(3):
        reps, t0 = 0, time.perf_counter()
        while True:
            torch.matmul(a, b)
            reps += 1
            sync()
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds:
                break
        best = max(best, 2 * n**3 * reps / elapsed)
    return best


def _cache_file() -> Path:
    from pipeline.models import cache_dir

    return cache_dir() / "matmul_peak.json"


def machine_key(device: str, dtype: str) -> str:
    import torch

    name = torch.cuda.get_device_name() if device == "cuda" else _cpu_name()
    return f"{device}:{name}|{dtype}|torch {torch.__version__}|threads {torch.get_num_threads()}"


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def matmul_peak(device: str = "cpu", precision: str = "fp32") -> float:
    """This machine's measured matmul FLOP/s for a stage's device and precision, measured once and cached (a CPU
    measures fp32: what the stages compute in there); RLHF_MATMUL_PEAK overrides it."""
    if os.environ.get("RLHF_MATMUL_PEAK"):
        return float(os.environ["RLHF_MATMUL_PEAK"])
    dtype = DTYPES.get(precision, "float32") if device == "cuda" else "float32"
    key = machine_key(device, dtype)
    path = _cache_file()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached.get(key), (int, float)):
        from rlhf.io import write_json

        cached[key] = measure_matmul(device, dtype)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, cached)  # atomic: a concurrent writer leaves one whole file, either measurement
    return float(cached[key])


if __name__ == "__main__":
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{machine_key(dev, 'float32')}: {matmul_peak(dev) / 1e9:.1f} GFLOP/s (cached in {_cache_file()})")
