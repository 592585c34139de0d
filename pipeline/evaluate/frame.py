"""A minimal column store over NumPy for evaluation inputs (the project does not depend on pandas).

Arrow columns become arrays: strings -> object arrays (None for null), numbers -> float64 (NaN for
null) or int/bool when null-free, lists -> (n, k) float64 with NaN rows for null lists.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa


def _column(col: pa.ChunkedArray) -> np.ndarray:
    t = col.type
    n = len(col)
    if pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t):
        values = col.to_pylist()
        width = next((len(v) for v in values if v is not None), 0)
        out = np.full((n, width), np.nan)
        for i, v in enumerate(values):
            if v is not None:
                if len(v) != width:
                    raise ValueError(f"list column {col!r}: rows of different lengths ({len(v)} vs {width})")
                out[i] = np.asarray(v, np.float64)
        return out
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t):
        return np.array(col.to_pylist(), dtype=object)
    if pa.types.is_boolean(t):
        return np.array([bool(v) for v in col.to_pylist()], dtype=bool)
    if pa.types.is_integer(t) and col.null_count == 0:
        return col.to_numpy().astype(np.int64)
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return np.array([np.nan if v is None else v for v in col.to_pylist()], dtype=np.float64)
    return np.array(col.to_pylist(), dtype=object)


class Frame:
    """Named, equally long NumPy columns."""

    def __init__(self, columns: dict[str, np.ndarray]) -> None:
        lengths = {len(v) for v in columns.values()}
        if len(lengths) > 1:
            raise ValueError(f"Frame columns differ in length: {sorted(lengths)}")
        self.columns = dict(columns)

    @classmethod
    def from_arrow(cls, table: pa.Table) -> Frame:
        return cls({name: _column(table.column(name)) for name in table.column_names})

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def __contains__(self, name: str) -> bool:
        return name in self.columns

    def take(self, rows: np.ndarray) -> Frame:
        """Rows selected by a boolean mask or an index array."""
        return Frame({k: v[rows] for k, v in self.columns.items()})

    def row(self, i: int) -> dict:
        return {k: v[i] for k, v in self.columns.items()}

    def rows(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self.row(i)

    def index_of(self, column: str) -> dict:
        """value -> first row index holding it."""
        out: dict = {}
        for i, v in enumerate(self.columns[column]):
            out.setdefault(v, i)
        return out

    def is_null(self, column: str) -> np.ndarray:
        v = self.columns[column]
        if v.dtype == object:
            return np.array([x is None for x in v], dtype=bool)
        if v.dtype.kind == "f":
            return np.isnan(v) if v.ndim == 1 else np.isnan(v).all(axis=1)
        return np.zeros(len(v), bool)
