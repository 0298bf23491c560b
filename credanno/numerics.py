"""Small numeric helpers with one home each: the finite-feature check, L2 normalisation
and the mean ± sd text of tables and reports.

The store writer keeps its own fused finite check (a fast path over whole blocks,
``credanno.stores.writer``); every other check of features goes through
:func:`require_finite`, so a NaN is reported with the same message wherever it is found.
"""

from __future__ import annotations

import math

import numpy as np

from credanno.errors import CredannoError


def require_finite(x: np.ndarray, what: str = "features") -> np.ndarray:
    """``x`` unchanged when every value is finite, else one line naming ``what`` (e.g.
    ``"stores/a.h5 training features"``) and how many rows hold a NaN or Inf."""
    x = np.asarray(x)
    if np.isfinite(x).all():
        return x
    rows = x.reshape(len(x), -1) if x.ndim > 1 else x.reshape(-1, 1)
    bad = int((~np.isfinite(rows)).any(axis=1).sum())
    raise CredannoError(f"{what}: {bad} of {len(rows)} rows contain NaN or Inf; re-run "
                        "`credanno embed` (the encoder produced invalid output) or clean them")


def l2_normalise(x: np.ndarray, *, dtype: type = np.float32,
                 what: str = "features") -> np.ndarray:
    """Row-wise L2 normalisation into a C-contiguous ``dtype`` array (zero rows stay zero),
    so that dot products are cosine similarities. NaN/Inf is refused (:func:`require_finite`)."""
    x = np.ascontiguousarray(x, dtype=dtype)
    if x.ndim != 2:
        raise CredannoError(f"{what} must be a 2-D array (rows, dim), got shape {x.shape}")
    require_finite(x, what)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=dtype)


def _finite(v: float | None) -> bool:
    try:
        return v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def mean_sd(mean: float | None, sd: float | None = None, *, percent: bool = True,
            pm: str = "±", sd_width: int = 0) -> str:
    """``"83.61 ± 1.28"`` (``percent``: fractions shown as percent, 2 decimals).

    No ``± sd`` without an sd, or where it is 0 (the seeds agreed exactly, as k-NN with all
    labels always does); ``""`` for a missing mean. ``pm`` and ``sd_width`` keep the plain
    text table of ``credanno knn``/``probe`` (``+/-``, sd right-aligned in 5 characters).
    """
    if not _finite(mean):
        return ""
    scale = 100.0 if percent else 1.0
    text = f"{float(mean) * scale:.2f}"
    if _finite(sd) and float(sd) > 0:
        text += f" {pm} {float(sd) * scale:{sd_width}.2f}"
    return text
