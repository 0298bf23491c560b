"""The feature-store file format: names, versions, file locking, provenance encoding.

A store is one HDF5 file (see ``docs/stores.md`` for the full schema)::

    /features/<kind>   (N, D) float32 (or float16), chunked by rows, one per feature set
    /views/<kind>      (V, N_train, D) augmented views of the training rows (optional)
    /table/<column>    the per-image table of :mod:`credanno.table`, rows in table order
    root attributes    schema, schema_version, n_rows, feature_sets, default_kind,
                       n_views, provenance (JSON), credanno_version, created,
                       content_id (random hex, stamped when the writer closes)

Everything a reader needs is in plain HDF5 datasets and string attributes, so h5py,
MATLAB, R or Julia can use a store without credanno.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from credanno.errors import CredannoError

SCHEMA = "credanno.store"
#: Bumped whenever a reader of an older version could misread a newer file.
SCHEMA_VERSION = 1

#: Environment switch for HDF5 file locking (network filesystems: NFS, Lustre, SMB).
LOCKING_ENV = "CREDANNO_HDF5_LOCKING"
_LOCKING_VALUES: dict[str, bool | str] = {
    "1": True, "true": True, "yes": True, "on": True,
    "0": False, "false": False, "no": False, "off": False,
    "best-effort": "best-effort", "best_effort": "best-effort",
}

#: Target size of one HDF5 chunk of a feature dataset: large enough that a split reads
#: at disk speed, small enough that a few rows cost little.
CHUNK_BYTES = 2 << 20


def hdf5_locking(locking: bool | str | None = None) -> bool | str | None:
    """Resolve the HDF5 file-locking mode: argument, else ``$CREDANNO_HDF5_LOCKING``.

    ``None`` keeps HDF5's default (which itself honours ``HDF5_USE_FILE_LOCKING``).
    ``False`` is the switch for network filesystems whose ``flock`` fails or hangs;
    ``"best-effort"`` locks where the filesystem supports it and ignores failures.
    """
    if locking is None:
        raw = os.environ.get(LOCKING_ENV, "").strip().lower()
        if not raw:
            return None
        if raw not in _LOCKING_VALUES:
            raise CredannoError(
                f"{LOCKING_ENV}={raw!r} is not understood; use 0 (off, for network "
                "filesystems), 1 (on) or best-effort")
        return _LOCKING_VALUES[raw]
    if locking not in (True, False, "best-effort"):
        raise CredannoError(f"locking={locking!r} is not understood; use True, False or "
                            "'best-effort'")
    return locking


def h5open(path: Path, mode: str, locking: bool | str | None = None, **kwargs: Any) -> h5py.File:
    """``h5py.File`` with the resolved locking mode (h5py's argument only when set)."""
    resolved = hdf5_locking(locking)
    if resolved is not None:
        kwargs["locking"] = resolved
    return h5py.File(path, mode, **kwargs)


def chunk_rows(dim: int, itemsize: int, n_rows: int) -> int:
    """Rows per chunk so that one chunk holds about :data:`CHUNK_BYTES`."""
    return int(max(1, min(max(n_rows, 1), CHUNK_BYTES // max(1, dim * itemsize))))


def encode_attr(value: Any) -> Any:
    """Scalars stay HDF5 scalars; anything else becomes a JSON string."""
    if isinstance(value, (str, bool, int, float)):
        return value
    return json.dumps(value, default=_json_default, sort_keys=True)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in provenance")


def decode_attr(value: Any) -> Any:
    """Inverse of :func:`encode_attr` for attributes known to hold JSON."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def to_json(value: Any, sort_keys: bool = True) -> str:
    try:
        return json.dumps(value, default=_json_default, sort_keys=sort_keys)
    except (TypeError, ValueError) as exc:
        raise CredannoError(f"provenance cannot be stored ({exc}); use JSON values (str, "
                            "numbers, lists, dicts)") from None


def is_lock_error(exc: OSError) -> bool:
    """Whether HDF5 failed to lock the file (typical of network filesystems)."""
    return bool(re.search(r"\block(ing)? file|\bflock|file lock", str(exc), re.IGNORECASE))


LOCK_HINT = "on a network filesystem set CREDANNO_HDF5_LOCKING=0 (see docs/stores.md)"


def from_json(value: Any, what: str, path: Path) -> Any:
    try:
        return json.loads(decode_attr(value))
    except (TypeError, ValueError):
        raise CredannoError(f"{path}: attribute {what!r} is not valid JSON (corrupt store); "
                            "re-create it with `credanno embed`") from None


def read_content_id(path: str | os.PathLike) -> str | None:
    """The ``content_id`` attribute of an HDF5 file (patch file, store), or None.

    None when the file is not HDF5 or carries no id (files of older versions); the caller
    then identifies the file by its bytes. Only the attribute is read.
    """
    try:
        if not h5py.is_hdf5(path):
            return None
        with h5open(Path(path), "r") as f:
            value = decode_attr(f.attrs.get("content_id", None))
    except OSError:
        return None
    return None if value is None else str(value)
