"""Registry of patch sources (``phantom``, ``lidc``, ``folder``), timm-style.

A source turns :class:`PrepareOptions` into a :class:`PatchBatch`: images, the
per-image table (with ``split``, train rows first), provenance attributes and the
number of annotations it had to skip, per reason. :func:`credanno.data.prepare` writes
the batch to a patch file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from credanno.data.selection import SelectionParams
from credanno.errors import CredannoError


@dataclass
class PrepareOptions:
    split: str = "nodule"
    seed: int = 42
    dicom_root: str | Path | None = None
    folder: str | Path | None = None
    intensity: str = "window"
    progress: bool = False
    selection: SelectionParams = field(default_factory=SelectionParams)
    #: Restrict the LIDC selection to these patient ids (None = all).
    patients: Sequence[str] | None = None


@dataclass
class PatchBatch:
    images: np.ndarray
    table: pd.DataFrame
    attrs: dict[str, Any]
    skipped: dict[str, int]
    #: True when the selection came from the cache (no clustering was needed).
    cached: bool = False


class PatchSource(Protocol):
    name: str

    def build(self, options: PrepareOptions) -> PatchBatch: ...


_SOURCES: dict[str, Callable[[], PatchSource]] = {}


def register_source(name: str):
    """Class decorator: make a source available to ``prepare(source=name)``."""
    def wrap(cls):
        cls.name = name
        _SOURCES[name] = cls
        return cls
    return wrap


def source_names() -> list[str]:
    _load_builtin()
    return list(_SOURCES)


def create_source(name: str) -> PatchSource:
    _load_builtin()
    try:
        return _SOURCES[name]()
    except KeyError:
        raise CredannoError(
            f"unknown source {name!r}; choose one of: {', '.join(_SOURCES)}") from None


def _load_builtin() -> None:
    # Importing the modules runs their @register_source decorators.
    from credanno.data import folder, lidc, phantom_source  # noqa: F401
