"""The `rlhf` command (same as `python -m pipeline`). Thin: parse, call, print.

    parser.py     the argparse parsers, one per command, and the options they share
    commands.py   what each command does: read the arguments, call the module that does the work, print

Exit codes: 0 success; 1 the input was read but is invalid; 2 usage error or unreadable input.

Importing this package loads no torch, transformers or FastAPI (the modules doing the work import those where
they need them), so `rlhf --help` and a usage error answer at once.
"""

from __future__ import annotations

import sys

from pipeline.cli.parser import build_parser
from rlhf.errors import RLHFError
from pipeline.tracking import quiet_libraries

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
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
