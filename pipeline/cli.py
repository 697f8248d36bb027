"""The `rlhf` command (same as `python -m pipeline`). Thin: parse, call, print.

Exit codes: 0 success; 1 the input was read but is invalid; 2 usage error or unreadable input.
"""

from __future__ import annotations

import argparse
import sys

from pipeline import __version__
from pipeline.errors import RLHFError

DESCRIPTION = """\
rlhf: a staged alignment pipeline. SFT -> preference data -> reward model -> policy optimisation.
Each stage is a block of a YAML pipeline config and writes an artifact the next stage reads.

examples:
  rlhf run configs/tiny.yaml                     run every stage (skips those up to date)
  rlhf run configs/tiny.yaml --stage sft --force rerun one stage
  rlhf run configs/quickstart.yaml --set stages.sft.optim.max_steps=10
  rlhf models prepare smollm2-135m-instruct      convert the embedded SmolLM2 once
"""


def _cmd_run(args) -> int:
    from pipeline.config import load_pipeline

    cfg = load_pipeline(args.config, args.set)
    if args.run_dir:
        cfg.run_dir = args.run_dir
    if args.check:
        print(f"{args.config}: valid ({len(cfg.stages)} stages: {', '.join(s.name for s in cfg.stages)})")
        return 0
    from pipeline.runner import run_pipeline

    run_pipeline(cfg, only=args.stage, force=args.force)
    return 0


def _cmd_models_prepare(args) -> int:
    from pipeline.models import resolve

    for ref in args.refs:
        print(f"{ref}: {resolve(ref)}")
    return 0


def _cmd_models_list(args) -> int:
    from pipeline.models import BUILTIN, cache_dir

    print("built-in references (built or converted into the cache on first use):")
    for ref in BUILTIN:
        print(f"  {ref}")
    models = cache_dir() / "models"
    print(f"cache: {models}")
    if models.is_dir():
        for p in sorted(models.iterdir()):
            if not p.name.startswith("."):
                print(f"  {p.name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhf", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"rlhf {__version__}")
    # Launchers (deepspeed, torch.distributed.launch) append --local_rank=N; accepted and ignored here,
    # the rank is read from the environment.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser("run", help="run the stages of a pipeline config in order",
                       description="Run the stages of a pipeline config in order. A stage whose complete manifest "
                       "matches the current config and inputs is skipped; a changed one reruns with everything "
                       "downstream.")
    r.add_argument("config", help="pipeline YAML (see configs/)")
    r.add_argument("--stage", action="append", metavar="NAME", help="run only this stage (repeatable)")
    r.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config key, e.g. stages.sft.optim.lr=1e-4 (list items by index or stage name)")
    r.add_argument("--force", action="store_true", help="rerun the selected stages even if up to date")
    r.add_argument("--run-dir", help="override run_dir")
    r.add_argument("--check", action="store_true", help="validate the config and exit")
    r.set_defaults(func=_cmd_run)

    m = sub.add_parser("models", help="list or prepare model references",
                       description="Model references: tiny, smollm2-135m-instruct, a local directory, or a hub id.")
    msub = m.add_subparsers(dest="models_command", metavar="ACTION")
    ml = msub.add_parser("list", help="list built-in references and what is cached")
    ml.set_defaults(func=_cmd_models_list)
    mp = msub.add_parser("prepare", help="build or convert references into the cache ahead of time")
    mp.add_argument("refs", nargs="+", metavar="REF")
    mp.set_defaults(func=_cmd_models_prepare)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except RLHFError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
