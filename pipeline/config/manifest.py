"""Load and validate ``data_manifest.yaml``; apply command-line overrides.

The JSON Schema is assembled from ``schemas/manifest/base.schema.json`` and one
``schemas/manifest/stage.<name>.schema.json`` per stage (each stage owns its parameter block).
Errors name the file, the key path and what was expected, e.g.::

    data_manifest.yaml: stages.ingest.shard_size: expected integer, got 'big'
"""

from __future__ import annotations

import copy
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from pipeline.config.data import data_root
from pipeline.config.schemas import SCHEMA_DIR

DEFAULT_MANIFEST = data_root() / "data_manifest.yaml"
MANIFEST_SCHEMA_DIR = SCHEMA_DIR / "manifest"


class ManifestError(ValueError):
    """The manifest (or an override) is invalid; the message names the key path."""


@functools.lru_cache(maxsize=1)
def manifest_json_schema() -> dict:
    with open(MANIFEST_SCHEMA_DIR / "base.schema.json", encoding="utf-8") as f:
        schema = json.load(f)
    stages = schema["properties"]["stages"]["properties"]
    for p in sorted(MANIFEST_SCHEMA_DIR.glob("stage.*.schema.json")):
        name = p.name[len("stage.") : -len(".schema.json")]
        with open(p, encoding="utf-8") as f:
            stages[name] = json.load(f)
    return schema


def _with_defaults(value: Any, schema: dict) -> Any:
    if not isinstance(value, dict) or schema.get("type") != "object":
        return value
    for key, sub in (schema.get("properties") or {}).items():
        if key not in value and "default" in sub:
            value[key] = copy.deepcopy(sub["default"])
        if key in value:
            value[key] = _with_defaults(value[key], sub)
    return value


def _path_str(path: Any) -> str:
    parts: list[str] = []
    for p in path:
        parts.append(f"[{p}]" if isinstance(p, int) else (("." if parts else "") + str(p)))
    return "".join(parts) or "<top level>"


def _describe(err: jsonschema.ValidationError) -> str:
    v = err.validator
    inst = err.instance
    if v == "type":
        return f"expected {err.validator_value if isinstance(err.validator_value, str) else ' or '.join(err.validator_value)}, got {inst!r} ({type(inst).__name__})"
    if v == "additionalProperties":
        allowed = sorted((err.schema.get("properties") or {}).keys())
        extra = sorted(set(inst) - set(allowed)) if isinstance(inst, dict) else []
        return f"unknown key(s) {extra}; allowed: {allowed}"
    if v == "required":
        return err.message.replace("is a required property", "is required but missing")
    if v == "enum":
        return f"expected one of {err.validator_value}, got {inst!r}"
    if v == "const":
        why = f" ({err.schema['description']})" if err.schema.get("description") else ""
        return f"expected {json.dumps(err.validator_value)}{why}, got {json.dumps(inst, default=repr)}"
    if v == "pattern":
        return f"expected {err.schema.get('description') or 'a match of ' + repr(err.validator_value)}, got {inst!r}"
    return err.message


def _non_finite(value: Any, path: tuple = ()) -> list[tuple[tuple, float]]:
    """Every NaN or infinite number in a YAML document, with its key path. JSON Schema cannot refuse
    them: ``minimum``/``maximum`` comparisons with NaN are false, so NaN passes every bound."""
    if isinstance(value, float) and not math.isfinite(value):
        return [(path, value)]
    if isinstance(value, dict):
        return [hit for k, v in value.items() for hit in _non_finite(v, (*path, k))]
    if isinstance(value, list):
        return [hit for i, v in enumerate(value) for hit in _non_finite(v, (*path, i))]
    return []


def validate(data: Any, source: str = "manifest") -> None:
    validator = jsonschema.Draft202012Validator(manifest_json_schema())
    errors = sorted(
        validator.iter_errors(data), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path)))
    )
    lines = [f"{source}: {_path_str(p)}: expected a finite number, got {v}" for p, v in _non_finite(data)]
    if errors or lines:
        lines += [f"{source}: {_path_str(e.absolute_path)}: {_describe(e)}" for e in errors[:10]]
        more = f"\n  … and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise ManifestError("invalid manifest:\n  " + "\n  ".join(lines) + more)


def _set_dotted(data: dict, dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node = data
    for i, k in enumerate(keys[:-1]):
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise ManifestError(f"{source}: {'.'.join(keys[: i + 1])} is not a mapping; cannot set {dotted}")
        node = nxt
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``stages.fit.max_iterations=10`` -> ("stages.fit.max_iterations", 10) (value parsed as YAML)."""
    if "=" not in text:
        raise ManifestError(f"--set {text!r}: expected KEY.PATH=VALUE")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ManifestError(f"--set {text!r}: value is not valid YAML ({exc})") from None
    return key.strip(), value


@dataclass
class Manifest:
    data: dict
    path: str = "<defaults>"
    overrides: dict[str, Any] = field(default_factory=dict)

    def get(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.data
        for k in dotted.split("."):
            if not isinstance(node, dict) or k not in node:
                return default
            node = node[k]
        return node

    def stage_params(self, stage: str) -> dict:
        """``stages.<stage>`` with the defaults declared in its schema filled in."""
        given = copy.deepcopy(self.data.get("stages", {}).get(stage, {}))
        schema = manifest_json_schema()["properties"]["stages"]["properties"].get(stage, {})
        return _with_defaults(given, schema)

    def dataset(self, name: str) -> dict:
        ds = self.data["datasets"].get(name)
        if ds is None:
            raise ManifestError(
                f"{self.path}: datasets.{name}: no such dataset (have {sorted(self.data['datasets'])})"
            )
        return ds

    def model(self, name: str) -> dict:
        m = self.data["models"].get(name)
        if m is None:
            raise ManifestError(
                f"{self.path}: models.{name}: no such model asset (have {sorted(self.data['models'])})"
            )
        return m

    @property
    def cache_dir(self) -> Path:
        c = self.data.get("cache_dir")
        return Path(c).expanduser() if c else Path.home() / ".cache" / "morphset"

    def with_overrides(self, overrides: dict[str, Any]) -> Manifest:
        data = copy.deepcopy(self.data)
        for k, v in overrides.items():
            _set_dotted(data, k, v, "command line")
        validate(data, f"{self.path} (with command-line overrides)")
        return Manifest(data, self.path, {**self.overrides, **overrides})


def overlay(base: Any, top: Any) -> Any:
    """``top`` over ``base``: mappings merge key by key (recursively); anything else in ``top``
    (a list, a scalar, null) replaces what ``base`` had."""
    if isinstance(base, dict) and isinstance(top, dict):
        out = dict(base)
        for k, v in top.items():
            out[k] = overlay(base[k], v) if k in base else v
        return out
    return top


def load_manifest(
    path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None
) -> Manifest:
    """Read, override, validate. ``overrides``: ``["a.b=1", ...]`` or ``{"a.b": 1}``."""
    p = Path(path) if path else DEFAULT_MANIFEST
    if not p.is_file():
        raise ManifestError(f"{p}: manifest file not found")
    try:
        with open(p, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        raise ManifestError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    if p.resolve() != DEFAULT_MANIFEST.resolve() and DEFAULT_MANIFEST.is_file():
        # a user's manifest overlays the packaged one: it needs only what it changes
        with open(DEFAULT_MANIFEST, encoding="utf-8") as f:
            data = overlay(yaml.safe_load(f), data)
    validate(data, str(p))
    m = Manifest(data, str(p))
    if overrides:
        pairs = dict(parse_override(o) for o in overrides) if isinstance(overrides, list) else dict(overrides)
        m = m.with_overrides(pairs)
    return m
