"""Resize a 2-D patch to the model's input size (the protocol's "resized to 32 x 32").

Pixel centres are mapped onto each other (align-corners false) and a Gaussian
pre-filter with sigma = (scale - 1) / 2 prevents aliasing when shrinking, the same
convention as ``skimage.transform.resize(order=1, anti_aliasing=True)`` that the public
cRedAnno extraction used; here with scipy only.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def resize_patch(image: np.ndarray, size: int = 32) -> np.ndarray:
    """Bilinear, anti-aliased resize of a 2-D array to ``size x size`` (float32)."""
    image = np.asarray(image, dtype=np.float32)
    if image.shape == (size, size):
        return image.copy()
    scale = np.array(image.shape, dtype=np.float64) / size
    sigma = np.maximum(0.0, (scale - 1.0) / 2.0)
    if np.any(sigma > 0):
        image = ndimage.gaussian_filter(image, sigma=sigma, mode="nearest")
    centres = [(np.arange(size) + 0.5) * s - 0.5 for s in scale]
    grid = np.meshgrid(*centres, indexing="ij")
    return ndimage.map_coordinates(image, grid, order=1, mode="nearest").astype(np.float32)
