"""The evaluation transform: grey patches -> normalised encoder input, batched on tensors.

The paper (``protocol.md``): replicate the 32 x 32 grey patch to 3 channels, resize to 256,
centre-crop 224, normalise with mean 0.2281, std 0.2515. Native-scale encoders (the
``cpu-tiny`` preset) use ``resize == crop == 32``. Encoders with ImageNet weights are
normalised per channel with their own statistics (``mean``/``std`` tuples, one per channel).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

#: The paper's normalisation of LIDC patches (protocol.md).
LIDC_MEAN = 0.2281
LIDC_STD = 0.2515


@dataclass(frozen=True)
class EvalTransform:
    """Resize (bicubic) to ``resize``, centre-crop ``crop``, normalise, 3 channels.

    ``mean``/``std`` are one value for every channel or a tuple of one per channel.
    """

    resize: int = 32
    crop: int = 32
    mean: float | tuple[float, ...] = LIDC_MEAN
    std: float | tuple[float, ...] = LIDC_STD
    channels: int = 3

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: (B, H, W) or (B, 1, H, W) float in [0, 1] -> (B, C, crop, crop)."""
        x = images if images.ndim == 4 else images.unsqueeze(1)
        x = x.float()
        if x.shape[-1] != self.resize or x.shape[-2] != self.resize:
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bicubic",
                              align_corners=False)
        if self.crop != self.resize:
            top = (self.resize - self.crop) // 2
            x = x[..., top:top + self.crop, top:top + self.crop]
        if isinstance(self.mean, tuple) or isinstance(self.std, tuple):
            # per channel: broadcasting the grey channel against (1, C, 1, 1) replicates it
            shape = (1, -1, 1, 1)
            mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device).reshape(shape)
            std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device).reshape(shape)
            x = (x - mean) / std
        else:
            x = (x - self.mean) / self.std
        return x.expand(-1, self.channels, -1, -1) if self.channels != x.shape[1] else x

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EvalTransform:
        kw = {k: d[k] for k in ("resize", "crop", "mean", "std", "channels") if k in d}
        # per-channel statistics come back from JSON as lists; the dataclass is frozen
        for k in ("mean", "std"):
            if isinstance(kw.get(k), list):
                kw[k] = tuple(float(v) for v in kw[k])
        return cls(**kw)
