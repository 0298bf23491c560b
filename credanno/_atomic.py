"""Write-then-rename, so that an interrupted run never leaves a file that looks complete.

Every file credanno writes goes through :func:`atomic_path`. The rules it enforces:

- the new file appears at its path complete or not at all, and whatever stood there before
  is left intact on any failure (a full disk included);
- a new file gets the mode a plain ``open()`` would give (``0o666 & ~umask``); an
  overwritten file keeps its mode;
- a symbolic link is followed: its target is replaced, the link stays;
- character devices, FIFOs and sockets (``/dev/stdout``, ``/dev/null``, a named pipe) are
  written through directly, since there is nothing to rename onto;
- OS errors become one-line :class:`~credanno.errors.CredannoError` messages naming the
  path and the option that chose it;
- temporary files carry the writer's host and process id, so that a later writer can
  remove those left by a process that died (``kill -9``) without touching a live one's.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import socket
import stat
import zlib
from collections.abc import Iterator
from pathlib import Path

from credanno.errors import CredannoError

#: errno values that mean "the disk (or this process's file-size limit) is full".
SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
#: How some libraries (HDF5) report those errors in text rather than in ``errno``.
_SPACE_TEXT = ("no space left", "errno = 28", "disk quota", "file too large", "errno = 27")
#: Below this much free space, any write failure is taken to be a full disk: HDF5 can
#: report the consequence (a failed flush or close) rather than the ENOSPC itself.
_NEARLY_FULL = 1 << 20
_HOST = f"{zlib.crc32(socket.gethostname().encode()) & 0xFFFFFF:06x}"
_SUFFIX = ".part"


def is_space_error(exc: BaseException, folder: Path | None = None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) means the disk is full."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in SPACE_ERRNOS:
            return True
        if isinstance(exc, (OSError, RuntimeError)) and any(
                t in str(exc).lower() for t in _SPACE_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    if folder is not None:
        with contextlib.suppress(OSError):
            return shutil.disk_usage(folder).free < _NEARLY_FULL
    return False


def _free_text(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "no space left"
    return f"{free / 2**20:.1f} MiB free" if free < 2**30 else f"{free / 2**30:.1f} GiB free"


def space_error(path: Path, option: str = "--out") -> CredannoError:
    """The one-line error for a full disk while writing ``path``."""
    return CredannoError(f"not enough disk space for {path} ({_free_text(path.parent)}); "
                         f"free some space or choose another {option}")


def check_space(path: str | os.PathLike, nbytes: int, option: str = "--out") -> None:
    """Refuse to start writing ``nbytes`` to ``path`` when its filesystem has less free.

    Checked before a writer starts, so that a full disk is reported at once and never
    reaches a library (HDF5) that handles a failed write badly.
    """
    path = Path(path)
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < nbytes:
        raise CredannoError(f"not enough disk space for {path} (needs {nbytes / 2**20:.1f} MiB, "
                            f"{_free_text(folder)}); free some space or choose another {option}")


def os_error(exc: OSError, path: Path, option: str = "--out") -> CredannoError:
    """One line for an OS error met while writing ``path`` (space, permission, name)."""
    if is_space_error(exc):
        return space_error(path, option)
    reason = exc.strerror or str(exc).splitlines()[0]
    if exc.errno == errno.ENAMETOOLONG:
        return CredannoError(f"file name too long: {path.name[:40]}... ({len(path.name)} "
                             f"characters); choose a shorter {option}")
    if exc.errno in (errno.ENOTDIR, errno.EEXIST) and not path.parent.is_dir():
        return CredannoError(f"cannot write {path}: {path.parent} is not a folder; "
                             f"choose another {option}")
    return CredannoError(f"cannot write {path} ({reason}); choose a writable {option}")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _target(path: Path) -> Path:
    """The file to replace: a symbolic link's (final) target, else ``path`` itself."""
    if path.is_symlink():
        return Path(os.path.realpath(path))
    return path


#: Names of a process's own streams: even when stdout is redirected to a regular file,
#: replacing that file would cut it off from the shell's open descriptor.
_STREAM_NAMES = ("/dev/stdout", "/dev/stderr", "/dev/fd/", "/proc/")


def _writes_through(path: Path) -> bool:
    """Devices, FIFOs, sockets and the process's streams cannot be renamed onto."""
    if str(path).startswith(_STREAM_NAMES):
        return True
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) \
        or stat.S_ISBLK(mode)


def _temp_name(target: Path) -> str:
    # The name is cut so that the temp name stays within the 255-byte limit of most
    # filesystems whenever the target's own name fits.
    stem = target.name[:200]
    return f".{stem}.{_HOST}-{os.getpid()}-{secrets.token_hex(3)}{_SUFFIX}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def remove_stale_parts(target: Path) -> list[Path]:
    """Delete temp files for ``target`` left by dead processes of this host; return them."""
    removed = []
    prefix = f".{target.name[:200]}.{_HOST}-"
    with contextlib.suppress(OSError):
        for entry in os.scandir(target.parent):
            name = entry.name
            if not (name.startswith(prefix) and name.endswith(_SUFFIX)):
                continue
            pid = name[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def _make_temp(target: Path, option: str) -> Path:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise CredannoError(f"cannot write into {target.parent}: it exists and is not a "
                            f"folder; choose another {option}") from None
    except OSError as exc:
        raise CredannoError(f"cannot create folder {target.parent} ({exc.strerror}); "
                            f"choose a writable {option}") from None
    remove_stale_parts(target)
    tmp = target.parent / _temp_name(target)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise os_error(exc, target, option) from None
        raise CredannoError(f"cannot write to {target.parent} ({exc.strerror}); "
                            f"choose a writable {option}") from None
    return tmp


def writable_folder(folder: str | os.PathLike, option: str = "--out") -> Path:
    """Create ``folder`` (and parents) and check that files can be made in it, or fail with
    one line; for commands that write many files, so they fail before any work is done."""
    folder = Path(folder)
    probe = _make_temp(folder / "probe", option)  # mkdir + create, errors already one line
    probe.unlink()
    return folder


def _final_mode(target: Path) -> int:
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        return 0o666 & ~_umask()


@contextlib.contextmanager
def _write_through(path: Path, option: str) -> Iterator[Path]:
    try:
        yield path
    except OSError as exc:
        raise os_error(exc, path, option) from None
    except RuntimeError as exc:
        if is_space_error(exc):
            raise space_error(path, option) from None
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True,
                option: str = "--out") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    On any exception (including KeyboardInterrupt) the temporary file is removed and
    whatever already stood at ``path`` is left untouched. ``option`` names the command-line
    option that chose ``path``, for error messages. See the module docstring for symlinks,
    devices and file modes.
    """
    path = Path(path)
    if _writes_through(path):
        with _write_through(path, option) as through:
            yield through
        return
    target = _target(path)
    if target.exists() and not overwrite:
        raise CredannoError(f"{path} already exists; remove it or pass --overwrite")
    if target.is_dir():
        raise CredannoError(f"{path} is a folder; name a file for {option}")
    tmp = _make_temp(target, option)
    try:
        try:
            yield tmp
            os.chmod(tmp, _final_mode(target))
            os.replace(tmp, target)
        except CredannoError:
            raise
        except BaseException as exc:
            if isinstance(exc, (OSError, RuntimeError)) and is_space_error(exc, target.parent):
                raise space_error(path, option) from None
            if isinstance(exc, OSError) and exc.errno is not None and \
                    {str(exc.filename), str(exc.filename2)} & {str(tmp), str(target)}:
                raise os_error(exc, path, option) from None
            raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
