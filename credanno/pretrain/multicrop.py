"""DINO multi-crop augmentation on batched tensors, so that it runs where the model runs.

Each image gives 2 global crops and ``n_local`` local crops (Caron et al. 2021, section 3;
the paper's section 3.1): random resized crop (bicubic) and horizontal flip, colour jitter
(brightness and contrast, p = 0.8; saturation, hue and greyscale are no-ops on grey patches),
Gaussian blur (p = 1.0 / 0.1 / 0.5 for global 1 / global 2 / local crops) and solarisation
(p = 0.2 on global 2), then normalisation with the LIDC mean/std and 3 channels. Options for
nodule-centred patches (off by default): local crops kept near the centre, in-plane rotation,
and crop 2 and the local crops taken from a second image (see :mod:`.nodule_views`).

Randomness is *counter-based*, from the project's one augmentation RNG
(:mod:`credanno.augment.rng`, shared with embed's views and the supervised baseline): every
random number is a hash of (run seed, epoch, image index, crop, parameter), computed with
integer tensor ops. An image's crops therefore do not depend on the batch it lands in, on
the device, or on the number of ranks, which makes distributed shards reproduce the
single-process batch and resumes bit-exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from credanno.augment.rng import crop_keys, uniforms
from credanno.transforms import LIDC_MEAN, LIDC_STD


@dataclass(frozen=True)
class CropPolicy:
    """Probabilities of the photometric augmentations for one kind of crop."""

    blur: float
    solarize: float = 0.0
    jitter: float = 0.8
    flip: float = 0.5


#: DINO's policies: global crop 1, global crop 2, every local crop.
GLOBAL_1 = CropPolicy(blur=1.0)
GLOBAL_2 = CropPolicy(blur=0.1, solarize=0.2)
LOCAL = CropPolicy(blur=0.5)

_N_PARAMS = 13  # random numbers drawn per crop (counter-based: adding one keeps the rest)


@dataclass(frozen=True)
class CropSpec:
    """What the multi-crop draws: sizes, scale ranges, photometric strengths, normalisation.

    Defaults are DINO's (224 px global crops of area 0.4-1, eight 96 px local crops of area
    0.05-0.4, blur sigma 0.1-2 px, brightness and contrast 0.4); ``local_shift`` < 1 keeps
    local crops near the patch centre, ``rotation`` > 0 turns every crop (degrees).
    """

    global_size: int = 224
    local_size: int = 96
    n_local: int = 8
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    brightness: float = 0.4
    contrast: float = 0.4
    mean: float = LIDC_MEAN
    std: float = LIDC_STD
    channels: int = 3
    interpolation: str = "bicubic"
    local_shift: float = 1.0
    rotation: float = 0.0

    def __post_init__(self) -> None:
        # lists from a TOML/JSON config become tuples, so the spec stays hashable
        for name in ("global_scale", "local_scale", "blur_sigma"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @classmethod
    def from_config(cls, cfg: Any) -> CropSpec:
        """The crops of a :class:`~credanno.pretrain.config.PretrainConfig`."""
        return cls(global_size=cfg.global_size, local_size=cfg.local_size,
                   n_local=cfg.local_crops, global_scale=cfg.global_scale,
                   local_scale=cfg.local_scale, blur_sigma=cfg.blur_sigma,
                   local_shift=cfg.local_shift, rotation=cfg.rotation)


class MultiCrop:
    """Callable ``(images (B, H, W) in [0, 1], keys (B,)) -> list of 2 + n_local crops``.

    Crops are returned crop-major: ``crops[c][b]`` is crop ``c`` of image ``b``, each
    (B, channels, size, size) and normalised.
    """

    def __init__(self, spec: CropSpec | None = None):
        self.spec = CropSpec() if spec is None else spec

    @property
    def n_crops(self) -> int:
        return 2 + self.spec.n_local

    def __call__(self, images: torch.Tensor, keys: torch.Tensor,
                 second: torch.Tensor | None = None) -> list[torch.Tensor]:
        """``second``: optional (B, H, W) images for global crop 2 and the local crops
        (e.g. another radiologist's patch of the same nodule); default ``images``."""
        sp = self.spec
        x = self._as_batch(images)
        y = x if second is None else self._as_batch(second)
        b = x.shape[0]
        crops = self._group([x, y], keys, [0, 1], [GLOBAL_1, GLOBAL_2], sp.global_size,
                            sp.global_scale, 1.0).split(b)
        out = list(crops)
        if sp.n_local:
            ids = list(range(2, 2 + sp.n_local))
            out += list(self._group([y] * sp.n_local, keys, ids, [LOCAL] * sp.n_local,
                                    sp.local_size, sp.local_scale, sp.local_shift).split(b))
        return out

    @staticmethod
    def _as_batch(images: torch.Tensor) -> torch.Tensor:
        return (images if images.ndim == 4 else images.unsqueeze(1)).float()

    def _group(self, sources: list[torch.Tensor], keys: torch.Tensor, crop_ids: list[int],
               policies: list[CropPolicy], size: int, scale: tuple[float, float],
               shift: float) -> torch.Tensor:
        """All crops of one size in one batched pass (crop c from ``sources[c]``);
        rows are crop-major."""
        b, dev = sources[0].shape[0], sources[0].device
        u = uniforms(crop_keys(keys.to(dev), crop_ids), _N_PARAMS)

        def per_row(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, device=dev).repeat_interleave(b)

        src = torch.cat(sources)
        out = self._resized_crop(src, u, size, scale, shift, per_row([p.flip for p in policies]))
        out = self._jitter(out, u, per_row([p.jitter for p in policies]))
        out = self._blur(out, u, per_row([p.blur for p in policies]))
        solar = (u[:, 11] < per_row([p.solarize for p in policies]))[:, None, None, None]
        out = torch.where(solar & (out >= 0.5), 1.0 - out, out)
        out = (out - self.spec.mean) / self.spec.std
        channels = self.spec.channels
        return out.expand(-1, channels, -1, -1) if channels != 1 else out

    def _resized_crop(self, x: torch.Tensor, u: torch.Tensor, size: int,
                      scale: tuple[float, float], shift: float,
                      p_flip: torch.Tensor) -> torch.Tensor:
        """torchvision's RandomResizedCrop (area ``scale``, ratio 3/4..4/3) + flip, as one
        affine resampling. Crops wider than the image are clamped rather than redrawn.

        ``shift`` < 1 keeps the crop centre within that fraction of the free room around
        the image centre (1 = anywhere, as torchvision), so that small crops of a centred
        nodule patch still show the nodule. ``spec.rotation`` > 0 also turns the crop by a
        uniform angle in +/- that many degrees about its centre (an axial CT slice has no
        preferred in-plane orientation)."""
        area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
        log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[:, 1]
        ratio = torch.exp(log_ratio)
        w = torch.sqrt(area * ratio).clamp(max=1.0)
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = shift * (1 - w) * (2 * u[:, 2] - 1)  # crop centre in shift * [-1 + w, 1 - w]
        cy = shift * (1 - h) * (2 * u[:, 3] - 1)
        flip = torch.where(u[:, 4] < p_flip, -1.0, 1.0)
        angle = math.radians(self.spec.rotation) * (2 * u[:, 12] - 1)
        cos, sin = torch.cos(angle), torch.sin(angle)
        # output -> input coordinates: scale (and flip) the crop, then rotate it, then shift
        theta = torch.stack([torch.stack([cos * w * flip, -sin * h, cx], -1),
                             torch.stack([sin * w * flip, cos * h, cy], -1)], 1)
        grid = F.affine_grid(theta, [x.shape[0], 1, size, size], align_corners=False)
        out = F.grid_sample(x, grid, mode=self.spec.interpolation, padding_mode="border",
                            align_corners=False)
        return out.clamp_(0.0, 1.0)

    def _jitter(self, x: torch.Tensor, u: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Brightness and contrast factors in [1 - s, 1 + s], applied in a random order."""
        s_b, s_c = self.spec.brightness, self.spec.contrast
        apply = (u[:, 5] < p)[:, None, None, None]
        bright = (1 - s_b + 2 * s_b * u[:, 6])[:, None, None, None]
        contr = (1 - s_c + 2 * s_c * u[:, 7])[:, None, None, None]

        def brightness(t):
            return (t * bright).clamp(0.0, 1.0)

        def contrast(t):
            m = t.mean(dim=(1, 2, 3), keepdim=True)
            return (contr * t + (1 - contr) * m).clamp(0.0, 1.0)

        b_first = (u[:, 8] < 0.5)[:, None, None, None]
        jittered = torch.where(b_first, contrast(brightness(x)), brightness(contrast(x)))
        return torch.where(apply, jittered, x)

    def _blur(self, x: torch.Tensor, u: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian blur with a per-image sigma; a delta kernel where not applied."""
        lo, hi = self.spec.blur_sigma
        radius = min(max(1, math.ceil(3 * hi)), x.shape[-1] - 1)
        sigma = (lo + (hi - lo) * u[:, 10])[:, None]
        t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)[None, :]
        kernel = torch.exp(-(t**2) / (2 * sigma**2))
        kernel = kernel / kernel.sum(dim=1, keepdim=True)
        delta = (t == 0).to(x.dtype).expand_as(kernel)
        kernel = torch.where((u[:, 9] < p)[:, None], kernel, delta)
        n, _, hgt, wid = x.shape
        y = x.reshape(1, n, hgt, wid)
        y = F.pad(y, (radius, radius, radius, radius), mode="reflect")
        y = F.conv2d(y, kernel[:, None, :, None], groups=n)
        y = F.conv2d(y, kernel[:, None, None, :], groups=n)
        return y.reshape(n, 1, hgt, wid)

