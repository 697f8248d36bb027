"""`python -m pipeline` is the `rlhf` command (so `deepspeed --module pipeline ...` works)."""

from pipeline.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
