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
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from credanno import checks
from credanno.augment.rng import epoch_permutation, forked_seed
from credanno.augment.views import ViewAugmentation
from credanno.errors import CredannoError
from credanno.runtime import check_device, resolve_device
from credanno.transforms import EvalTransform

#: input sizes of the end-to-end baseline: below 8 px nothing is left to learn; the whole
#: training set is resized at once, so 512 px (6 GB for the phantom) is the ceiling.
CNN_MIN_SIZE, CNN_MAX_SIZE = 8, 512


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
    device: str | None = None  # None: runtime.default_device() (a GPU when torch sees one)
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
        self.device = check_device(self.device, "--device")

    def _model(self, n_classes: int):
        import timm

        try:
            model = timm.create_model(self.arch, pretrained=False, num_classes=n_classes,
                                      **self.model_kwargs)
        except (RuntimeError, TypeError) as exc:
            raise CredannoError(f"cannot build timm model {self.arch!r} ({exc}); choose "
                                "another --arch") from None
        if self.weights:
            from credanno.weights import load_weights

            # the ImageNet classifier does not fit n_classes: dropped with a warning
            load_weights(model, self.weights, option="weights")
        return model

    def fit(self, images: np.ndarray, y: np.ndarray) -> EndToEndClassifier:
        """Train on the images with a label (``y`` >= 0); same ``seed``, same model.

        Every random draw is a function of ``seed``: the image order and the views come
        from the counter RNG (:mod:`credanno.augment`), and timm's initialisation (and any
        dropout) runs under :func:`~credanno.augment.rng.forked_seed`, so neither reads nor
        changes the caller's global torch random state.
        """
        import torch

        y = np.asarray(y, dtype=np.int64)
        keep = y >= 0
        images, y = np.asarray(images, dtype=np.float32)[keep], y[keep]
        if len(y) == 0:
            raise CredannoError("no labelled images to train the end-to-end baseline on; "
                                "use a larger label fraction")
        self.n_classes = self.n_classes or int(y.max()) + 1
        self.transform_ = EvalTransform(resize=self.image_size, crop=self.image_size)
        self.device_ = resolve_device(self.device)
        x_all = self.transform_(torch.from_numpy(images))
        with forked_seed(self.seed, self.device_):
            model = self._model(self.n_classes).to(self.device_)
            # views are keyed by the image's index in ``images``, not by its labelled rank,
            # so an image's views do not depend on which other images carry a label
            self._train(model, x_all, torch.from_numpy(y), np.flatnonzero(keep))
        self.model_ = model.eval()
        return self

    def _train(self, model, x_all, y_all, index: np.ndarray) -> None:
        """AdamW + cosine over ``max(min_steps, epochs * steps)`` steps; epoch ``e`` shows
        each image once, in the order and view drawn from (seed, e, image index)."""
        import torch
        import torch.nn.functional as F

        n = len(y_all)
        bs = min(self.batch_size, n)
        total = max(self.min_steps, self.epochs * math.ceil(n / bs))
        opt = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        views = ViewAugmentation(max_shift=0, seed=self.seed)  # flips and quarter turns
        model.train()
        step, epoch = 0, 0
        while step < total:
            order = epoch_permutation(self.seed, epoch, n)
            for i in range(0, n - bs + 1, bs):
                idx = order[i:i + bs]
                xb = views(x_all[idx], index[idx.numpy()], epoch).to(self.device_)
                loss = F.cross_entropy(model(xb), y_all[idx].to(self.device_))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                if step >= total:
                    break
            epoch += 1
        if not math.isfinite(float(loss.detach())):
            raise CredannoError(f"end-to-end training of {self.arch} diverged (loss {loss}); "
                                "lower --lr")

    def predict_proba(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        import torch

        if not hasattr(self, "model_"):
            raise CredannoError("the end-to-end baseline is not trained; call fit() first")
        out = []
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                xb = self.transform_(torch.from_numpy(np.asarray(images[i:i + batch_size],
                                                                 dtype=np.float32)))
                out.append(torch.softmax(self.model_(xb.to(self.device_)), 1).float().cpu())
        return torch.cat(out).numpy()

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.predict_proba(images).argmax(1)
