"""Load ``config.yaml`` and check it against the workflow's JSON schema, filling in defaults.

Snakemake validates the same file with the same schema when it starts; the CLI commands that take
``--config`` call :func:`load_config` so a hand-run step sees exactly the values a rule would.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from preprocessing.errors import InputError

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"


def import_jsonschema() -> ModuleType:
    """``jsonschema``, imported without the optional ``rfc3987_syntax`` package.

    When that package is installed (here it comes with tiatoolbox's Jupyter dependencies),
    importing jsonschema builds its IRI grammars, about 3 s of CPU in every process that reads a
    config, every training job included. Our schema checks no IRI formats, so that one optional
    import is declined while jsonschema loads and allowed again afterwards. The Snakefile calls
    this before Snakemake's own ``validate``, as every Snakemake process (each cluster job re-reads
    the Snakefile) would pay the same.
    """
    if "jsonschema" in sys.modules:
        return sys.modules["jsonschema"]
    decline = "rfc3987_syntax" not in sys.modules
    if decline:
        sys.modules["rfc3987_syntax"] = None  # type: ignore[assignment]  # None makes the import fail
    try:
        import jsonschema
    finally:
        if decline:
            del sys.modules["rfc3987_syntax"]
    return jsonschema


def _with_defaults(validator_class: type) -> type:
    """A validator that also writes each property's ``default`` into the instance."""
    validate_props = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):  # noqa: ANN001 - jsonschema hook
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub and key not in instance:
                    instance[key] = sub["default"]
        yield from validate_props(validator, properties, instance, schema)

    return import_jsonschema().validators.extend(validator_class, {"properties": set_defaults})


def validate_config(config: dict[str, Any], source: str | Path = "config") -> dict[str, Any]:
    """Validate ``config`` in place (defaults added); raise InputError naming the offending key."""
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    validator = _with_defaults(import_jsonschema().Draft202012Validator)(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        raise InputError(source, f"config key {where}: {err.message}")
    return config


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file, validate it and return it with defaults filled in."""
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise InputError(path, f"cannot read config: {err}") from err
    return validate_config(config, path)
