"""Write a small HDF5 file whole: built in memory, then written out with one plain write.

HDF5 (2.0) can crash the process (a segmentation fault inside ``H5Fclose``) when a write
fails for lack of disk space while chunk data are still cached. Building the file in a
``BytesIO`` keeps every HDF5 write in memory; the bytes then reach the disk through
:func:`credanno._atomic.atomic_path`, where a full disk is an ordinary ``OSError`` and
becomes one line. Used for files that fit in memory (patch files, caches); streamed
feature stores reserve their space up front instead (see :mod:`credanno.stores.writer`).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import h5py

from credanno._atomic import atomic_path


def write_h5_whole(path: str | os.PathLike, fill: Callable[[h5py.File], None], *,
                   option: str = "--out") -> Path:
    """Call ``fill(file)`` on an in-memory HDF5 file, then write it atomically to ``path``."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        fill(f)
    path = Path(path)
    with atomic_path(path, option=option) as tmp, open(tmp, "wb") as out:
        out.write(buffer.getbuffer())
    return path
