"""Write docs/settings.md from setting.py's comments: python3 -m tools.settings_doc [--check]

Names, variables, types and defaults come from laion5b.config (the code that reads setting.py); meanings and sections
come from setting.py's comments, so a setting is documented where it is defined and nowhere else.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import io
import sys
import tokenize
from pathlib import Path
from types import ModuleType
from typing import Any

from laion5b import config

ROOT = Path(__file__).resolve().parent.parent
SETTING = ROOT / "setting.py"
TARGET = ROOT / "docs" / "settings.md"
COMMAND = "python3 -m tools.settings_doc"
SECTION_MARK = "# ---"


class UndocumentedSetting(ValueError):
    """A setting of laion5b.config.Config has no value or no comment in setting.py."""


def _comments(source: str) -> dict[int, str]:
    """Every comment of ``source`` by line number, without its leading ``#``."""
    found = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            found[token.start[0]] = token.string
    return found


def _meaning(line: int, comments: dict[int, str], lines: list[str]) -> str:
    """The comment after line ``line``'s value, joined with the comment-only lines that continue it."""
    parts = [comments[line].lstrip("#").strip()] if line in comments else []
    following = line + 1
    while following in comments and lines[following - 1].lstrip().startswith("#"):
        if lines[following - 1].lstrip().startswith(SECTION_MARK):
            break
        parts.append(comments[following].lstrip("#").strip())
        following += 1
    return " ".join(part for part in parts if part)


def _default(value: Any) -> str:
    """A converted default as the table shows it."""
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list):
        return f"`{','.join(value)}`" if value else "empty"
    if value == "":
        return "empty"
    return f"`{value}`"


def _kind(kind: Any) -> str:
    return "list" if kind == list[str] else kind.__name__


def _settings(tree: ast.Module) -> dict[str, int]:
    """Each module-level assignment of setting.py: name -> line."""
    return {
        node.targets[0].id: node.lineno
        for node in tree.body
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
    }


def _redis_keys(tree: ast.Module, comments: dict[int, str], lines: list[str]) -> list[str]:
    """The rows of the RedisKey table: attribute, default name, meaning."""
    rows = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "RedisKey":
            for item in node.body:
                if isinstance(item, ast.Assign) and isinstance(item.value, ast.Constant):
                    name = item.targets[0].id  # type: ignore[attr-defined]
                    meaning = _meaning(item.lineno, comments, lines)
                    rows.append(f"| `{name}` | `{item.value.value}` | {meaning} |")
    return rows


def _table_header() -> list[str]:
    return ["| setting | variable | type | default | meaning |", "| --- | --- | --- | --- | --- |"]


def load_setting() -> ModuleType:
    """setting.py, imported from its path (the values, as laion5b.config reads them)."""
    spec = importlib.util.spec_from_file_location("setting", SETTING)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def render(source: str, values: ModuleType) -> str:
    """docs/settings.md for the text of setting.py (its comments) and the imported module (its values)."""
    tree = ast.parse(source)
    comments = _comments(source)
    lines = source.splitlines()
    assigned = _settings(tree)
    kinds = config.setting_types()
    missing = [name for name in kinds if name not in assigned or not _meaning(assigned[name], comments, lines)]
    if missing:
        raise UndocumentedSetting(f"settings without a value and a comment in setting.py: {', '.join(missing)}")
    out = [
        "# Settings",
        "",
        f"<!-- Generated from setting.py by `{COMMAND}`; edit setting.py's comments, not this file. -->",
        "",
        ast.get_docstring(tree) or "",
    ]
    by_line = sorted((line, name) for name, line in assigned.items() if name in kinds)
    sections = {number: text for number, text in comments.items() if text.startswith(SECTION_MARK)}
    section_lines = sorted(sections)
    current = None
    for line, name in by_line:
        heading = max((number for number in section_lines if number < line), default=None)
        if heading != current:
            current = heading
            title = sections[heading].strip("#- ").strip() if heading else "Other"
            out += ["", f"## {title}", "", *_table_header()]
        value = config.convert_setting(name, getattr(values, name), kinds[name])
        meaning = _meaning(line, comments, lines).replace("|", "\\|")
        out.append(
            f"| `{name}` | `{config.env_variable(name)}` | {_kind(kinds[name])} | {_default(value)} | {meaning} |"
        )
    redis_class = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "RedisKey")
    out += [
        "",
        "## Redis key names",
        "",
        (ast.get_docstring(redis_class) or "").replace("\n", " "),
        "",
        "| `RedisKey` attribute | key | meaning |",
        "| --- | --- | --- |",
        *_redis_keys(tree, comments, lines),
    ]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/settings.md is not up to date")
    args = parser.parse_args(argv)
    text = render(SETTING.read_text(encoding="utf-8"), load_setting())
    if args.check:
        current = TARGET.read_text(encoding="utf-8") if TARGET.exists() else ""
        if current != text:
            print(f"{TARGET.relative_to(ROOT)} is out of date: run {COMMAND}", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text, encoding="utf-8")
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
