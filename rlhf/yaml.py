"""YAML read as written, and bounded: PyYAML's safe loader, with `2e-5` and `1e3` read as numbers (YAML 1.1 wants
`2.0e-5`), and a document whose aliases expand past MAX_YAML_VALUES refused (an alias bomb). Errors name the file.

    data = load_yaml("configs/tiny.yaml")
    value = load_yaml_text("2e-5", "--set optim.lr")
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from rlhf.errors import UsageError


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `2e-5` and `1e3` as numbers (PyYAML follows YAML 1.1, which wants `2.0e-5`), and
    refuses a key given twice in one mapping (PyYAML keeps the last one silently: a second `optim:` pasted into a
    stage would drop the first one's settings without a word)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` merges are YAML's way to override on purpose
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"found the key {key!r} twice (first on line {seen[key].line + 1}); keep one", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


# YAML aliases share one value between places (`&a [...]`, then `*a`), so a short document can stand for a huge
# one (`b: [*a, *a, ...]`, `c: [*b, *b, ...]`: tenfold per level). Anything that walks the value (validation
# messages, hashes, dumps) pays for the whole expansion, so a document larger than this once expanded is refused.
MAX_YAML_VALUES = 100_000


def _expanded_size(value: Any, source: str) -> int:
    """How many values `value` holds once every alias is expanded (each shared node is counted once per use,
    measured once); a value that contains itself (`&a [*a]`) is refused."""
    sizes: dict[int, int | None] = {}  # id -> size; None while that node is being measured (a cycle if met again)

    def size(v: Any) -> int:
        if not isinstance(v, (list, dict)):
            return 1
        key = id(v)
        if key in sizes:
            if sizes[key] is None:
                raise UsageError(f"{source}: a YAML alias refers to a value that contains it; write the value out")
            return sizes[key]
        sizes[key] = None
        children = list(v.keys()) + list(v.values()) if isinstance(v, dict) else v
        total = 1 + sum(size(c) for c in children)
        sizes[key] = total
        return total

    return size(value)


def load_yaml_text(text: str, source: str) -> Any:
    try:
        value = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise UsageError(f"{source}: not valid YAML: {exc}") from None
    except RecursionError:
        raise UsageError(f"{source}: nested too deeply to read") from None
    if _expanded_size(value, source) > MAX_YAML_VALUES:
        raise UsageError(f"{source}: holds more than {MAX_YAML_VALUES:,} values once its YAML aliases (*name) are "
                         "expanded; a config that size is a mistake or an alias bomb: write the values out")
    return value


def load_yaml(path: str | Path) -> Any:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{p}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{p}: cannot read config: {exc}") from None
    return load_yaml_text(text, str(p))
