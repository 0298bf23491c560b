"""Read-only, lazy access to a feature store.

Opening a store reads its attributes only; the table and features are read when asked
for, a split at a time, straight into one preallocated array (rows of a split are a
contiguous range in table order, so that is usually a single HDF5 read). Each process
opens its own handle: a :class:`Store` pickled to a worker re-opens the file there, and
one used after ``fork`` re-opens itself, so HDF5 handles are never shared.

A :class:`Store` reads one file for its whole life: it records the file's identity at open
(device, inode, size and the ``content_id`` the writer stamps at close) and a re-open that
finds another file at the path (the store was re-embedded meanwhile) is refused, rather
than reading new data under old metadata.

Opening checks the layout from dataset shapes: every table column and feature set has
``n_rows`` rows, ``feature_sets`` and ``provenance`` are JSON objects, ``split`` holds only
train/test; a damaged store is refused with one line instead of giving wrong results later.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from credanno.errors import CredannoError
from credanno.labels import LABEL_NAMES, label_spec
from credanno.stores.h5table import column_names, read_column, read_table, table_problem
from credanno.stores.schema import (
    LOCK_HINT,
    SCHEMA,
    SCHEMA_VERSION,
    decode_attr,
    from_json,
    h5open,
    is_lock_error,
)
from credanno.table import SPLITS, split_problem

_REMAKE = "re-create it with `credanno embed`"
#: Above this many contiguous pieces a split is read block-wise instead of piece by piece.
_MAX_RUNS = 64
_BLOCK_BYTES = 4 << 20


def _runs(rows: np.ndarray) -> list[tuple[int, int, int]]:
    """Split sorted row indices into contiguous runs: (source start, stop, output offset)."""
    if len(rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(rows)]])
    return [(int(rows[a]), int(rows[b - 1]) + 1, int(a))
            for a, b in zip(starts, stops, strict=True)]


#: What identifies the file a store was opened on: (device, inode, size, content_id).
Identity = tuple[int, int, int, "str | None"]


def _int_attr(attrs: Any, key: str, default: Any = None) -> int:
    value = decode_attr(attrs[key] if default is None else attrs.get(key, default))
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        try:
            value = int(str(value))
        except ValueError:
            raise CredannoError(f"attribute {key!r} is {value!r}, not an integer") from None
    return int(value)


class Store:
    """A feature store opened read-only (use :func:`open`)."""

    def __init__(self, path: str | os.PathLike, locking: bool | str | None = None) -> None:
        self.path = Path(path)
        self._locking = locking
        self._file: h5py.File | None = None
        self._closed = False
        self._split_col: np.ndarray | None = None
        # Set by the first open; every later open (after fork, in a worker) must find the
        # very same file, or the metadata read here would describe another file's data.
        self._identity: Identity | None = None
        self._connect()
        try:
            self._load_layout(self._h5)
        except KeyError as exc:
            self.close()
            raise CredannoError(f"{self.path} lacks {exc.args[0] if exc.args else 'a part'} "
                                f"(damaged or incomplete store); {_REMAKE}") from None
        except OSError as exc:
            self.close()
            raise CredannoError(f"cannot read {self.path} ({str(exc).splitlines()[0]}); the "
                                f"file is damaged; {_REMAKE}") from None
        except CredannoError:
            self.close()
            raise

    def _damaged(self, problem: str) -> CredannoError:
        return CredannoError(f"{self.path} is a damaged store: {problem}; {_REMAKE}")

    def _load_layout(self, f: h5py.File) -> None:
        """Read and check the attributes, and the table's and datasets' shapes."""
        try:
            self.schema_version = _int_attr(f.attrs, "schema_version")
            self.n = _int_attr(f.attrs, "n_rows")
            self.n_views = _int_attr(f.attrs, "n_views", 0)
        except CredannoError as exc:
            raise self._damaged(str(exc)) from None
        if self.n < 0 or self.n_views < 0:
            raise self._damaged(f"n_rows {self.n} / n_views {self.n_views} is negative")
        dims = from_json(f.attrs["feature_sets"], "feature_sets", self.path)
        if not isinstance(dims, dict) or not dims or not all(
                isinstance(k, str) and k and type(v) is int and v > 0 for k, v in dims.items()):
            raise self._damaged(f"attribute 'feature_sets' is {_brief(dims)}, not a JSON "
                                "object of names to positive dimensions")
        self.default_kind = str(decode_attr(f.attrs.get("default_kind", "cls")))
        provenance = from_json(f.attrs["provenance"], "provenance", self.path)
        if not isinstance(provenance, dict):
            raise self._damaged(f"attribute 'provenance' is {_brief(provenance)}, not a JSON "
                                "object")
        self.provenance: dict[str, Any] = provenance
        table = f["table"]
        problem = table_problem(table, self.n)
        if problem:
            raise self._damaged(problem)
        columns = column_names(table)
        feats = f["features"]
        for kind, dim in dims.items():
            ds = feats[kind]
            if not isinstance(ds, h5py.Dataset) or ds.shape != (self.n, dim):
                raise self._damaged(f"feature set {kind!r} has shape "
                                    f"{getattr(ds, 'shape', None)}, expected ({self.n}, {dim})")
        self._dims: dict[str, int] = dict(dims)
        self._columns = columns
        self.feature_sets: list[str] = list(self._dims)
        self.label_names: list[str] = [n for n in LABEL_NAMES if n in columns]
        self.dim = self._dims.get(self.default_kind, next(iter(self._dims.values())))

    def _check_views(self, f: h5py.File, dims: dict[str, int], n_train: int) -> None:
        if not self.n_views or "views" not in f:
            return
        for kind in f["views"]:
            ds = f["views"][kind]
            want = (self.n_views, n_train, dims.get(kind, -1))
            if not isinstance(ds, h5py.Dataset) or ds.shape != want:
                raise self._damaged(f"views {kind!r} have shape {getattr(ds, 'shape', None)}, "
                                    f"expected {want}")

    @property
    def dims(self) -> dict[str, int]:
        """Dimension of every feature set, e.g. ``{"cls": 384, "last4": 1536}``."""
        return dict(self._dims)

    # -- handles --------------------------------------------------------------------------

    def _connect(self) -> None:
        path = self.path
        if not path.exists():
            if self._identity is not None:
                raise CredannoError(f"{path} was removed since it was opened; open it again "
                                    "with stores.open once it exists")
            raise CredannoError(f"feature store {path} not found; create it with "
                                "`credanno embed` (or name an existing stores/*.h5)")
        try:
            f = h5open(path, "r", self._locking)
        except OSError as exc:
            if is_lock_error(exc):
                raise CredannoError(f"cannot lock {path} for reading "
                                    f"({str(exc).splitlines()[0]}); {LOCK_HINT}") from None
            if self._identity is not None:
                raise CredannoError(f"{path} was replaced since it was opened (now not a "
                                    "readable HDF5 file); open it again with stores.open") from None
            raise CredannoError(f"{path} is not a readable HDF5 file (truncated or corrupt); "
                                f"{_REMAKE}") from None
        try:
            self._identity = self._check_file(f, path)
        except BaseException:
            f.close()
            raise
        self._file = f
        self._pid = os.getpid()

    def _check_file(self, f: h5py.File, path: Path) -> Identity:
        """The open file's identity, after checking it is the expected file and a store."""
        identity = _identity(f, path)
        if self._identity is not None and identity != self._identity:
            raise CredannoError(f"{path} was replaced since it was opened (different file); "
                                "open it again with stores.open")
        schema = decode_attr(f.attrs.get("schema", ""))
        if schema != SCHEMA:
            if schema == "credanno.patches":
                raise CredannoError(f"{path} is a patch file, not a feature store; embed it "
                                    f"with `credanno embed --data {path}`")
            raise CredannoError(f"{path} is not a credanno feature store (schema "
                                f"{schema or 'missing'}); create one with `credanno embed`")
        try:
            version = _int_attr(f.attrs, "schema_version", 0)
        except CredannoError as exc:
            raise self._damaged(str(exc)) from None
        if version > SCHEMA_VERSION:
            raise CredannoError(f"{path} has store schema version {version}, newer than this "
                                f"credanno reads ({SCHEMA_VERSION}); upgrade credanno")
        return identity

    @property
    def _h5(self) -> h5py.File:
        if self._closed:
            raise CredannoError(f"store {self.path} is closed; open it again with stores.open")
        if self._file is None or self._pid != os.getpid():
            # After fork the inherited handle belongs to the parent, and an unpickled store
            # has none: open our own, on the same file as the first open (or refuse).
            self._file = None
            self._connect()
        return self._file

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None
        self._closed = True

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def content_id(self) -> str | None:
        """The id the writer stamped on this file (None for stores of older versions)."""
        return self._identity[3] if self._identity else None

    def __getstate__(self) -> dict[str, Any]:
        # Pickling (multiprocessing) sends the metadata and the file's identity, no handle:
        # the worker opens its own at first use, on the same file or not at all. Opening
        # lazily makes a replaced file an error inside the worker's task (where it reaches
        # the caller) rather than while unpickling (which kills a Pool's worker).
        state = dict(self.__dict__)
        state.update(_file=None, _pid=None, _closed=False, _split_col=None)
        return state

    def __repr__(self) -> str:
        sets = ", ".join(f"{k} {d}" for k, d in self._dims.items())
        return f"Store({str(self.path)!r}, n={self.n}, {sets})"

    # -- rows and table -------------------------------------------------------------------

    def _splits(self) -> np.ndarray:
        """The split column, read and checked on first use: every split-based read goes
        through it, so unknown values are refused before they could drop rows silently.
        (Read lazily because it costs more than opening the store: 100k strings ~30 ms.)"""
        if self._split_col is None:
            col = self._read(lambda f: read_column(f["table"], "split"))
            problem = split_problem(col)
            if problem:
                raise self._damaged(problem)
            self._read(lambda f: self._check_views(f, self._dims,
                                                   int(np.count_nonzero(col == "train"))))
            self._split_col = col
        return self._split_col

    def _read(self, fn):
        try:
            return fn(self._h5)
        except (OSError, KeyError) as exc:
            raise CredannoError(f"cannot read {self.path} ({str(exc).splitlines()[0]}); the "
                                f"file is damaged; {_REMAKE}") from None

    def rows(self, split: str | None = None) -> np.ndarray:
        """Row indices (int64, increasing) of ``split`` ("train", "test"; None = all)."""
        if split is None:
            return np.arange(self.n, dtype=np.int64)
        if split not in SPLITS:
            raise CredannoError(f"unknown split {split!r}; use one of {list(SPLITS)} or None")
        return np.flatnonzero(self._splits() == split).astype(np.int64)

    def table(self, split: str | None = None, columns: list[str] | None = None) -> pd.DataFrame:
        """The per-image table (ids, split, labels, ratings) of ``split``, in row order."""
        rows = self.rows(split)
        sel = self._selector(rows)
        if isinstance(sel, slice):
            return self._read(lambda f: read_table(f["table"], rows=sel, columns=columns))
        # Scattered rows: one read of the (small) columns beats HDF5 point selections.
        df = self._read(lambda f: read_table(f["table"], columns=columns))
        return df.iloc[rows].reset_index(drop=True)

    def _selector(self, rows: np.ndarray) -> slice | np.ndarray:
        runs = _runs(rows)
        if len(runs) == 1:
            return slice(runs[0][0], runs[0][1])
        if not runs:
            return slice(0, 0)
        return rows

    def labels(self, name: str, split: str | None = None) -> np.ndarray:
        """Label ``name`` (0-based int64, -1 = missing) for the rows of ``split``."""
        label_spec(name)
        if name not in self._columns:
            raise CredannoError(f"{self.path} has no {name!r} labels; re-embed from a patch "
                                "file that has them")
        rows = self.rows(split)
        sel = self._selector(rows)
        if isinstance(sel, slice):
            return self._read(lambda f: read_column(f["table"], name, sel)).astype(np.int64)
        return self._read(lambda f: read_column(f["table"], name))[rows].astype(np.int64)

    # -- features -------------------------------------------------------------------------

    def _dataset(self, group: str, kind: str) -> h5py.Dataset:
        if kind not in self._dims:
            raise CredannoError(f"{self.path} has no feature set {kind!r}; available: "
                                f"{', '.join(self.feature_sets)}")
        return self._read(lambda f: f[group][kind])

    def features(self, split: str | None = None, kind: str = "cls") -> np.ndarray:
        """Features of ``split`` as a float32 (rows, D) array, rows in table order."""
        rows = self.rows(split)
        ds = self._dataset("features", kind)
        out = np.empty((len(rows), ds.shape[1]), dtype=np.float32)

        runs = _runs(rows)

        def read(_f: h5py.File) -> np.ndarray:
            if len(runs) <= _MAX_RUNS:
                for start, stop, offset in runs:
                    ds.read_direct(out, np.s_[start:stop], np.s_[offset:offset + stop - start])
                return out
            # Many short runs (rows interleaved across splits): read ~4 MiB blocks and keep
            # the wanted rows, bounding memory at the split plus one block.
            step = max(1, _BLOCK_BYTES // (ds.shape[1] * 4))
            block = np.empty((step, ds.shape[1]), dtype=np.float32)
            done = 0
            for a in range(int(rows[0]), int(rows[-1]) + 1, step):
                b = min(a + step, ds.shape[0])
                ds.read_direct(block, np.s_[a:b], np.s_[0:b - a])
                upto = int(np.searchsorted(rows, b))
                out[done:upto] = block[rows[done:upto] - a]
                done = upto
            return out

        return self._read(read)

    def feature_blocks(self, split: str | None = "train", kind: str = "cls",
                       block_rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        """Features of ``split`` as ``(offset, block)`` pairs of at most ``block_rows`` rows,
        read one block at a time, so that a bank larger than memory can be streamed."""
        rows = self.rows(split)
        ds = self._dataset("features", kind)
        for start in range(0, len(rows), int(block_rows)):
            sel = rows[start:start + int(block_rows)]
            lo, hi = int(sel[0]), int(sel[-1]) + 1
            # a contiguous range is one slice read; scattered rows need a point selection
            block = self._read(lambda _f, lo=lo, hi=hi, sel=sel:
                               ds[lo:hi] if hi - lo == len(sel) else ds[sel])
            yield start, np.asarray(block, dtype=np.float32)

    def views(self, split: str = "train", kind: str = "last4") -> np.ndarray | None:
        """Stored augmented views of the training rows, float32 (V, n_train, D), or None.

        Views exist only for training rows (probe training); None when the store has none.
        """
        if split != "train":
            raise CredannoError(f"views are stored for the training rows only; ask for "
                                f"split='train', not {split!r}")
        if kind not in self._dims:
            raise CredannoError(f"{self.path} has no feature set {kind!r}; available: "
                                f"{', '.join(self.feature_sets)}")
        if not self.n_views:
            return None
        self._splits()  # checks the views' shapes against the training rows

        def read(f: h5py.File) -> np.ndarray | None:
            if kind not in f["views"]:
                return None
            ds = f["views"][kind]
            out = np.empty(ds.shape, dtype=np.float32)
            if out.size:
                ds.read_direct(out)
            return out

        return self._read(read)


def _brief(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def _identity(f: h5py.File, path: Path) -> Identity:
    """(device, inode, size, content_id) of the file ``f`` has open."""
    try:
        st = os.fstat(f.id.get_vfd_handle())  # the open file itself, not whatever is at path
    except (OSError, TypeError, ValueError, NotImplementedError):
        st = os.stat(path)
    cid = decode_attr(f.attrs.get("content_id", None))
    return (int(st.st_dev), int(st.st_ino), int(st.st_size),
            None if cid is None else str(cid))


def open_store(path: str | os.PathLike, locking: bool | str | None = None) -> Store:
    """Open a feature store read-only; reads attributes only, no feature data.

    ``locking`` overrides HDF5 file locking (default: ``$CREDANNO_HDF5_LOCKING``, else
    HDF5's own default); pass False on network filesystems whose locks fail.
    """
    return Store(path, locking)
