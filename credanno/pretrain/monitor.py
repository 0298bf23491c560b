"""DINO's k-NN monitor, as a training callback: malignancy accuracy of the teacher's CLS
features every ``monitor_every`` epochs (and after the last one).

The queries are a nodule-level hold-out of the *training* split (never the test split;
``monitor_val_frac`` of its nodules, drawn from the run seed); the bank is the remaining
labelled training images. ``k`` is ``monitor_k``, or the bank size where that is smaller;
the row's ``knn_k`` says which.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from credanno.errors import CredannoError
from credanno.pretrain.callbacks import Callback

if TYPE_CHECKING:
    from credanno.pretrain.train import Trainer

#: images per forward pass when embedding the training set
_BATCH = 256


def holdout_split(nodule_ids: np.ndarray, labels: np.ndarray, val_frac: float,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(bank, queries)`` row indices: the labelled rows of the held-out nodules are the
    queries, the other labelled rows the bank, so no nodule is on both sides."""
    nodules = np.unique(nodule_ids)
    rng = np.random.default_rng(seed)
    held = rng.permutation(nodules)[:max(1, int(round(val_frac * len(nodules))))]
    is_val = np.isin(nodule_ids, held)
    valid = labels >= 0
    return np.flatnonzero(~is_val & valid), np.flatnonzero(is_val & valid)


class KnnMonitor(Callback):
    """Adds ``knn_k`` and ``knn_malignancy_acc`` to the rows of the monitored epochs."""

    def __init__(self) -> None:
        self.bank = self.queries = self.labels = None

    def on_train_start(self, trainer: Trainer, start_epoch: int) -> None:
        cfg, table = trainer.cfg, trainer.table
        self.labels = table["malignancy"].to_numpy()
        self.bank, self.queries = holdout_split(table["nodule_id"].to_numpy(), self.labels,
                                                cfg.monitor_val_frac, cfg.seed)
        if len(self.bank) == 0 or len(self.queries) == 0:
            raise CredannoError("too few labelled training images for the k-NN monitor; "
                                "drop --monitor-every")

    def on_epoch_end(self, trainer: Trainer, epoch: int,
                     row: dict[str, Any]) -> dict[str, Any]:
        every, epochs = trainer.cfg.monitor_every, trainer.cfg.epochs
        if every <= 0 or ((epoch + 1) % every and epoch + 1 != epochs):
            return {}
        return self.measure(trainer)

    @staticmethod
    @torch.no_grad()
    def features(trainer: Trainer) -> np.ndarray:
        """The teacher's L2-normalised CLS features of every training image."""
        out = []
        for start in range(0, trainer.n, _BATCH):
            x = trainer.eval_transform(trainer.images[start:start + _BATCH])
            f = trainer.teacher.backbone(x).float()
            out.append(torch.nn.functional.normalize(f, dim=-1).cpu())
        return torch.cat(out).numpy()

    def measure(self, trainer: Trainer) -> dict[str, Any]:
        try:
            from credanno.eval.knn import knn_classify
        except ImportError:
            raise CredannoError("the k-NN monitor needs credanno.eval.knn, which is not "
                                "installed in this version; drop --monitor-every") from None
        feats = self.features(trainer)
        k = int(min(trainer.cfg.monitor_k, len(self.bank)))
        preds = knn_classify(feats[self.bank], self.labels[self.bank], feats[self.queries],
                             ks=[k], n_classes=2)
        acc = float(np.mean(np.asarray(preds[k]) == self.labels[self.queries]))
        return {"knn_k": k, "knn_malignancy_acc": acc}
