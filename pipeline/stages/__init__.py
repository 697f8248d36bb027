"""One file per stage: its typed config block and `run(cfg, ctx) -> dict` (kind, outputs, metrics, counts)."""
