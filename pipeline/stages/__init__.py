"""One file per stage: its typed config block and `run(cfg, ctx) -> dict` (kind, outputs, metrics, counts)."""

# pipeline.config builds the union of the stage configs from these modules; importing it first lets
# a stage module be imported on its own (`from pipeline.stages.ppo import PPOStageConfig`).
import pipeline.config  # noqa: F401,E402
