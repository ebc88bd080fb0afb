"""The documentation stays true to the code: the configuration reference against the schema, the
README's length, and every relative link in README.md and docs/*.md."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
CONFIG_DOC = ROOT / "docs" / "configuration.md"
README = ROOT / "README.md"
README_MAX_LINES = 250
NO_DEFAULT = "—"  # the default cell of a key the schema gives no default (a cohort's entries)

# A row of a table in docs/configuration.md: | `dotted.key` | default | meaning |
KEY_ROW = re.compile(r"^\|\s*`([A-Za-z0-9_.<>]+)`\s*\|([^|]*)\|")
# A Markdown link or image: [text](target) with an optional "title"
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def schema_keys(node: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Every leaf key of the schema as ``section.key`` -> its default (``NO_DEFAULT`` if none).

    A section (an object with ``properties``) contributes its keys, not itself; a map of named
    entries (``cohorts``: ``additionalProperties`` with ``properties``) contributes ``cohorts.<name>.key``.
    """
    keys: dict[str, Any] = {}
    for name, sub in node.get("properties", {}).items():
        path = f"{prefix}{name}"
        entry = sub.get("additionalProperties")
        if "properties" in sub:
            keys |= schema_keys(sub, f"{path}.")
        elif isinstance(entry, dict) and "properties" in entry:
            keys |= schema_keys(entry, f"{path}.<name>.")
        else:
            keys[path] = sub.get("default", NO_DEFAULT)
    return keys


def documented_keys() -> dict[str, str]:
    """``dotted.key`` -> the text of its default cell, from every table row of the reference."""
    rows: dict[str, str] = {}
    for line in CONFIG_DOC.read_text(encoding="utf-8").splitlines():
        match = KEY_ROW.match(line)
        if match:
            key, default = match.group(1), match.group(2).strip()
            assert key not in rows, f"docs/configuration.md documents {key} twice"
            rows[key] = default
    return rows


def parse_default(cell: str) -> Any:
    """A default cell as a value: `0.0002` -> 0.0002, `[a, b]` -> list, `null` -> None, — -> NO_DEFAULT."""
    if cell == NO_DEFAULT:
        return NO_DEFAULT
    assert cell.startswith("`") and cell.endswith("`"), f"default {cell!r} is not one `code` span"
    return yaml.safe_load(cell.strip("`"))


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA.read_text(encoding="utf-8"))


def test_every_schema_key_is_documented(schema: dict[str, Any]) -> None:
    missing = sorted(set(schema_keys(schema)) - set(documented_keys()))
    assert not missing, f"config keys with no row in docs/configuration.md: {missing}"


def test_every_documented_key_is_in_the_schema(schema: dict[str, Any]) -> None:
    unknown = sorted(set(documented_keys()) - set(schema_keys(schema)))
    assert not unknown, f"docs/configuration.md documents keys the schema does not have: {unknown}"


def test_documented_defaults_are_the_schema_defaults(schema: dict[str, Any]) -> None:
    documented = documented_keys()
    wrong = {
        key: (documented[key], default)
        for key, default in schema_keys(schema).items()
        if key in documented and parse_default(documented[key]) != default
    }
    assert not wrong, f"defaults in docs/configuration.md differ from the schema (doc, schema): {wrong}"


def test_schema_key_walk_sees_nested_keys(schema: dict[str, Any]) -> None:
    keys = schema_keys(schema)
    assert {"training.lr", "healnet.depth", "cohorts.<name>.omics", "models", "outdir"} <= set(keys)
    assert "training" not in keys  # sections are headings, their keys the rows


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"


def markdown_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def relative_links(path: Path) -> list[str]:
    """Link targets in ``path`` that point into the repository (no scheme, no bare #anchor), outside
    fenced code blocks and inline code."""
    targets = []
    in_fence = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
                continue
            targets.append(target)
    return targets


@pytest.mark.parametrize("doc", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(doc: Path) -> None:
    broken = [t for t in relative_links(doc) if not (doc.parent / t.split("#", 1)[0]).exists()]
    assert not broken, f"{doc.relative_to(ROOT)} links to missing files: {broken}"


def test_docs_exist_and_link_checker_finds_links() -> None:
    for name in ("configuration.md", "omics-tables.md", "models-and-evaluation.md", "design.md"):
        assert (ROOT / "docs" / name).is_file(), f"docs/{name} is missing"
    links = relative_links(README)
    assert "docs/configuration.md" in links and "benchmarks/FINDINGS.md" in links
