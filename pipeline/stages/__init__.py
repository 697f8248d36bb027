"""The stages, and the registry: the one list of them.

Each stage is one module that exports `Config` (its typed block; `stage:` in a pipeline config picks it)
and `run(cfg, ctx) -> dict` (kind, outputs, metrics, counts, summary: see pipeline/runner.py). The
pipeline config validates each block through this registry and the runner runs it from here, so
adding a stage means writing its module and adding one line below. Stage modules import
pipeline.blocks, pipeline.data, pipeline.stages.common, reward and feedback; never each other, and
never pipeline.config or pipeline.runner.
"""

from pipeline.stages import ai_preferences, dpo, evaluate, grpo, kto, ppo, preferences, reward, sft

REGISTRY = {
    "sft": sft,
    "preferences": preferences,
    "ai_preferences": ai_preferences,
    "reward": reward,
    "ppo": ppo,
    "dpo": dpo,
    "kto": kto,
    "grpo": grpo,
    "rloo": grpo,  # one module, one Config for both group-baseline methods
    "evaluate": evaluate,
}
