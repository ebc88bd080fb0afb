"""Load ``config.yaml`` and check it against the workflow's JSON schema, filling in defaults.

Snakemake validates the same file with the same schema when it starts; the CLI commands that take
``--config`` call :func:`load_config` so a hand-run step sees exactly the values a rule would.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from preprocessing.core.errors import InputError

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"

# The command-line words for training.bags_on_device's values (`--bags-on-device`), and back.
BAGS_ON_DEVICE_WORDS: dict[str, bool | str] = {"yes": True, "no": False, "auto": "auto"}
BAGS_ON_DEVICE_SETTING_WORDS = {value: word for word, value in BAGS_ON_DEVICE_WORDS.items()}
# A decimal number with an exponent but no dot ("1e-5"): YAML 1.1 reads it as text, JSON and
# YAML 1.2 as a number. Python's json writes floats below 1e-4 this way ("1e-05").
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$")


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that ``1e-5`` is a float (YAML 1.1 would make it a string)."""


ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))


def import_jsonschema() -> ModuleType:
    """``jsonschema``, imported without the optional ``rfc3987_syntax`` package.

    When that package is installed (here it comes with tiatoolbox's Jupyter dependencies),
    importing jsonschema builds its IRI grammars, seconds of CPU in every process that reads a
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


def numbers_from_strings(config: dict[str, Any], schema: dict[str, Any] | None = None) -> None:
    """Turn strings such as ``"1e-4"`` into floats where the schema asks for a number, and whole
    floats such as ``100.0`` or ``"1e2"`` into ints where it asks for an integer, in place.

    Snakemake reads config files and ``--config`` values as YAML 1.1, in which an exponent without
    a dot is text, so ``lr: 1e-4`` would otherwise fail validation as "not of type number". JSON
    Schema counts ``100.0`` as an integer, so ``epochs: 100.0`` would pass and then fail inside
    training (``range(100.0)``) with a traceback that names no setting. Only decimal numbers are
    converted; anything else is left for the validator to report.
    """
    if schema is None:
        schema = yaml.safe_load(SCHEMA_PATH.read_text())
    if not isinstance(config, dict):
        return
    for key, prop in schema.get("properties", {}).items():
        value = config.get(key)
        types = prop.get("type", [])
        kinds = [types] if isinstance(types, str) else types
        wants_integer = "integer" in kinds and "number" not in kinds
        numeric_text = isinstance(value, str) and _EXPONENT_FLOAT.match(value.strip())
        if ("number" in kinds or wants_integer) and numeric_text:
            config[key] = value = float(value)
        if wants_integer and isinstance(value, float) and value.is_integer():
            config[key] = int(value)
        elif isinstance(value, dict):
            numbers_from_strings(value, prop)


def check_finite(config: Any, source: str | Path = "config", where: str = "") -> None:
    """InputError naming the first key whose value is NaN or infinite (YAML's ``.nan``, ``.inf``).

    JSON Schema's bounds are comparisons, which NaN passes, so ``lr: .nan`` would otherwise reach
    the optimiser, and ``alpha: .nan`` would train to NaN risks and exit 0.
    """
    if isinstance(config, dict):
        items: Any = config.items()
    else:
        items = enumerate(config) if isinstance(config, list) else ()
    for key, value in items:
        name = f"{where}.{key}" if where else str(key)
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(source, f"config key {name}: {value} is not a finite number")
        check_finite(value, source, name)


def in_schema_order(config: dict[str, Any], schema: dict[str, Any] | None = None) -> None:
    """Reorder every section's keys to the schema's order, in place.

    Snakemake reruns a job whose params changed, and it compares a section passed as a param by its
    text, in which key order counts. Validation appends the defaults a file leaves out after the
    keys it has, so without this a file that lists keys in another order, or writes out a default,
    would re-tile and re-extract every slide although no value changed. The schema's order is that
    of the shipped ``config.yaml``, so its runs made before this reorder see the same params; a
    config file in another order sees its params change once.
    """
    if schema is None:
        schema = yaml.safe_load(SCHEMA_PATH.read_text())
    for key, prop in schema.get("properties", {}).items():
        if key in config:
            value = config.pop(key)
            config[key] = value
            if isinstance(value, dict):
                in_schema_order(value, prop)


def validate_config(config: dict[str, Any], source: str | Path = "config") -> dict[str, Any]:
    """Validate ``config`` in place (defaults added); raise InputError naming the offending key."""
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    numbers_from_strings(config, schema)
    check_finite(config, source)
    validator = _with_defaults(import_jsonschema().Draft202012Validator)(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        raise InputError(source, f"config key {where}: {err.message}")
    in_schema_order(config, schema)
    return config


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML (or JSON) config file, validate it and return it with defaults filled in."""
    path = Path(path)
    try:
        config = yaml.load(path.read_text(), Loader=ConfigLoader) or {}  # noqa: S506 - a SafeLoader
    except (OSError, yaml.YAMLError) as err:
        where = getattr(err, "problem_mark", None)
        why = getattr(err, "problem", None) or " ".join(str(err).split())
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        raise InputError(path, f"cannot read config: {why}{at}") from err
    return validate_config(config, path)


def configured_encoders(extract: dict[str, Any]) -> list[str]:
    """The encoders a run extracts with: ``extract.encoders``, or ``[extract.encoder]`` when unset."""
    return list(extract.get("encoders") or [extract["encoder"]])


def encoder_weights(extract: dict[str, Any], encoder: str) -> str | None:
    """The weights file or folder ``extract.weights`` gives ``encoder`` (None: its default source).

    One path serves a run with one encoder; with several, ``weights`` must map encoder names to paths
    (a single path would be loaded into every architecture). ValueError otherwise.
    """
    weights = extract["weights"]
    if isinstance(weights, dict):
        unknown = sorted(set(weights) - set(configured_encoders(extract)))
        if unknown:
            raise ValueError(f"config key extract.weights names {', '.join(unknown)}, "
                             "which extract.encoders does not list")
        return weights.get(encoder)
    if weights and len(configured_encoders(extract)) > 1:
        raise ValueError("config key extract.weights: one file for several encoders; give a map "
                         "{encoder: file}, e.g. {uni: /models/uni}")
    return weights or None


def tiles_geometry(config: dict[str, Any], encoder: str) -> str:
    """The tiles folder name (e.g. ``224px_0.5mpp``) of ``encoder``'s patch grid: its registry geometry,
    with ``tiling.patch_size`` / ``tiling.target_mpp`` replacing each part the config sets."""
    from preprocessing.features.registry import patch_geometry
    from preprocessing.tiling.tiles import geometry_name

    tiling = config["tiling"]
    return geometry_name(*patch_geometry(encoder, tiling["patch_size"], tiling["target_mpp"]))
