"""The DINO projection head and the multi-crop wrapper (Caron et al. 2021, appendix).

The head is an MLP (``nlayers`` linear layers with GELU, ``hidden_dim`` = 2048) down to a
``bottleneck_dim`` = 256 embedding, L2-normalised, followed by a weight-normalised linear
layer to ``K`` = 65536 prototypes. With ``norm_last_layer`` the weight-norm gain is frozen at 1,
which the DINO authors found stabilises training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

#: Parameter-name prefix of the last (prototype) layer, for freezing it in the first epoch.
LAST_LAYER = "last_layer."


class DINOHead(nn.Module):
    """MLP -> L2 norm -> weight-normalised linear to ``out_dim`` prototypes."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, nlayers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(_init_linear)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            gain.fill_(1.0)
        gain.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of crops, one backbone pass per crop resolution.

    Crops of equal size are concatenated so that the 2 global and the n local crops cost two
    forward passes; the head then runs once on all CLS features.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        feats = []
        start = 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-1] == crops[start].shape[-1]:
                end += 1
            feats.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        return self.head(torch.cat(feats))
