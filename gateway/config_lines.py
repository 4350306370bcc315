"""Where a settings key sits in a TOML or YAML config file, so errors can name its line.

pydantic reports *which* key is wrong (``("models", 1, "quantize")``) but not *where*: the parsed
data has no positions.  YAML keeps them (``yaml.compose`` gives every node a start mark); for TOML
the standard library's ``tomllib`` does not, so :func:`toml_key_lines` scans the text, tracking the
current ``[table]`` / ``[[array of tables]]`` header, which covers the flat layout config files use.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

KeyPath = tuple[str | int, ...]

_TOML_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_TOML_KEY = re.compile(r"""^\s*("[^"]*"|'[^']*'|[A-Za-z0-9_.-]+)\s*=""")


def _toml_key(raw: str) -> tuple[str, ...]:
    raw = raw.strip()
    if len(raw) >= 2 and raw[0] in "\"'" and raw[-1] == raw[0] and raw.count(raw[0]) == 2:
        return (raw[1:-1],)  # one quoted key may hold dots
    return tuple(part.strip().strip("\"'") for part in raw.split("."))


def toml_key_lines(text: str) -> dict[KeyPath, int]:
    """Map each key path of a TOML document to its 1-based line (headers included)."""
    lines: dict[KeyPath, int] = {}
    table: KeyPath = ()
    counts: dict[tuple[str, ...], int] = {}
    in_multiline = False
    for number, line in enumerate(text.splitlines(), start=1):
        # Skip the body of multi-line strings (a line inside one may look like a key).
        if in_multiline:
            if line.count('"""') % 2 == 1 or line.count("'''") % 2 == 1:
                in_multiline = False
            continue
        header = _TOML_HEADER.match(line)
        if header:
            name = _toml_key(header.group(2))
            # A prefix naming an array of tables means its latest element ([models.defaults]
            # after [[models]] is the defaults of the last model), as TOML defines it.
            table = ()
            for depth in range(1, len(name)):
                table = (*table, name[depth - 1])
                if name[:depth] in counts:
                    table = (*table, counts[name[:depth]] - 1)
            table = (*table, name[-1])
            if header.group(1) == "[[":
                index = counts.get(name, 0)
                counts[name] = index + 1
                table = (*table, index)
            lines.setdefault(table, number)
            continue
        key = _TOML_KEY.match(line)
        if key:
            lines.setdefault((*table, *_toml_key(key.group(1))), number)
            if line.count('"""') % 2 == 1 or line.count("'''") % 2 == 1:
                in_multiline = True
    return lines


def yaml_key_lines(text: str) -> dict[KeyPath, int]:
    """Map each key path (and list item) of a YAML document to its 1-based line."""
    import yaml

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    lines: dict[KeyPath, int] = {}

    def walk(node: yaml.Node, path: KeyPath) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                child = (*path, str(key_node.value))
                lines.setdefault(child, key_node.start_mark.line + 1)
                walk(value_node, child)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                child = (*path, index)
                lines.setdefault(child, item.start_mark.line + 1)
                walk(item, child)

    if root is not None:
        walk(root, ())
    return lines


def key_lines(text: str, suffix: str) -> dict[KeyPath, int]:
    return toml_key_lines(text) if suffix == ".toml" else yaml_key_lines(text)


def line_of(lines: dict[KeyPath, int], loc: Sequence[str | int]) -> int | None:
    """The line of ``loc`` or of its longest prefix present in the file (an inline table's
    inner key is reported at the line of the table); None when no part of it is in the file."""
    path = tuple(loc)
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return None
