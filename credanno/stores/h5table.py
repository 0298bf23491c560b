"""The per-image table in HDF5: one dataset per column under a group (``/table/<column>``).

The table's columns, dtypes and checks are :mod:`credanno.table`'s (backend-free); this
module only moves those columns in and out of an HDF5 group. Patch files, feature stores
and anything else kept in HDF5 read and write their table here. A second backend (Zarr,
say) would be one module like this one, with the same three functions.

Layout: the group's ``columns`` attribute lists the column order; text is variable-length
UTF-8, booleans int8, numbers as they are, every dataset 1-D with one value per row.
"""

from __future__ import annotations

from collections.abc import Sequence

import h5py
import numpy as np
import pandas as pd

from credanno.errors import CredannoError
from credanno.table import (
    from_columns,
    is_string_column,
    lengths_problem,
    split_problem,
    to_columns,
    validate_table,
)

_STR = h5py.string_dtype("utf-8")


def write_table(group: h5py.Group, df: pd.DataFrame) -> None:
    """Write ``df`` (checked first) column-wise into ``group``, see :func:`to_columns`."""
    validate_table(df)
    columns = to_columns(df)
    group.attrs["columns"] = list(columns)
    for col, values in columns.items():
        if is_string_column(values):
            group.create_dataset(col, data=values, dtype=_STR)
        else:
            group.create_dataset(col, data=values)


def column_names(group: h5py.Group) -> list[str]:
    """The table's column names, in order (the ``columns`` attribute, else the datasets)."""
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
    names = column_names(group)
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
    return lengths_problem(lengths, n_rows)


def table_length(group: h5py.Group, n_rows: int | None = None) -> int:
    """Rows of a valid table (see :func:`table_problem`); error naming the file otherwise."""
    problem = table_problem(group, n_rows)
    if problem:
        raise CredannoError(f"{group.file.filename}: {problem} (damaged file); re-create it")
    return int(group["split"].shape[0])


def read_column(group: h5py.Group, name: str,
                rows: np.ndarray | slice | None = None) -> np.ndarray:
    """One column (text as an object array of ``str``), all rows or ``rows``."""
    ds = group[name]
    sel = slice(None) if rows is None else rows
    if h5py.check_string_dtype(ds.dtype) is not None:
        return ds.asstr()[sel]
    return ds[sel]


def read_table(group: h5py.Group, rows: np.ndarray | slice | None = None,
               columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Read the table (or some rows/columns) written by :func:`write_table`.

    The layout is checked first (:func:`table_problem`) and unknown ``split`` values are an
    error: a short column would otherwise silently misalign rows.
    """
    table_length(group)
    names = column_names(group)
    if columns is not None:
        unknown = [c for c in columns if c not in names]
        if unknown:
            raise CredannoError(f"unknown table columns {unknown}; available: {names}")
        names = list(columns)
    df = from_columns({col: read_column(group, col, rows) for col in names})
    if "split" in df.columns and (problem := split_problem(df["split"].to_numpy())):
        raise CredannoError(f"{group.file.filename}: {problem} (damaged file); re-create it")
    return df
