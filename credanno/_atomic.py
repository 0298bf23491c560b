"""Write-then-rename, so that an interrupted run never leaves a file that looks complete."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from credanno.errors import CredannoError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True,
                option: str = "--out") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    On any exception (including KeyboardInterrupt) the temporary file is removed and
    whatever already stood at ``path`` is left untouched. ``option`` names the command-line
    option that chose ``path``, for error messages.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise CredannoError(f"{path} already exists; remove it or pass --overwrite")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise CredannoError(
            f"cannot write to {path.parent} ({exc.strerror}); choose a writable {option}"
        ) from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
