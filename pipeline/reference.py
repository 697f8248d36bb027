"""The config reference, docs/config-reference.md, generated from the typed configs so that it cannot drift.

    python -m pipeline.reference              # (re)write docs/config-reference.md; `make docs` runs this
    python -m pipeline.reference --check      # exit 1 when the file differs from what the configs say

It walks the pipeline config (pipeline/config.py: PipelineConfig, ModelSpec, and TrackingConfig from
pipeline/blocks.py) and every stage's `Config` in the registry (pipeline/stages/__init__.py REGISTRY), nested
blocks included, and writes one table row per key: its path, type (with its bounds), default and the
`description=` of its Field. A key's meaning is written once, beside its declaration; this file only renders
it. tests/unit/test_reference.py fails when the committed page is stale or when a field has no description.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from pipeline.config import PipelineConfig
from pipeline.stages import REGISTRY

OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "config-reference.md"

HEADER = """\
# Config reference

Every key of a pipeline config and of each stage block: its path inside the block, its type (with the
bounds it is checked against), its default and what it does. *Generated* from the typed configs
(`python -m pipeline.reference`, or `make docs`) out of the `description=` of each field in
`pipeline/blocks.py`, `pipeline/config.py` and `pipeline/stages/*.py`: edit those, not this page
(`tests/unit/test_reference.py` fails when it is stale).

Everything is checked before any work starts: an unknown key, a wrong type or a value outside its
bounds stops with the file and the key path, and so does a setting that would have no effect where
it is written (for example `freeze_layers` without `tuning: freeze`). `rlhf run CONFIG --set
KEY.PATH=VALUE` overrides any key (`--set stages.sft.optim.lr=1e-4`, list items by index or by stage
name); a value `null` unsets a key that may be null. How the stages use these settings: the stage pages
linked below, and [the docs index](index.md).
"""


def _models_in(annotation) -> list[type[BaseModel]]:
    """The config blocks (pydantic models) an annotation holds: `X`, `X | None`, `dict[str, X]`, ..."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def type_name(annotation) -> str:
    """A reader's name for a field's type: `float`, `str | null`, `"full" | "lora"`, `list[str]`, `block`."""
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "block"
    if annotation is typing.Any:
        return "any"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(f'"{a}"' if isinstance(a, str) else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is typing.Annotated:  # `stages:` items: Any, validated by the registry's Config of their method
        return "stage block" if args[0] is typing.Any else type_name(args[0])
    if origin in (list, dict, tuple):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def bounds(field) -> str:
    """The numeric bounds pydantic checks (`> 0`, `>= 0, < 1`), from the Field's gt/ge/lt/le."""
    marks = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    out = [f"{marks[k]} {getattr(m, k)}" for m in field.metadata for k in marks if getattr(m, k, None) is not None]
    return ", ".join(out)


def _scalar(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_scalar(v)}" for k, v in value.items()) + "}"
    return str(value)


def default_text(field) -> str:
    """The default as it would be written in YAML; `required` when there is none, `see below` for a nested block
    (its own keys follow with theirs)."""
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "see below"
    return _scalar(value)


def rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key path, type, default, description) for every field of `model` and, after each block, its keys."""
    out = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        kind = type_name(field.annotation)
        limits = bounds(field)
        out.append((path, f"{kind} ({limits})" if limits else kind, default_text(field), field.description or ""))
        for block in _models_in(field.annotation):
            is_map = typing.get_origin(field.annotation) is dict
            out += rows(block, f"{path}.NAME." if is_map else f"{path}.")
    return out


def missing_descriptions(model: type[BaseModel], prefix: str = "") -> list[str]:
    """The key paths of `model` (nested blocks included) whose Field has no description."""
    return [path for path, _, _, description in rows(model, prefix) if not description.strip()]


def stage_sections() -> list[tuple[list[str], types.ModuleType]]:
    """([method names], module) per stage module, in registry order (one module may serve two methods)."""
    sections: list[tuple[list[str], types.ModuleType]] = []
    for method, module in REGISTRY.items():
        for names, mod in sections:
            if mod is module:
                names.append(method)
                break
        else:
            sections.append(([method], module))
    return sections


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(items: list[tuple[str, str, str, str]]) -> list[str]:
    lines = ["| key | type | default | what it does |", "|---|---|---|---|"]
    for path, kind, default, description in items:
        shown = default if default in ("required", "see below") else f"`{_cell(default)}`"
        lines.append(f"| `{path}` | {_cell(kind)} | {shown} | {_cell(description)} |")
    return lines


def render() -> str:
    """The whole page, as `python -m pipeline.reference` writes it."""
    out = [HEADER, "## The pipeline config", "",
           "The top level of a config file (`rlhf run CONFIG`): the run directory, the models the stages name, "
           "tracking, and the ordered stages.", ""]
    out += _table(rows(PipelineConfig))
    for names, module in stage_sections():
        title = " and ".join(f"`{n}`" for n in names)
        page = module.__name__.rsplit(".", 1)[-1] + ".md"
        summary = (module.__doc__ or "").strip().splitlines()[0]
        out += ["", f"## {title}", "", f"{summary} How it works: [{page}]({page}). A block of `stages:` with "
                f"`stage: {names[0]}`" + "".join(f" (or `{n}`)" for n in names[1:]) + ":", ""]
        out += _table(rows(module.Config))
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.reference", description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", type=Path, default=OUTPUT, help=f"default: {OUTPUT}")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if the file is not up to date")
    args = p.parse_args(argv)
    missing = [f"{names[0]}: {path}" for names, module in stage_sections() for path in missing_descriptions(
        module.Config)] + [f"pipeline config: {path}" for path in missing_descriptions(PipelineConfig)]
    if missing:
        print("fields without a description (add description= to their Field):\n  " + "\n  ".join(missing),
              file=sys.stderr)
        return 1
    text = render()
    current = args.output.read_text(encoding="utf-8") if args.output.exists() else None
    if args.check:
        if current != text:
            print(f"{args.output} is stale: run `python -m pipeline.reference` (make docs)", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    if current != text:
        tmp = args.output.with_name(args.output.name + ".tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(args.output)  # atomic: a reader never sees half a page
    print(f"wrote {args.output}" if current != text else f"{args.output} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
