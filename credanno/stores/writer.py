"""Streaming store writer: batches of feature rows in table order, then an atomic rename.

``credanno embed`` produces features a batch at a time; :class:`StoreWriter` writes them
straight into pre-sized HDF5 datasets of a temporary file beside the target, refuses
NaN/Inf at once, and renames the file onto the target only when every row (and every
augmented view) has been written. An exception, Ctrl-C or a missing batch leaves no store.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import os
import uuid
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from credanno import __version__
from credanno._atomic import atomic_path, check_space, space_error
from credanno.errors import CredannoError
from credanno.stores.h5table import write_table
from credanno.stores.schema import (
    CHUNK_BYTES,
    LOCK_HINT,
    SCHEMA,
    SCHEMA_VERSION,
    chunk_rows,
    encode_attr,
    h5open,
    is_lock_error,
    to_json,
)
from credanno.table import validate_table

_DTYPES = {"float32": np.float32, "float16": np.float16}
_BLOCK_BYTES = 4 << 20


def _finite(block: np.ndarray) -> bool:
    # Column sums are one vectorised pass and NaN/Inf propagate through them; only when a
    # sum is not finite (or overflowed) is the exact element-wise test needed.
    flat = block.reshape(-1, block.shape[-1]) if block.ndim > 1 else block[:, None]
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(flat.sum(axis=0)).all():
            return True
    return bool(np.isfinite(block).all())


def _write_rows(ds: h5py.Dataset, block: np.ndarray, row: int) -> None:
    """Write ``block`` at ``row`` of the last-but-one axis of ``ds`` (all of the others).

    HDF5's own call with a hyperslab costs a fraction of ``write_direct``'s selection
    machinery, which is paid once per ~4 MiB block.
    """
    fspace = ds.id.get_space()
    fspace.select_hyperslab((*([0] * (block.ndim - 2)), row, 0), block.shape)
    ds.id.write(h5py.h5s.create_simple(block.shape), fspace, block)


class StoreWriter(AbstractContextManager):
    """Write a feature store row batch by row batch (see :func:`create`).

    Use as a context manager, or call :meth:`close` (success) / :meth:`abort` (discard).
    """

    def __init__(self, path: str | os.PathLike, table: pd.DataFrame,
                 feature_sets: Mapping[str, int], provenance: Mapping[str, Any] | None = None,
                 dtype: str = "float32", views: int = 0, *, default_kind: str | None = None,
                 compression: str | None = None, locking: bool | str | None = None,
                 overwrite: bool = True) -> None:
        if dtype not in _DTYPES:
            raise CredannoError(f"store dtype {dtype!r} is not supported; use one of "
                                f"{sorted(_DTYPES)}")
        if not feature_sets:
            raise CredannoError("a store needs at least one feature set, e.g. {'cls': 384}")
        for kind, dim in feature_sets.items():
            if not isinstance(kind, str) or not kind or "/" in kind:
                raise CredannoError(f"feature-set name {kind!r} is invalid; use a plain name "
                                    "like 'cls'")
            if int(dim) < 1:
                raise CredannoError(f"feature set {kind!r} has dimension {dim}; it must be >= 1")
        if int(views) < 0:
            raise CredannoError(f"views={views} is negative; pass 0 (none) or a positive count")
        table = table.reset_index(drop=True)
        if "split" not in table.columns:
            validate_table(table)  # names every missing column; write_table checks the rest
        self.path = Path(path)
        self.table = table
        self.n = len(table)
        self.feature_sets = {k: int(v) for k, v in feature_sets.items()}
        self.default_kind = default_kind or ("cls" if "cls" in self.feature_sets
                                             else next(iter(self.feature_sets)))
        if self.default_kind not in self.feature_sets:
            raise CredannoError(f"default feature set {self.default_kind!r} is not among "
                                f"{list(self.feature_sets)}")
        self.dtype = np.dtype(_DTYPES[dtype])
        self.n_views = int(views)
        self.train_rows = np.flatnonzero(table["split"].astype(str).to_numpy() == "train")
        self.rows_written = 0
        self.views_written = 0
        self._closed = True  # nothing to discard until the temp file exists

        meta = dict(provenance or {})
        meta.setdefault("credanno_version", __version__)
        meta.setdefault("created",
                        _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        self.provenance = meta

        if compression is None:  # compressed sizes are unknown; the table is checked below
            check_space(self.path, self._needed_bytes())
        else:
            check_space(self.path, self._needed_bytes() - self._feature_bytes())
        self._atomic = atomic_path(self.path, overwrite=overwrite)
        tmp = self._atomic.__enter__()
        self._closed = False
        try:
            # (compressed stores) room for a few chunks per dataset keeps a partly filled
            # chunk in memory until it is complete, so sequential batches write it once.
            try:
                self._file = h5open(tmp, "w", locking, rdcc_nbytes=4 * CHUNK_BYTES,
                                    rdcc_w0=1.0)
            except OSError as exc:
                hint = LOCK_HINT if is_lock_error(exc) else "choose a writable --out"
                raise CredannoError(f"cannot create {self.path} "
                                    f"({str(exc).splitlines()[0]}); {hint}") from None
            self._create_layout(compression)
        except BaseException as exc:
            self._discard(exc)
            raise

    def _feature_bytes(self) -> int:
        per_row = sum(self.feature_sets.values()) * self.dtype.itemsize
        return per_row * (self.n + self.n_views * len(self.train_rows))

    def _needed_bytes(self) -> int:
        """Features, views, the table (strings counted generously) and HDF5's metadata."""
        table = sum(64 if self.table[c].dtype == object else 8 for c in self.table.columns)
        return self._feature_bytes() + table * self.n + (256 << 10)

    def _create_layout(self, compression: str | None) -> None:
        f = self._file
        f.attrs.update({
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "n_rows": self.n,
            "feature_sets": to_json(self.feature_sets, sort_keys=False),
            "default_kind": self.default_kind,
            "n_views": self.n_views, "provenance": to_json(self.provenance),
            "credanno_version": encode_attr(self.provenance["credanno_version"]),
            "created": encode_attr(self.provenance["created"]),
        })
        write_table(f.create_group("table"), self.table)
        definitions = self.provenance.get("feature_sets", {})
        feats = f.create_group("features")
        views = f.create_group("views")
        views.attrs["split"] = "train"
        views.attrs["n_views"] = self.n_views
        self._ds: dict[str, Any] = {}
        self._views: dict[str, Any] = {}
        n_train = len(self.train_rows)
        for kind, dim in self.feature_sets.items():
            ds = self._dataset(feats, kind, (self.n, dim), compression)
            ds.attrs["dim"] = dim
            if isinstance(definitions, Mapping) and kind in definitions:
                ds.attrs["definition"] = str(definitions[kind])
            self._ds[kind] = ds
            if self.n_views and n_train:
                self._views[kind] = self._dataset(views, kind, (self.n_views, n_train, dim),
                                                  compression)
        self._preallocate()

    def _dataset(self, group: Any, name: str, shape: tuple[int, ...],
                 compression: str | None) -> Any:
        """Uncompressed: contiguous row-major storage, allocated now; else row chunks.

        Contiguous storage makes every row range (a split) one read and one write; space is
        allocated at creation so a full disk fails before hours of encoding, not after.
        Early allocation plus :meth:`_preallocate` pay for themselves: in
        ``benchmarks/store_io.py`` (100k x 384 float32, ext4) writes ran at 0.74-0.76 of
        ``np.save`` with both, 0.27-0.44 with either or both left out.
        """
        if compression is None or 0 in shape:
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
            return group.create_dataset(name, shape=shape, dtype=self.dtype, dcpl=dcpl)
        rows = chunk_rows(shape[-1], self.dtype.itemsize, shape[-2])
        chunks = (*([1] * (len(shape) - 2)), rows, shape[-1])
        return group.create_dataset(name, shape=shape, dtype=self.dtype, chunks=chunks,
                                    compression=compression)

    def _preallocate(self) -> None:
        # Reserving the blocks up front (as np.save does) makes the streamed writes run at
        # the speed of one large write; HDF5 itself only extends the file as it writes.
        spans = [(ds.id.get_offset(), ds.id.get_storage_size())
                 for ds in (*self._ds.values(), *self._views.values())]
        spans = [(o, n) for o, n in spans if o is not None and n]
        if not spans or not hasattr(os, "posix_fallocate"):
            return
        start = min(o for o, _ in spans)
        stop = max(o + n for o, n in spans)
        fd = os.open(self._file.filename, os.O_RDWR)
        try:
            os.posix_fallocate(fd, start, stop - start)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise space_error(self.path) from None
            # Filesystems without fallocate (some network mounts) just write more slowly.
        finally:
            os.close(fd)

    # -- writing --------------------------------------------------------------------------

    def _check_batch(self, batch: Mapping[str, Any], what: str, lead: tuple[int, ...]
                     ) -> tuple[dict[str, np.ndarray], int]:
        if self._closed:
            raise CredannoError(f"store writer for {self.path} is closed; create a new one")
        unknown = sorted(set(batch) - set(self.feature_sets))
        missing = sorted(set(self.feature_sets) - set(batch))
        if unknown or missing:
            raise CredannoError(
                f"{what} batch has feature sets {sorted(batch)}, the store expects "
                f"{sorted(self.feature_sets)}; pass every feature set in each batch")
        arrays: dict[str, np.ndarray] = {}
        count = None
        for kind, value in batch.items():
            if hasattr(value, "detach"):  # torch tensors: no torch import needed here
                value = value.detach().float().cpu().numpy()
            arr = np.asarray(value, dtype=np.float32)
            dim = self.feature_sets[kind]
            nd = len(lead) + 2
            if arr.ndim != nd or arr.shape[-1] != dim or arr.shape[:len(lead)] != lead:
                want = ", ".join([*map(str, lead), "rows", str(dim)])
                raise CredannoError(f"{what} {kind!r} has shape {arr.shape}; expected ({want})")
            rows = arr.shape[-2]
            if count is not None and rows != count:
                raise CredannoError(f"{what} feature sets have different row counts "
                                    f"({count} vs {rows}); pass the same rows for each")
            count = rows
            arrays[kind] = arr
        assert count is not None
        return arrays, count

    def append(self, batch: Mapping[str, Any]) -> None:
        """Write the next rows (table order): ``{kind: (b, D) array}`` for every feature set."""
        try:
            arrays, b = self._check_batch(batch, "features", ())
            start = self.rows_written
            if start + b > self.n:
                raise CredannoError(
                    f"too many rows: {start + b} appended, the table has {self.n}; "
                    "append exactly one row per table row")
            for kind, arr in arrays.items():
                self._write(self._ds[kind], arr, start, f"features {kind!r}")
            self.rows_written = start + b
        except BaseException as exc:
            self._discard(exc)
            raise

    def append_views(self, batch: Mapping[str, Any]) -> None:
        """Write the next training rows' views: ``{kind: (V, b, D) array}``, train-row order."""
        try:
            if not self.n_views:
                raise CredannoError("this store was created with views=0; pass views=V to "
                                    "stores.create to store augmented views")
            arrays, b = self._check_batch(batch, "views", (self.n_views,))
            start = self.views_written
            if start + b > len(self.train_rows):
                raise CredannoError(
                    f"too many view rows: {start + b} appended, the table has "
                    f"{len(self.train_rows)} training rows; append views of training rows only")
            for kind, arr in arrays.items():
                if kind in self._views:
                    self._write(self._views[kind], arr, start, f"views {kind!r}")
            self.views_written = start + b
        except BaseException as exc:
            self._discard(exc)
            raise

    def _write(self, ds: Any, arr: np.ndarray, start: int, what: str) -> None:
        """Write ``arr`` at row ``start`` (the last-but-one axis), checking it block by block.

        Each ~4 MiB block is checked for NaN/Inf while it is in cache and then written, so
        the check costs no extra pass over memory; a bad block aborts the whole store.
        """
        rows = arr.shape[-2]
        step = max(1, _BLOCK_BYTES // max(1, arr[..., :1, :].nbytes))
        for a in range(0, rows, step):
            block = np.ascontiguousarray(arr[..., a:a + step, :])
            if self.dtype != np.float32:
                with np.errstate(over="ignore"):  # overflow is reported just below
                    block = block.astype(self.dtype)
            if not _finite(block):
                hint = ("features overflow float16 (|x| > 65504); store them as float32"
                        if self.dtype == np.float16 and _finite(arr[..., a:a + step, :])
                        else "the encoder output is broken (diverged checkpoint or corrupt "
                             "input)")
                raise CredannoError(f"{what} contains NaN or Inf; {hint}; nothing was stored")
            _write_rows(ds, block, start + a)

    # -- finishing ------------------------------------------------------------------------

    def close(self) -> Path:
        """Check that every row was written, then rename the temp file onto ``path``."""
        if self._closed:
            return self.path
        try:
            if self.rows_written != self.n:
                raise CredannoError(
                    f"store incomplete: {self.rows_written} of {self.n} rows written; "
                    f"nothing was saved to {self.path}; append every row before close()")
            if self.n_views and self.views_written != len(self.train_rows):
                raise CredannoError(
                    f"store incomplete: views of {self.views_written} of "
                    f"{len(self.train_rows)} training rows written; nothing was saved")
            # Stamped last, on a complete file: readers use it (with inode and size) to
            # tell this file from a later one written to the same path.
            self._file.attrs["content_id"] = uuid.uuid4().hex
            self._file.close()
            self._closed = True
            self._atomic.__exit__(None, None, None)
        except BaseException as exc:
            self._discard(exc)
            raise
        return self.path

    def abort(self) -> None:
        """Discard everything written so far; ``path`` is left as it was."""
        self._discard(None)

    def _discard(self, exc: BaseException | None) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if getattr(self, "_file", None) is not None and self._file.id.valid:
                # The file is thrown away: a failing close (full disk) must not mask the
                # error that made us discard it.
                with contextlib.suppress(Exception):
                    self._file.close()
        finally:
            err = exc if exc is not None else CredannoError("aborted")
            self._atomic.__exit__(type(err), err, None)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
        else:
            self._discard(exc)

    def __del__(self) -> None:
        # A writer dropped without close() must not leave its temp file behind.
        if not getattr(self, "_closed", True):
            # __del__ cannot report: a temp file that will not go away is left for the
            # next writer of this folder, which removes those of dead processes
            with contextlib.suppress(OSError, CredannoError):
                self._discard(None)

    def __repr__(self) -> str:
        return (f"StoreWriter({str(self.path)!r}, {self.rows_written}/{self.n} rows, "
                f"{self.feature_sets})")


def create(path: str | os.PathLike, table: pd.DataFrame, feature_sets: Mapping[str, int],
           provenance: Mapping[str, Any] | None = None, dtype: str = "float32",
           views: int = 0, **kwargs: Any) -> StoreWriter:
    """Start writing a store at ``path`` (temp file until :meth:`StoreWriter.close`).

    ``feature_sets`` maps feature-set names to dimensions (``{"cls": 384, "last4": 1536}``);
    ``views`` is the number of augmented views stored per training row (0 = none).
    """
    return StoreWriter(path, table, feature_sets, provenance, dtype, views, **kwargs)


def save(path: str | os.PathLike, features: Mapping[str, Any], table: pd.DataFrame,
         provenance: Mapping[str, Any] | None = None, dtype: str = "float32",
         views: Mapping[str, Any] | None = None, **kwargs: Any) -> Path:
    """Write a whole store in one call: ``features`` maps names to (N, D) arrays.

    ``views`` optionally maps the same names to (V, N_train, D) arrays.
    """
    arrays = {k: np.asarray(v) for k, v in features.items()}
    for kind, arr in arrays.items():
        if arr.ndim != 2:
            raise CredannoError(f"features {kind!r} must be a 2-D (rows, dim) array; got "
                                f"shape {arr.shape}")
    n_views = 0
    if views:
        n_views = int(np.asarray(next(iter(views.values()))).shape[0])
    with create(path, table, {k: a.shape[1] for k, a in arrays.items()}, provenance, dtype,
                n_views, **kwargs) as w:
        w.append(arrays)
        if views:
            w.append_views(views)
    return Path(path)
