"""The patch file: stage 1's output, one HDF5 file of labelled nodule patches.

Layout (documented in the README):

- ``/images``: (N, H, W) float32 in [0, 1], one grey patch per LIDC annotation;
- ``/table/<column>``: the per-image table of :mod:`credanno.table`;
- root attributes: ``schema`` ("credanno.patches"), ``schema_version``, ``source``,
  ``selection`` (JSON), ``seed``, ``intensity``, ``credanno_version``, ``created``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from credanno import __version__
from credanno.errors import CredannoError
from credanno.stores.h5image import write_h5_whole
from credanno.table import read_table, write_table

SCHEMA = "credanno.patches"
SCHEMA_VERSION = 1


@dataclass
class PatchSet:
    """Images, their table and the file's provenance attributes."""

    images: np.ndarray
    table: pd.DataFrame
    attrs: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.table)


def write_patch_file(path: str | os.PathLike, images: np.ndarray, table: pd.DataFrame,
                     attrs: dict[str, Any] | None = None) -> Path:
    """Write a patch file atomically (temp file, then rename). Returns the path."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 3 or len(images) != len(table):
        raise CredannoError(
            f"images must be (N, H, W) with N = {len(table)} table rows; got {images.shape}")
    if not np.isfinite(images).all():
        raise CredannoError("patch images contain NaN or Inf; fix the patch source")
    meta = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION,
            "credanno_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    for key, value in (attrs or {}).items():
        meta[key] = value if isinstance(value, (str, int, float, bool)) else json.dumps(value)
    path = Path(path)

    def fill(f: h5py.File) -> None:
        f.create_dataset("images", data=images, chunks=(min(256, len(images)) or 1,
                                                       *images.shape[1:]))
        write_table(f.create_group("table"), table.reset_index(drop=True))
        f.attrs.update(meta)

    return write_h5_whole(path, fill)


def _open(path: Path) -> h5py.File:
    if not path.exists():
        raise CredannoError(f"patch file {path} not found; create it with `credanno prepare`")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise CredannoError(
            f"{path} is not a readable HDF5 file (truncated or corrupt); "
            "re-create it with `credanno prepare`") from None
    if f.attrs.get("schema") != SCHEMA:
        f.close()
        raise CredannoError(f"{path} is not a credanno patch file; create one with "
                            "`credanno prepare`")
    if int(f.attrs.get("schema_version", 0)) > SCHEMA_VERSION:
        f.close()
        raise CredannoError(f"{path} has a newer patch-file schema; upgrade credanno")
    return f


def read_patch_file(path: str | os.PathLike, *, images: bool = True) -> PatchSet:
    """Read a patch file. ``images=False`` reads only the table and attributes."""
    path = Path(path)
    with _open(path) as f:
        table = read_table(f["table"])
        imgs = f["images"][...] if images else np.empty((0, 0, 0), np.float32)
        attrs = {}
        for key, value in f.attrs.items():
            if isinstance(value, bytes):
                value = value.decode()
            if isinstance(value, str) and value[:1] in "{[":
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    pass
            attrs[key] = value.item() if isinstance(value, np.generic) else value
    return PatchSet(images=imgs, table=table, attrs=attrs)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (provenance of patch files and checkpoints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
