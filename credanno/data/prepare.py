"""Stage 1 entry point: select LIDC nodules and write one labelled patch file.

``prepare(source="phantom")`` is what ``credanno prepare`` and ``credanno demo`` call.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from credanno import checks
from credanno.data.intensity import get_intensity
from credanno.data.patchfile import write_patch_file
from credanno.data.selection import SelectionParams
from credanno.data.sources import PrepareOptions, create_source
from credanno.data.splits import split_names
from credanno.data.summary import format_summary, summarize
from credanno.errors import CredannoError
from credanno.paths import DATA_DIR, DEFAULT_PATCH_FILE

DEFAULT_SPLIT = "nodule"
DEFAULT_SEED = 42
DEFAULT_INTENSITY = "window"


@dataclass
class PrepareResult:
    path: Path
    #: Counts per split beside the paper's (see :func:`credanno.data.summary.summarize`).
    summary: pd.DataFrame
    #: Annotations of selected nodules without an image, per reason.
    skipped: dict[str, int] = field(default_factory=dict)
    #: True when the nodule selection came from the cache.
    cached: bool = False

    def format(self) -> str:
        return format_summary(self.summary, self.skipped)


def default_output(source: str, split: str = DEFAULT_SPLIT, seed: int = DEFAULT_SEED,
                   intensity: str = DEFAULT_INTENSITY) -> Path:
    """Default patch file: ``data/phantom.h5`` for the defaults, else
    ``data/<source>[-<split>][-seed<N>][-<intensity>].h5`` (``data/folder.h5`` for folder)."""
    if source == "folder":
        return DATA_DIR / "folder.h5"
    name = source
    if split != DEFAULT_SPLIT:
        name += f"-{split}"
    if seed != DEFAULT_SEED:
        name += f"-seed{seed}"
    if intensity != DEFAULT_INTENSITY:
        name += f"-{intensity}"
    path = DATA_DIR / f"{name}.h5"
    return DEFAULT_PATCH_FILE if path == DATA_DIR / "phantom.h5" else path


def prepare(source: str = "phantom", split: str = DEFAULT_SPLIT, seed: int = DEFAULT_SEED,
            out: str | os.PathLike | None = None, dicom_root: str | os.PathLike | None = None,
            folder: str | os.PathLike | None = None, intensity: str = DEFAULT_INTENSITY,
            progress: bool = False, *, selection: SelectionParams | None = None,
            patients: Sequence[str] | None = None) -> PrepareResult:
    """Build a patch file from ``source`` (``phantom`` | ``lidc`` | ``folder``).

    ``split`` is ``nodule`` (the paper's 70/30 per-nodule draw), ``patient`` (no
    patient on both sides) or ``public`` (the public label files' exact split);
    ``seed`` drives the split draws and the phantom's intensities.
    ``selection`` overrides the selection parameters (e.g. ``public_skips=False`` for
    the plain recipe's 751 nodules); ``patients`` restricts the LIDC selection to some
    patient ids. The file is written atomically; nothing partial is left on failure.
    """
    if split not in split_names():
        raise CredannoError(f"unknown split {split!r}; choose one of: {', '.join(split_names())}")
    get_intensity(intensity)
    try:
        seed = int(seed)
    except (TypeError, ValueError):
        raise CredannoError(f"seed must be an integer, got {seed!r}") from None
    seed = checks.seed(seed)  # numpy's generators take seeds in [0, 2**32 - 1]
    src = create_source(source)
    options = PrepareOptions(split=split, seed=seed, dicom_root=dicom_root, folder=folder,
                             intensity=intensity, progress=progress,
                             selection=selection or SelectionParams(),
                             patients=list(patients) if patients is not None else None)
    batch = src.build(options)
    if len(batch.table) == 0:
        raise CredannoError(f"the {source} source selected no images; check its inputs")
    path = Path(out) if out is not None else default_output(source, split, seed, intensity)
    attrs = {k: v for k, v in batch.attrs.items() if v is not None}
    write_patch_file(path, batch.images, batch.table, attrs)
    summary = summarize(batch.table)
    summary.attrs["skipped"] = dict(batch.skipped)
    return PrepareResult(path=path, summary=summary, skipped=batch.skipped,
                         cached=batch.cached)
