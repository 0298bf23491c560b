"""Mapping CT numbers (HU) of a patch to [0, 1]: a fixed lung window, or per-patch min-max.

The public cRedAnno code saved each patch min-max stretched (``minmax``): the brightest
pixel of every patch is 1 whatever its density, so patches are not comparable. The
default ``window`` maps a fixed HU range linearly to [0, 1] (clipped) instead.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from credanno.errors import CredannoError

#: Air (-1000 HU) to dense soft tissue / faint calcification (+400 HU).
LUNG_WINDOW_HU: tuple[float, float] = (-1000.0, 400.0)

_MODES: dict[str, Callable[[np.ndarray], np.ndarray]] = {}


def register_intensity(name: str):
    def wrap(fn: Callable[[np.ndarray], np.ndarray]):
        _MODES[name] = fn
        return fn
    return wrap


@register_intensity("window")
def window(hu: np.ndarray) -> np.ndarray:
    lo, hi = LUNG_WINDOW_HU
    return np.clip((np.asarray(hu, np.float32) - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


@register_intensity("minmax")
def minmax(hu: np.ndarray) -> np.ndarray:
    """Per patch (over the last two axes); a constant patch maps to 0."""
    x = np.asarray(hu, np.float32)
    lo = x.min(axis=(-2, -1), keepdims=True)
    span = x.max(axis=(-2, -1), keepdims=True) - lo
    return np.where(span > 0, (x - lo) / np.where(span > 0, span, 1), 0).astype(np.float32)


def intensity_names() -> list[str]:
    return list(_MODES)


def get_intensity(name: str) -> Callable[[np.ndarray], np.ndarray]:
    try:
        return _MODES[name]
    except KeyError:
        raise CredannoError(
            f"unknown intensity mode {name!r}; choose one of: {', '.join(_MODES)}") from None
