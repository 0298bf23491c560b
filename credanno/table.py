"""The per-image table shared by patch files and feature stores.

Both files keep one row per image (one LIDC annotation) with the same columns, stored
column-wise under an HDF5 group (``/table/<column>``), so that any HDF5 reader can
use them. Rows are ordered train first, then test.

Columns (see README, "File schemas"):

- ids: ``annotation_id``, ``nodule_id``, ``scan_id`` (int64), ``patient_id`` (str);
- ``split``: "train" or "test";
- labels: one int64 column per name in :data:`credanno.labels.LABEL_NAMES`, 0-based, -1 missing;
- ``rating_<name>``: the nodule's median rating (float32, on the 1-based LIDC scale);
- ``raw_<name>``: this annotation's own rating (int64, 0 = missing);
- ``diameter``: the annotation's diameter in mm (float32, NaN if unknown).
"""

from __future__ import annotations

from collections.abc import Sequence

import h5py
import numpy as np
import pandas as pd

from credanno.errors import CredannoError
from credanno.labels import LABEL_NAMES

ID_COLUMNS: tuple[str, ...] = ("annotation_id", "nodule_id", "scan_id", "patient_id")
SPLITS: tuple[str, ...] = ("train", "test")
RATING_COLUMNS: tuple[str, ...] = tuple(f"rating_{n}" for n in LABEL_NAMES)
RAW_COLUMNS: tuple[str, ...] = tuple(f"raw_{n}" for n in LABEL_NAMES)
REQUIRED_COLUMNS: tuple[str, ...] = (*ID_COLUMNS, "split", *LABEL_NAMES)

_STR = h5py.string_dtype("utf-8")


def validate_table(df: pd.DataFrame) -> None:
    """Check that ``df`` has the required columns and sane values."""
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise CredannoError(f"table lacks columns {missing}; it needs {list(REQUIRED_COLUMNS)}")
    bad = sorted(set(df["split"].astype(str)) - set(SPLITS))
    if bad:
        raise CredannoError(f"split column has values {bad}; allowed: {list(SPLITS)}")


def write_table(group: h5py.Group, df: pd.DataFrame) -> None:
    """Write ``df`` column-wise into ``group`` (strings as UTF-8, numbers as they are)."""
    validate_table(df)
    group.attrs["columns"] = list(map(str, df.columns))
    for col in df.columns:
        values = df[col].to_numpy()
        if values.dtype == object or values.dtype.kind in "USO":
            strings = np.array([str(v) for v in values], dtype=object)
            group.create_dataset(col, data=strings, dtype=_STR)
        elif values.dtype == bool:
            group.create_dataset(col, data=values.astype(np.int8))
        else:
            group.create_dataset(col, data=values)


def read_table(group: h5py.Group, rows: np.ndarray | slice | None = None,
               columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Read the table (or some rows/columns) written by :func:`write_table`."""
    names = list(group.attrs.get("columns", list(group.keys())))
    if columns is not None:
        unknown = [c for c in columns if c not in names]
        if unknown:
            raise CredannoError(f"unknown table columns {unknown}; available: {names}")
        names = list(columns)
    sel = slice(None) if rows is None else rows
    out = {}
    for col in names:
        ds = group[col]
        if h5py.check_string_dtype(ds.dtype) is not None:
            out[col] = ds.asstr()[sel]
        else:
            out[col] = ds[sel]
    df = pd.DataFrame(out)
    for col in df.columns:
        if df[col].dtype == object:
            df[col] = df[col].astype(str)
    return df
