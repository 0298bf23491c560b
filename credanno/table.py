"""The per-image table shared by patch files and feature stores: columns, dtypes, checks.

Both files keep one row per image (one LIDC annotation) with the same columns, stored
column-wise (``/table/<column>`` in HDF5), so that any HDF5 reader can use them. Rows are
ordered train first, then test. This module knows nothing about the storage backend: it
checks DataFrames and numpy columns, and converts a table to named numpy columns
(:func:`to_columns`) and back (:func:`from_columns`). Reading and writing the columns in a
file is the backend's job (HDF5: :mod:`credanno.stores.h5table`).

Columns (see README, "File schemas"):

- ids: ``annotation_id``, ``nodule_id``, ``scan_id`` (int64), ``patient_id`` (str);
- ``split``: "train" or "test";
- labels: one int64 column per name in :data:`credanno.labels.LABEL_NAMES`, 0-based, -1 missing;
- ``rating_<name>``: the nodule's median rating (float32, on the 1-based LIDC scale);
- ``raw_<name>``: this annotation's own rating (int64, 0 = missing);
- ``diameter``: the annotation's diameter in mm (float32, NaN if unknown).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from credanno.errors import CredannoError
from credanno.labels import LABEL_NAMES

ID_COLUMNS: tuple[str, ...] = ("annotation_id", "nodule_id", "scan_id", "patient_id")
SPLITS: tuple[str, ...] = ("train", "test")
RATING_COLUMNS: tuple[str, ...] = tuple(f"rating_{n}" for n in LABEL_NAMES)
RAW_COLUMNS: tuple[str, ...] = tuple(f"raw_{n}" for n in LABEL_NAMES)
REQUIRED_COLUMNS: tuple[str, ...] = (*ID_COLUMNS, "split", *LABEL_NAMES)


def validate_table(df: pd.DataFrame) -> None:
    """Check that ``df`` has the required columns and sane values."""
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise CredannoError(f"table lacks columns {missing}; it needs {list(REQUIRED_COLUMNS)}")
    bad = sorted(set(df["split"].astype(str)) - set(SPLITS))
    if bad:
        raise CredannoError(f"split column has values {bad}; allowed: {list(SPLITS)}")


def split_problem(values: np.ndarray) -> str | None:
    """Unknown values of a ``split`` column, named (None when all are train/test)."""
    # a set of the Python strings: ~10x faster than np.unique on 100k strings (every open)
    bad = sorted({str(v) for v in set(np.asarray(values).tolist())} - set(SPLITS))
    if bad:
        shown = bad[:5] + (["..."] if len(bad) > 5 else [])
        return f"split column has values {shown}; allowed: {list(SPLITS)}"
    return None


def is_string_column(values: np.ndarray) -> bool:
    """Whether a column holds text (stored as UTF-8 strings by every backend)."""
    return values.dtype == object or values.dtype.kind in "USO"


def to_columns(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """The table as named 1-D numpy columns, in column order, ready for any backend.

    Text becomes an object array of ``str`` (backends store UTF-8 strings), booleans become
    int8 (so readers without a boolean type read them), numbers stay as they are.
    """
    out: dict[str, np.ndarray] = {}
    for col in df.columns:
        values = df[col].to_numpy()
        if is_string_column(values):
            values = np.array([str(v) for v in values], dtype=object)
        elif values.dtype == bool:
            values = values.astype(np.int8)
        out[str(col)] = values
    return out


def from_columns(columns: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """The inverse of :func:`to_columns`: a DataFrame with text columns as ``str``."""
    df = pd.DataFrame(dict(columns))
    for col in df.columns:
        if df[col].dtype == object:
            df[col] = df[col].astype(str)
    return df


def lengths_problem(lengths: Mapping[str, int], n_rows: int | None = None) -> str | None:
    """Columns whose length differs from ``n_rows`` (or from ``split``'s), named; or None.

    Backends call this with each column's length read from the file's shapes, so a short
    column is refused before it can misalign rows.
    """
    if "split" not in lengths:
        return "the table has no 'split' column"
    want = n_rows if n_rows is not None else lengths["split"]
    what = "n_rows says" if n_rows is not None else "'split' has"
    bad = {c: n for c, n in lengths.items() if n != want}
    if bad:
        shown = ", ".join(f"{c!r} has {n} rows" for c, n in list(bad.items())[:3])
        more = f" (and {len(bad) - 3} more columns)" if len(bad) > 3 else ""
        return f"table column lengths differ: {shown}{more}; {what} {want}"
    return None
