"""`rlhf run`: run the stages of a pipeline config in order, skipping those that are up to date.

A stage is skipped when its complete manifest has the same config hash and the same input
hashes (upstream manifests, data file contents, model references) as now. Rerunning a stage
writes a new manifest, whose hash then differs, so everything downstream reruns too.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import artifacts, checkpoint, distributed
from pipeline.blocks import config_hash, dump_yaml
from pipeline.config import ADAPTER_ON_ADAPTER, PipelineConfig, keeps_adapter
from pipeline.data import resolve_data_path
from rlhf.errors import UsageError
from pipeline.tracking import MetricsLog, redact, stage_wandb
from feedback.judges.rule import trust_modules
from pipeline.checkpoint import meta
from pipeline.generation import NEUTRALISED
from pipeline.mfu import describe
from pipeline.models import load_causal_lm, load_tokenizer, missing_parts, resolve
from pipeline.stages import REGISTRY
from pipeline.stages.common import reset_peak_memory

@dataclass
class StageContext:
    """What a stage's run() gets besides its own config block."""

    pipeline: PipelineConfig
    name: str
    work_dir: Path  # RUN_DIR/.<name>.partial: everything the stage writes goes here
    seed: int
    metrics: MetricsLog
    inputs: dict[str, dict] = field(default_factory=dict)
    config_hash: str = ""
    stage_config: dict = field(default_factory=dict)  # resolved, for checkpoint metadata
    resume_from: Path | None = None  # a complete checkpoint to continue from (rlhf run --resume)

    def checkpoint_meta(self, step: int, extra: dict | None = None) -> dict:
        return meta(step, self.config_hash, self.stage_config, extra)

    @property
    def run_dir(self) -> Path:
        return Path(self.pipeline.run_dir)

    def artifact(self, ref: str, kinds, role: str) -> artifacts.Artifact:
        """`stage:NAME` -> the complete artifact of that stage, checked for kind."""
        if not ref.startswith("stage:"):
            raise UsageError(f"{self.name}.{role}: expected 'stage:NAME', got '{ref}'")
        return artifacts.load_artifact(self.run_dir / ref[6:], kinds, role=f"{self.name}.{role}")

    def trusts_remote_code(self, ref: str) -> bool:
        """Whether the user's config lets the model (or `stage:` artifact) `ref` run its own code."""
        return self.pipeline.trusts_remote_code(ref)

    def model_path(self, ref: str, role: str = "model", merged: bool = False) -> tuple[str, dict]:
        """A stage's model value -> (resolved path or hub id, model info for the manifest).

        Accepts a key of `models`, `stage:NAME` (a policy or reward-model artifact), or a reference.
        merged: an adapter (a LoRA policy saved with lora.merge: false) is merged into its base and written
        once under the stage's work directory, and that path is returned, so that everything loading the
        model by path (a reward model's head, TRL rebuilding a reference from the policy's path) gets the
        adapted policy, never the bare base.
        """
        if ref.startswith("stage:"):
            art = self.artifact(ref, ("policy", "reward_model"), role)
            # a model trained from a custom-code base needs that code again: trusted when this config trusts the
            # base it was trained from, never because the artifact's manifest says so
            path, info = str(art.output("model")), {"ref": ref, "trust_remote_code": self.trusts_remote_code(ref),
                                                    "revision": None}
        else:
            spec = self.pipeline.model_spec(ref)
            path, info = resolve(spec.ref), {"ref": spec.ref, "trust_remote_code": spec.trust_remote_code,
                                             "revision": spec.revision}
        is_adapter = (Path(path) / "adapter_config.json").exists()
        if is_adapter and keeps_adapter(self.pipeline.stage(self.name)):  # loaded merged, with or without `merged`
            raise UsageError(ADAPTER_ON_ADAPTER.format(f"{self.name}.lora.merge", ref))
        if merged and is_adapter:
            from pipeline.models import is_mergeable_adapter

            if not is_mergeable_adapter(path):
                raise UsageError(f"{self.name}.{role}: {ref} is a prompt-tuning adapter, which cannot be merged into "
                                 "its base for further training; evaluate or serve it, or train later stages from a "
                                 "full, lora or freeze SFT policy")
            path = self._merge_adapter(path, role, info)
            info = {**info, "merged_adapter": True}
        return path, info

    def _merge_adapter(self, path: str, role: str, info: dict) -> str:
        """The adapter at `path` merged into its base, saved as a plain model in WORK/.inputs/ROLE (rank 0 writes;
        the runner removes .inputs/ before the artifact is promoted)."""
        out = self.work_dir / ".inputs" / role
        if distributed.is_main() and missing_parts(out):
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            trust = info.get("trust_remote_code", False)
            load_causal_lm(path, "fp32", trust).save_pretrained(tmp, safe_serialization=True)
            load_tokenizer(path, trust).save_pretrained(tmp)
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
        distributed.barrier()
        return str(out)


def _input_entry(cfg: PipelineConfig, ref: str, kind: str) -> dict:
    """The manifest entry for one input: what identifies its current content, computed without loading it."""
    if ref.startswith("stage:"):
        stage_dir = Path(cfg.run_dir) / ref[6:]
        if artifacts.read_manifest(stage_dir) is None:
            return {"path": str(stage_dir), "manifest_hash": None}
        return {"path": str(stage_dir), "manifest_hash": artifacts.manifest_hash(stage_dir)}
    if kind == "data":
        p = resolve_data_path(ref)
        if p.is_dir():
            h = [artifacts.file_sha256(f) for f in sorted(p.rglob("*")) if f.is_file()]
            return {"path": str(p), "sha256": artifacts.hashlib.sha256("".join(h).encode()).hexdigest()}
        return artifacts.file_input(p)
    spec = cfg.model_spec(ref)
    entry = {"ref": spec.ref}  # plus what else picks the weights and code, when it is not the default
    if spec.revision is not None:
        entry["revision"] = spec.revision
    if spec.trust_remote_code:
        entry["trust_remote_code"] = True
    return entry


def stage_module(method: str):
    """The module that runs a stage method (the registry in pipeline/stages)."""
    return REGISTRY[method]


def preflight(stages: list, world: int) -> None:
    """Before the first stage starts, every selected stage's checks that need more than its config: the number of
    processes or what the installed libraries offer (StageBlock.preflight), and its DeepSpeed config read and
    filled for that many processes. A launch that cannot work then fails at once, not after the stages before it
    have trained. `rlhf run --check --processes N` runs the same checks."""
    for st in stages:
        zero = None
        if getattr(st, "deepspeed", None):
            from pipeline.deepspeed import zero_config
            from pipeline.models import resolve_precision

            zero = zero_config(st, resolve_precision(st.precision), world)
        st.preflight(world, zero)


def selected_stages(cfg: PipelineConfig, only: list[str] | None) -> list:
    """The stages `--stage` names (all without it), in config order; an unknown name is a usage error."""
    names = [s.name for s in cfg.stages]
    for n in only or []:
        if n not in names:
            raise UsageError(f"--stage {n}: no such stage (stages: {', '.join(names)})")
    return [st for st in cfg.stages if not only or st.name in only]


def run_pipeline(cfg: PipelineConfig, only: list[str] | None = None, force: bool = False, resume: bool = False,
                 echo=print) -> list[dict]:
    trust_modules(cfg.trusted_modules)
    stages = selected_stages(cfg, only)
    preflight(stages, distributed.world_size())
    distributed.init()
    if not distributed.is_main():
        echo = lambda *a, **k: None  # noqa: E731  (one voice: rank 0 speaks for all)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    results = []
    first_to_run = True
    for st in stages:
        inputs = {key: _input_entry(cfg, ref, kind) for key, (ref, kind) in st.inputs().items()}
        chash = config_hash(st, {"seed": cfg.seed})
        stage_dir = run_dir / st.name
        old = artifacts.read_manifest(stage_dir)
        if old is not None and not force and old.get("status") == "complete":
            why = "config changed" if old.get("config_hash") != chash else artifacts.inputs_unchanged(
                old.get("inputs", {}), inputs)
            if why is None and resume and _has_checkpoints(run_dir / f".{st.name}.partial"):
                why = "an unfinished rerun has checkpoints (--resume)"  # e.g. a --force rerun that was killed
            if why is None:
                echo(f"[{st.name}] up to date, skipped (--force reruns it)")
                recap = getattr(REGISTRY[st.stage], "recap", None)  # what the stage printed when it ran (its results)
                text = recap(old) if recap is not None else None
                if text:
                    echo(text)
                results.append(old)
                continue
            echo(f"[{st.name}] {why}: rerunning")
        results.append(_run_stage(cfg, st, inputs, chash, echo, resume=resume, must_resume=resume and first_to_run))
        first_to_run = False
    return results


def _has_checkpoints(work: Path) -> bool:
    return bool(checkpoint.scan(work / "checkpoints", echo=lambda *_: None))


def _prepare_work_dir(work: Path, st, chash: str, resolved: dict, resume: bool, must_resume: bool, echo):
    """The partial directory: fresh, or kept to resume from its newest complete checkpoint."""
    ckpts = work / "checkpoints"
    if resume and (must_resume or _has_checkpoints(work)):
        path = checkpoint.latest(ckpts, st.name, echo)
        info = checkpoint.read_meta(path)
        checkpoint.check_resumable(info, chash, resolved, st.name, path)
        _truncate_metrics(work / "metrics.jsonl", info["step"])
        echo(f"[{st.name}] resuming from {path} (step {info['step']})")
        return path
    if _has_checkpoints(work):
        echo(f"[{st.name}] discarding the checkpoints of an unfinished run in {ckpts} (--resume continues it)")
    artifacts.make_work_dir(work, work.parent)
    return None


def _shared_resume_path(path: Path | None) -> Path | None:
    """Rank 0 decides where to resume from; every rank uses the same checkpoint."""
    import torch.distributed as dist

    box = [str(path) if path else None]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return Path(box[0]) if box[0] else None


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics logged after the checkpoint we resume from (they will be logged again)."""
    import json

    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    artifacts.write_atomic(path, "".join(line + "\n" for line in keep))


def _run_stage(cfg: PipelineConfig, st, inputs: dict, chash: str, echo, resume: bool = False,
               must_resume: bool = False) -> dict:
    run_dir = Path(cfg.run_dir)
    work = run_dir / f".{st.name}.partial"
    resolved = {"seed": cfg.seed, "tracking": cfg.tracking.model_dump(mode="json"), **st.model_dump(mode="json")}

    resume_from = _prepare_work_dir(work, st, chash, resolved, resume, must_resume, echo) \
        if distributed.is_main() else None
    if distributed.world_size() > 1:
        distributed.barrier()
        resume_from = _shared_resume_path(resume_from)
    artifacts.write_atomic(work / "config.yaml", dump_yaml(redact(resolved)))
    stage_wandb(cfg.tracking, run_dir, st.name, resolved)  # the stage's own wandb run, its files under run_dir
    ctx = StageContext(pipeline=cfg, name=st.name, work_dir=work, seed=cfg.seed,
                       metrics=MetricsLog(work / "metrics.jsonl"), inputs=inputs, config_hash=chash,
                       stage_config=resolved, resume_from=resume_from)
    t0 = time.time()
    echo(f"[{st.name}] running stage '{st.stage}' -> {run_dir / st.name}")

    NEUTRALISED.clear()
    reset_peak_memory()
    try:
        out = stage_module(st.stage).run(st, ctx)
    finally:
        from pipeline.deepspeed import forget

        forget()  # HF keeps a stage's DeepSpeed config globally: the next stage loads its models whole
    # every process has finished writing into the work directory (a stage that reads data alone, with no collective
    # step to keep the processes together, may still be writing there) before rank 0 tidies it and moves it in place
    distributed.barrier()
    if NEUTRALISED:  # special tokens found in untrusted text (data, responses) and kept as text
        out.setdefault("counts", {})["special_tokens_neutralised"] = dict(NEUTRALISED)
        echo(f"[{st.name}] neutralised {sum(NEUTRALISED.values())} special-token strings found in prompts or "
             f"responses ({', '.join(sorted(NEUTRALISED))}): they were read as text, not as control tokens")
    metrics = {**ctx.metrics.last, **out.get("metrics", {}), "time/seconds": round(time.time() - t0, 2)}
    manifest = artifacts.build_manifest(
        stage=st.name,
        kind=out["kind"],
        config_hash=chash,
        inputs=inputs,
        outputs=out["outputs"],
        metrics=metrics,
        counts=out.get("counts"),
        extra=out.get("extra"),
    )
    if distributed.is_main():
        shutil.rmtree(work / "checkpoints", ignore_errors=True)  # the artifact is complete: checkpoints are spent
        shutil.rmtree(work / ".inputs", ignore_errors=True)  # merged copies of adapter inputs
        artifacts.follow_umask(work)  # weights readable as the user's umask says, like every other file
        artifacts.fsync_tree(work)  # weights on disk before the manifest that vouches for them
    artifacts.write_json(work / artifacts.MANIFEST, manifest)  # last: it marks the artifact complete
    if distributed.is_main():
        artifacts.replace_dir(work, run_dir / st.name, run_dir)
    distributed.barrier()
    if out.get("summary"):
        echo(f"[{st.name}] {out['summary']}")
    if describe(metrics):
        echo(f"[{st.name}] model FLOPs utilisation {describe(metrics)} (docs/mfu.md)")
    if cfg.tracking.wandb and distributed.is_main():
        from pipeline.report import log_to_wandb

        log_to_wandb(run_dir, st.name)  # the report's plots (and evaluate table) into the stage's run
    return manifest
