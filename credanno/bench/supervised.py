"""The conventional end-to-end supervised baseline (the paper's Table 2 and Fig. 4).

Previous works train a CNN end-to-end on the labelled images (Fig. 1a of the paper); the
paper's "Baseline" is a ResNet-50 trained from random initialisation on malignancy.
:class:`EndToEndClassifier` trains any timm architecture that way on grey patches, as an
sklearn-style estimator (``fit`` / ``predict`` / ``predict_proba`` on image arrays), so that
Fig. 4 and Table 2 can train it on exactly the label subsets the two-stage method sees.
On the CPU a ResNet-18 at the patches' native 32 px stands in for ResNet-50.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from credanno import checks
from credanno.errors import CredannoError
from credanno.runtime import check_device
from credanno.transforms import EvalTransform

#: input sizes of the end-to-end baseline: below 8 px nothing is left to learn; the whole
#: training set is resized at once, so 512 px (6 GB for the phantom) is the ceiling.
CNN_MIN_SIZE, CNN_MAX_SIZE = 8, 512


def _augment(x, generator):
    """Random flips and 90-degree rotations: label-preserving for nodule patches."""
    import torch

    b = x.shape[0]
    flip = torch.rand(b, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    k = int(torch.randint(0, 4, (1,), generator=generator))
    return torch.rot90(x, k, dims=(-2, -1))


def load_init_weights(model, path: str | os.PathLike) -> int:
    """Load a local weights file into ``model`` (classifier left out); returns tensors loaded.

    Accepts a plain state dict, ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers, or
    safetensors. Keys that do not fit (the ImageNet classifier) are skipped.
    """
    import torch

    path = str(path)
    if not os.path.exists(path):
        raise CredannoError(f"init weights {path} not found; pass an existing local file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "teacher"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    own = model.state_dict()
    fitting = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    fitting = {k: v for k, v in fitting.items() if k in own and own[k].shape == v.shape}
    if not fitting:
        raise CredannoError(f"no tensor of {path} fits {type(model).__name__}; pass weights of "
                            "the same architecture")
    model.load_state_dict(fitting, strict=False)
    return len(fitting)


@dataclass
class EndToEndClassifier:
    """Supervised end-to-end training of a timm model on (N, H, W) patches in [0, 1].

    AdamW with a cosine schedule; ``epochs`` passes over the labelled images, but at least
    ``min_steps`` optimisation steps so that a 1% subset (19 images) is not left untrained.
    """

    arch: str = "resnet18"
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    image_size: int = 32
    min_steps: int = 100
    seed: int = 0
    device: str = "cpu"
    weights: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    n_classes: int | None = None

    def __post_init__(self) -> None:
        # checked here, not in fit(), so that a bad setting fails before any other work
        self.epochs = checks.count(self.epochs, "--cnn-epochs")
        self.image_size = checks.count(self.image_size, "--cnn-size", low=CNN_MIN_SIZE,
                                       high=CNN_MAX_SIZE)
        self.batch_size = checks.count(self.batch_size, "batch_size")
        self.lr = checks.finite(self.lr, "lr", low=0)
        self.seed = checks.seed(self.seed)
        self.device = check_device(self.device) or "cpu"

    def _model(self, n_classes: int):
        import timm

        try:
            model = timm.create_model(self.arch, pretrained=False, num_classes=n_classes,
                                      **self.model_kwargs)
        except (RuntimeError, TypeError) as exc:
            raise CredannoError(f"cannot build timm model {self.arch!r} ({exc}); choose "
                                "another --arch") from None
        if self.weights:
            load_init_weights(model, self.weights)
        return model

    def fit(self, images: np.ndarray, y: np.ndarray) -> EndToEndClassifier:
        import torch
        import torch.nn.functional as F

        y = np.asarray(y, dtype=np.int64)
        keep = y >= 0
        images, y = np.asarray(images, dtype=np.float32)[keep], y[keep]
        if len(y) == 0:
            raise CredannoError("no labelled images to train the end-to-end baseline on; "
                                "use a larger label fraction")
        self.n_classes = self.n_classes or int(y.max()) + 1
        torch.manual_seed(self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        self.transform_ = EvalTransform(resize=self.image_size, crop=self.image_size)
        model = self._model(self.n_classes).to(self.device)
        x_all = self.transform_(torch.from_numpy(images))
        y_all = torch.from_numpy(y)
        bs = min(self.batch_size, len(y))
        steps_per_epoch = math.ceil(len(y) / bs)
        total = max(self.min_steps, self.epochs * steps_per_epoch)
        opt = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        model.train()
        step = 0
        while step < total:
            order = torch.randperm(len(y), generator=gen)
            for i in range(0, len(order) - bs + 1, bs):
                idx = order[i:i + bs]
                xb = _augment(x_all[idx], gen).to(self.device)
                loss = F.cross_entropy(model(xb), y_all[idx].to(self.device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                if step >= total:
                    break
        if not math.isfinite(float(loss.detach())):
            raise CredannoError(f"end-to-end training of {self.arch} diverged (loss {loss}); "
                                "lower --lr")
        self.model_ = model.eval()
        return self

    def predict_proba(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        import torch

        if not hasattr(self, "model_"):
            raise CredannoError("the end-to-end baseline is not trained; call fit() first")
        out = []
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                xb = self.transform_(torch.from_numpy(np.asarray(images[i:i + batch_size],
                                                                 dtype=np.float32)))
                out.append(torch.softmax(self.model_(xb.to(self.device)), 1).float().cpu())
        return torch.cat(out).numpy()

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.predict_proba(images).argmax(1)
