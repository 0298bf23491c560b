"""The patch file: stage 1's output, one HDF5 file of labelled nodule patches.

Layout (documented in the README):

- ``/images``: (N, H, W) float32 in [0, 1], one grey patch per LIDC annotation;
- ``/table/<column>``: the per-image table of :mod:`credanno.table`;
- root attributes: ``schema`` ("credanno.patches"), ``schema_version``, ``source``,
  ``selection`` (JSON), ``seed``, ``intensity``, ``credanno_version``, ``created``,
  ``content_id`` (a random hex id written with the file: same id, same content).

Every open checks the layout from dataset shapes: ``/images`` is (N, H, H) with N equal to
the table's rows, every table column has N rows, and ``split`` holds only train/test.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from credanno import __version__
from credanno.errors import CredannoError
from credanno.stores.h5image import write_h5_whole
from credanno.stores.h5table import read_column, read_table, table_problem, write_table
from credanno.table import split_problem

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
    if images.ndim != 3 or len(images) != len(table) or images.shape[1] != images.shape[2]:
        raise CredannoError(f"images must be square (N, H, H) with N = {len(table)} table "
                            f"rows; got {images.shape}")
    if not np.isfinite(images).all():
        raise CredannoError("patch images contain NaN or Inf; fix the patch source")
    meta = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION,
            "credanno_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    for key, value in (attrs or {}).items():
        meta[key] = value if isinstance(value, (str, int, float, bool)) else json.dumps(value)
    # A fresh id per written file: readers and caches can tell two files apart (or know
    # one unchanged) without hashing the images.
    meta["content_id"] = uuid.uuid4().hex
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
    try:
        _check(f, path)
    except BaseException:
        f.close()
        raise
    return f


def _check(f: h5py.File, path: Path) -> None:
    schema = f.attrs.get("schema")
    if (schema.decode() if isinstance(schema, bytes) else schema) != SCHEMA:
        raise CredannoError(f"{path} is not a credanno patch file; create one with "
                            "`credanno prepare`")
    try:
        version = int(f.attrs.get("schema_version", 0))
        problem = _layout_problem(f)
    except (OSError, TypeError, ValueError, KeyError) as exc:
        problem = f"it cannot be read ({str(exc).splitlines()[0] if str(exc) else exc!r})"
        version = 0
    if version > SCHEMA_VERSION:
        raise CredannoError(f"{path} has a newer patch-file schema; upgrade credanno")
    if problem:
        raise CredannoError(f"{path} is a damaged patch file: {problem}; re-create it with "
                            "`credanno prepare`")


def _layout_problem(f: h5py.File) -> str | None:
    """What is wrong with the images/table layout (None when nothing), from shapes only."""
    if not isinstance(f.get("images"), h5py.Dataset):
        return "it has no /images dataset"
    if not isinstance(f.get("table"), h5py.Group):
        return "it has no /table group"
    problem = table_problem(f["table"])
    if problem:
        return problem
    shape = f["images"].shape
    n_rows = f["table"]["split"].shape[0]
    if len(shape) != 3:
        return f"/images has shape {shape}, not (N, H, W)"
    if shape[0] != n_rows:
        return f"/images holds {shape[0]} images but the table has {n_rows} rows"
    if shape[1] != shape[2] or shape[1] < 1:
        # embed and pretrain both need square patches; refusing here covers every reader
        return f"/images are {shape[1]} x {shape[2]} pixels, not square"
    return split_problem(read_column(f["table"], "split"))


def read_patch_file(path: str | os.PathLike, *, images: bool = True) -> PatchSet:
    """Read a patch file. ``images=False`` reads only the table and attributes."""
    path = Path(path)
    with _open(path) as f:
        try:
            table = read_table(f["table"])
            imgs = f["images"][...] if images else np.empty((0, 0, 0), np.float32)
        except OSError as exc:
            raise CredannoError(f"cannot read {path} ({str(exc).splitlines()[0]}); the file "
                                "is damaged; re-create it with `credanno prepare`") from None
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
