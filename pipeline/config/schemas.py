"""Load the versioned Arrow schemas declared as data in ``schemas/<name>.yaml``.

Every column of every stage output is declared exactly once, there. A schema file looks like::

    name: detections
    version: 1
    doc: one row per image ...
    columns:
      - {name: image_id, type: string, nullable: false, doc: path relative to the dataset root}
      - {name: boxes, type: "list<list<float32>[4]>", doc: all boxes x0 y0 x1 y1}

Type grammar: ``string | binary | bool | int8..int64 | uint8..uint64 | float16 | float32 | float64
| list<T> | list<T>[n]`` (fixed-size list), nested freely.

A schema may start with another's columns (``extends: fits``): its table is also one of that
schema (:meth:`StageSchema.is_a`), so a stage reading that schema reads it too.

Writers call :func:`conform` (refuses a table whose columns or types differ); readers call
:func:`check_version` on the Parquet key-value metadata (refuses a version mismatch, naming both).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import yaml

from pipeline.config.data import data_root

if TYPE_CHECKING:
    from pipeline.landmarks.scheme import LandmarkScheme

SCHEMA_DIR = data_root() / "schemas"
META_SCHEMA_NAME = b"morphset.schema"
META_SCHEMA_VERSION = b"morphset.schema_version"
FIELD_DOC = b"morphset.doc"  # Arrow field metadata: the column's meaning (from schemas/<name>.yaml)
FIELD_UNIT = b"morphset.unit"  # and its unit, where it has one
# and, for landmark columns, the landmark scheme its points follow (pipeline/landmarks/schemes/)
FIELD_SCHEME = b"morphset.landmark_scheme"


class SchemaError(ValueError):
    """A table or file does not match its declared schema."""


_PRIMITIVES = {
    "string": pa.string(),
    "binary": pa.binary(),
    "bool": pa.bool_(),
    "int8": pa.int8(),
    "int16": pa.int16(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "uint8": pa.uint8(),
    "uint16": pa.uint16(),
    "uint32": pa.uint32(),
    "uint64": pa.uint64(),
    "float16": pa.float16(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    # an encoded image as Hugging Face datasets stores one (its Image feature): the file's bytes
    # and an optional path
    "image": pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
}
_LIST_RE = re.compile(r"^list<(?P<inner>.+)>(\[(?P<size>\d+)\])?$")


def parse_type(text: str) -> pa.DataType:
    """Parse the schema files' type grammar into an Arrow type."""
    t = text.strip()
    if t in _PRIMITIVES:
        return _PRIMITIVES[t]
    m = _LIST_RE.match(t)
    if not m:
        raise SchemaError(f"unknown column type {text!r}")
    inner = parse_type(m.group("inner"))
    if m.group("size"):
        return pa.list_(inner, int(m.group("size")))
    return pa.list_(inner)


@dataclass(frozen=True)
class StageSchema:
    name: str
    version: int
    doc: str
    arrow: pa.Schema  # with the name/version in its metadata
    docs: dict[str, str]
    # one data file per value of this column in each shard (``files_by: {column, values}``)
    files_by: str | None = None
    file_values: tuple[str, ...] = ()
    # columns declared ``nullable: false``: a null is refused on write even where the Arrow field
    # is stored nullable (``arrow_nullable: true``)
    required: frozenset[str] = frozenset()
    # the schema whose columns this one starts with (``extends: fits``): a table of this schema
    # is also one of that schema, plus its own columns (a refinement's fits)
    extends: str | None = None

    def is_a(self, name: str) -> bool:
        """This schema is ``name`` or starts with its columns."""
        return self.name == name or (self.extends is not None and load_schema(self.extends).is_a(name))

    @property
    def columns(self) -> list[str]:
        return list(self.arrow.names)

    def empty_table(self) -> pa.Table:
        return self.arrow.empty_table()

    def metadata(self, extra: dict[str, str] | None = None) -> dict[bytes, bytes]:
        md = dict(self.arrow.metadata or {})
        for k, v in (extra or {}).items():
            md[k.encode()] = str(v).encode()
        return md


def _schema_path(name: str) -> Path:
    return SCHEMA_DIR / f"{name}.yaml"


@functools.cache
def load_schema(name: str) -> StageSchema:
    """Load ``schemas/<name>.yaml``; errors name the file and the offending key."""
    path = _schema_path(name)
    if not path.is_file():
        known = sorted(p.stem for p in SCHEMA_DIR.glob("*.yaml"))
        raise SchemaError(f"{path}: no such schema (known: {', '.join(known)})")
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    if not isinstance(raw, dict) or raw.get("name") != name:
        raise SchemaError(f"{path}: expected a mapping with 'name: {name}'")
    version = raw.get("version")
    if not isinstance(version, int) or version < 1:
        raise SchemaError(f"{path}: 'version' must be a positive integer, got {version!r}")
    cols = raw.get("columns")
    if not isinstance(cols, list) or not cols:
        raise SchemaError(f"{path}: 'columns' must be a non-empty list")
    fields, docs, seen, required = [], {}, set(), set()
    extends = raw.get("extends")
    if extends is not None:
        if not isinstance(extends, str) or extends == name:
            raise SchemaError(f"{path}: 'extends' must name another schema, got {extends!r}")
        base = load_schema(extends)
        fields = [base.arrow.field(c) for c in base.columns]
        docs, seen, required = dict(base.docs), set(base.columns), set(base.required)
    # Hugging Face datasets applies a file's features metadata only to nullable fields: a schema
    # handed to it stores every field nullable and keeps its non-null checks here
    arrow_nullable = bool(raw.get("arrow_nullable", False))
    for i, col in enumerate(cols):
        where = f"{path}: columns[{i}]"
        if not isinstance(col, dict) or "name" not in col or "type" not in col:
            raise SchemaError(f"{where}: expected a mapping with 'name' and 'type'")
        unknown = set(col) - {"name", "type", "nullable", "doc", "unit", "scheme"}
        if unknown:
            raise SchemaError(
                f"{where}: unknown keys {sorted(unknown)} (allowed: name, type, nullable, doc, unit, scheme)"
            )
        cname = col["name"]
        if cname in seen:
            also = (
                f" (schema {extends!r} declares it)" if extends and cname in load_schema(extends).docs else ""
            )
            raise SchemaError(f"{where}: column {cname!r} declared twice{also}")
        seen.add(cname)
        try:
            typ = parse_type(str(col["type"]))
        except SchemaError as exc:
            raise SchemaError(f"{where} ({cname}): {exc}") from None
        docs[cname] = str(col.get("doc", ""))
        # what a column means (and its unit) travels with the data: any Parquet reader shows it
        field_md = {FIELD_DOC: docs[cname].encode()}
        if col.get("unit"):
            field_md[FIELD_UNIT] = str(col["unit"]).encode()
        if col.get("scheme"):
            _check_scheme_size(str(col["scheme"]), typ, f"{where} ({cname})")
            field_md[FIELD_SCHEME] = str(col["scheme"]).encode()
        nullable = bool(col.get("nullable", True))
        if not nullable:
            required.add(cname)
        fields.append(pa.field(cname, typ, nullable=nullable or arrow_nullable, metadata=field_md))
    md = {META_SCHEMA_NAME: name.encode(), META_SCHEMA_VERSION: str(version).encode()}
    files_by, file_values = _files_by(raw.get("files_by"), path, fields, required)
    return StageSchema(
        name,
        version,
        str(raw.get("doc", "")),
        pa.schema(fields, metadata=md),
        docs,
        files_by,
        file_values,
        frozenset(required),
        extends,
    )


def _files_by(
    raw: object, path: Path, fields: list[pa.Field], required: set[str]
) -> tuple[str | None, tuple[str, ...]]:
    if raw is None:
        return None, ()
    where = f"{path}: files_by"
    if not isinstance(raw, dict) or set(raw) != {"column", "values"}:
        raise SchemaError(f"{where}: expected a mapping with 'column' and 'values'")
    column, values = raw["column"], raw["values"]
    field = next((f for f in fields if f.name == column), None)
    if field is None or not pa.types.is_string(field.type) or column not in required:
        raise SchemaError(f"{where}: {column!r} must be a declared non-nullable string column")
    if (
        not isinstance(values, list)
        or not values
        or not all(isinstance(v, str) and v.isidentifier() for v in values)
    ):
        raise SchemaError(f"{where}: 'values' must be a non-empty list of identifiers")
    return column, tuple(values)


def all_schema_names() -> list[str]:
    return sorted(p.stem for p in SCHEMA_DIR.glob("*.yaml") if p.stem != "manifest")


def conform(table: pa.Table, schema: StageSchema, extra_metadata: dict[str, str] | None = None) -> pa.Table:
    """Return ``table`` with exactly the declared columns, order and types, or raise.

    Column order is normalised; a missing or unexpected column, a type that differs from the
    declaration, or a null in a non-nullable column is refused.
    """
    want = schema.arrow
    have = set(table.column_names)
    missing = [n for n in want.names if n not in have]
    extra = sorted(have - set(want.names))
    if missing or extra:
        raise SchemaError(
            f"table for schema {schema.name!r} v{schema.version}: missing columns {missing}, unexpected columns {extra}"
        )
    cols = []
    for f in want:
        col = table.column(f.name)
        if not col.type.equals(f.type):
            # Accept a null-typed column (all rows null) and exact-safe casts of the same kind.
            if pa.types.is_null(col.type):
                col = pa.nulls(len(table), f.type)
            else:
                raise SchemaError(
                    f"table for schema {schema.name!r} v{schema.version}: column {f.name!r} has type {col.type}, declared {f.type}"
                )
        if f.name in schema.required and col.null_count:
            raise SchemaError(
                f"table for schema {schema.name!r} v{schema.version}: column {f.name!r} is not nullable but has {col.null_count} nulls"
            )
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=want.with_metadata(schema.metadata(extra_metadata)))


def _check_scheme_size(scheme_name: str, typ: pa.DataType, where: str) -> None:
    """A landmark column holds 1, 2 or 3 values per point of its scheme (a flag, x y, x y z)."""
    from pipeline.landmarks.scheme import SchemeError, load_scheme

    try:
        points = load_scheme(scheme_name).points
    except SchemeError as exc:
        raise SchemaError(f"{where}: {exc}") from None
    size = getattr(typ, "list_size", None)
    if size not in (points, 2 * points, 3 * points):
        raise SchemaError(
            f"{where}: a column of landmark scheme {scheme_name!r} ({points} points) must be a fixed-size "
            f"list of {points}, {2 * points} or {3 * points} values, got {typ}"
        )


def column_scheme(schema: pa.Schema, column: str) -> LandmarkScheme:
    """The landmark scheme the points of ``column`` follow (its field metadata; a column without
    one, as in tables made by hand, is iBUG-68, the scheme of the shipped detectors)."""
    from pipeline.landmarks.scheme import IBUG68, SchemeError, load_scheme

    name = (schema.field(column).metadata or {}).get(FIELD_SCHEME)
    if name is None:
        return IBUG68
    try:
        return load_scheme(name.decode())
    except SchemeError as exc:
        raise SchemaError(f"column {column!r}: {exc}") from None


def check_version(
    metadata: dict[bytes, bytes] | None, schema: StageSchema, where: str, arrow: pa.Schema | None = None
) -> None:
    """Refuse a file whose stored schema name/version differ from the declared one, or (given the
    file's ``arrow`` schema) whose landmark columns follow another landmark scheme."""
    if arrow is not None:
        for field in schema.arrow:
            want = (field.metadata or {}).get(FIELD_SCHEME)
            if want is None or field.name not in arrow.names:
                continue
            got = (arrow.field(field.name).metadata or {}).get(FIELD_SCHEME)
            if got is not None and got != want:
                raise SchemaError(
                    f"{where}: column {field.name!r} holds landmarks of scheme {got.decode()!r}; this run "
                    f"reads scheme {want.decode()!r}: a run does not mix landmark schemes"
                )
    md = metadata or {}
    name = md.get(META_SCHEMA_NAME, b"").decode() or None
    ver = md.get(META_SCHEMA_VERSION, b"").decode() or None
    if name != schema.name or ver != str(schema.version):
        raise SchemaError(
            f"{where}: written with schema {name or '<none>'} v{ver or '<none>'}, "
            f"this morphset reads {schema.name} v{schema.version}; rebuild the stage (mode overwrite)"
        )


def from_rows(
    rows: list[dict], schema: StageSchema, extra_metadata: dict[str, str] | None = None
) -> pa.Table:
    """Build a conforming table from a list of row dicts (missing nullable keys become null)."""
    if not rows:
        return conform(schema.empty_table(), schema, extra_metadata)
    unknown = set().union(*(r.keys() for r in rows)) - set(schema.arrow.names)
    if unknown:
        raise SchemaError(f"rows for schema {schema.name!r}: unexpected keys {sorted(unknown)}")
    arrays = []
    for f in schema.arrow:
        try:
            arrays.append(pa.array([r.get(f.name) for r in rows], type=f.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
            raise SchemaError(
                f"rows for schema {schema.name!r}: column {f.name!r} ({f.type}): {exc}"
            ) from None
    return conform(pa.Table.from_arrays(arrays, schema=schema.arrow), schema, extra_metadata)
