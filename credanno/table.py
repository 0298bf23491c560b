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


def _column_names(group: h5py.Group) -> list[str]:
    names = group.attrs.get("columns", list(group.keys()))
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def table_problem(group: h5py.Group, n_rows: int | None = None) -> str | None:
    """What is wrong with the table's layout (None when nothing), from shapes alone.

    Every listed column must exist as a 1-D dataset, all of one length (``n_rows`` when
    given), and the ``split`` column must be there; no data is read, so this is cheap
    enough to run at every open.
    """
    if not isinstance(group, h5py.Group):
        return "'/table' is not a group"
    names = _column_names(group)
    if "split" not in names:
        return "the table has no 'split' column"
    lengths: dict[str, int] = {}
    for col in names:
        ds = group.get(col)
        if not isinstance(ds, h5py.Dataset):
            return f"table column {col!r} is missing"
        if ds.ndim != 1:
            return f"table column {col!r} has shape {ds.shape}, not one value per row"
        lengths[col] = int(ds.shape[0])
    want = n_rows if n_rows is not None else lengths["split"]
    what = "n_rows says" if n_rows is not None else "'split' has"
    bad = {c: n for c, n in lengths.items() if n != want}
    if bad:
        shown = ", ".join(f"{c!r} has {n} rows" for c, n in list(bad.items())[:3])
        more = f" (and {len(bad) - 3} more columns)" if len(bad) > 3 else ""
        return f"table column lengths differ: {shown}{more}; {what} {want}"
    return None


def split_problem(values: np.ndarray) -> str | None:
    """Unknown values of a ``split`` column, named (None when all are train/test)."""
    bad = sorted(set(np.unique(np.asarray(values, dtype=str)).tolist()) - set(SPLITS))
    if bad:
        shown = bad[:5] + (["..."] if len(bad) > 5 else [])
        return f"split column has values {shown}; allowed: {list(SPLITS)}"
    return None


def table_length(group: h5py.Group, n_rows: int | None = None) -> int:
    """Rows of a valid table (see :func:`table_problem`); error naming the file otherwise."""
    problem = table_problem(group, n_rows)
    if problem:
        raise CredannoError(f"{group.file.filename}: {problem} (damaged file); re-create it")
    return int(group["split"].shape[0])


def read_table(group: h5py.Group, rows: np.ndarray | slice | None = None,
               columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Read the table (or some rows/columns) written by :func:`write_table`.

    The layout is checked first (:func:`table_problem`) and unknown ``split`` values are an
    error: a short column would otherwise silently misalign rows.
    """
    table_length(group)
    names = _column_names(group)
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
    if "split" in df.columns and (problem := split_problem(df["split"].to_numpy())):
        raise CredannoError(f"{group.file.filename}: {problem} (damaged file); re-create it")
    return df
