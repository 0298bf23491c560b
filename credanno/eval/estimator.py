""":class:`JointLinearProbe`: the joint G_exp/G_cls heads (Eq. 3) as a scikit-learn
estimator, on :func:`credanno.eval.probe.train_joint_heads`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from credanno.eval.probe import (
    PAPER_LR_FULL,
    HeadLayout,
    ProbeRun,
    _predict_heads,
    soft_columns,
    split_validation,
    train_joint_heads,
)
from credanno.eval.tuned import TUNED_CS
from credanno.labels import LABEL_NAMES, label_spec
from credanno.numerics import require_finite

if TYPE_CHECKING:
    from credanno.eval.specs import ProbeSpec


class JointLinearProbe(BaseEstimator):
    """The joint G_exp/G_cls heads (Eq. 3) as a scikit-learn estimator
    (``sklearn.base.clone``, ``GridSearchCV`` and pipelines work on it).

    ``fit(X, Y)`` with ``Y`` a DataFrame of label columns (names from
    :data:`credanno.labels.LABEL_NAMES`; ``malignancy`` becomes G_cls fed with the other
    heads' logits), a 2-D int array (one column per head, ``n_classes`` inferred, no G_cls
    unless ``cls_label`` gives a column index) or a 1-D array (one softmax regression).
    Labels of -1 are missing and ignored by that head. ``recipe``: ``"tuned"`` (``Cs``,
    ``cv``) or ``"paper"`` (``epochs``, ``lr``, ``batch_size``, ``momentum``, ``select``,
    ``val_frac``); see :class:`~credanno.eval.specs.ProbeSpec`. Fitted state: ``heads_``,
    ``layout_``, ``classes_``, ``single_output_``.
    """

    def __init__(self, recipe: str = "tuned", Cs: tuple[float, ...] = TUNED_CS, cv: int = 5,
                 epochs: int = 100, lr: float = PAPER_LR_FULL, batch_size: int = 128,
                 momentum: float = 0.9, standardize: bool = True, seed: int = 0,
                 device: str = "cpu", cls_label: str | int | None = "malignancy",
                 select: str = "last", val_frac: float = 0.2) -> None:
        self.recipe, self.Cs, self.cv = recipe, Cs, cv
        self.epochs, self.lr, self.batch_size = epochs, lr, batch_size
        self.momentum, self.standardize, self.seed = momentum, standardize, seed
        self.device, self.cls_label, self.select, self.val_frac = (device, cls_label, select,
                                                                    val_frac)

    def _layout(self, Y) -> tuple[np.ndarray, HeadLayout, bool]:
        if isinstance(Y, pd.DataFrame):
            names = [str(c) for c in Y.columns]
            counts = [label_spec(c).n_classes if c in LABEL_NAMES
                      else int(Y[c].max()) + 1 for c in names]
            cls = names.index(self.cls_label) if self.cls_label in names else None
            return Y.to_numpy().astype(np.int64), HeadLayout(names, counts, cls), False
        arr = np.asarray(Y).astype(np.int64)
        single = arr.ndim == 1
        arr = arr.reshape(len(arr), -1)
        names = [str(i) for i in range(arr.shape[1])]
        counts = [int(arr[:, i].max()) + 1 for i in range(arr.shape[1])]
        cls = self.cls_label if isinstance(self.cls_label, int) else None
        return arr, HeadLayout(names, counts, cls), single

    def _spec(self) -> ProbeSpec:
        from credanno.eval.specs import ProbeSpec

        paper = self.recipe == "paper"
        return ProbeSpec(kind=None, recipe=self.recipe, Cs=self.Cs, cv_folds=self.cv,
                         epochs=self.epochs, batch_size=self.batch_size,
                         momentum=self.momentum, select=self.select if paper else "last",
                         val_frac=self.val_frac, standardize=self.standardize,
                         device=self.device)

    def fit(self, X: np.ndarray, Y, views: np.ndarray | None = None,
            groups: np.ndarray | None = None, soft=None) -> JointLinearProbe:
        """Train on all rows of ``X`` (n, D) (paper recipe with ``select="val"``: hold out
        ``val_frac``; tuned: CV folds keep whole ``groups``, e.g. nodules, when given).
        ``soft``: optional soft targets, a list per label (Y's columns; one array for a
        1-D ``Y``) of (n, C_l) probabilities or None; a NaN row keeps the hard label."""
        Yarr, layout, single = self._layout(Y)
        if soft is not None and not isinstance(soft, (list, tuple)):
            soft = [soft]
        soft = soft_columns(layout, soft, len(Yarr))
        X = require_finite(np.asarray(X, dtype=np.float32), "features")
        spec = self._spec()
        rows = np.arange(len(X))
        val = None
        if self.recipe == "paper" and self.select == "val":
            rows, val = split_validation(rows, self.val_frac, self.seed)
        run = ProbeRun(rows, self.lr, self.seed, val, groups)
        self.heads_ = train_joint_heads(X, Yarr, layout, [run], spec, views=views, soft=soft)
        self.layout_, self.single_output_ = layout, single
        self.classes_ = [np.arange(c) for c in layout.n_classes]
        return self

    def predict_proba(self, X: np.ndarray):
        """Class probabilities: (n, C) for a 1-D target, else a list of (n, C_l) arrays."""
        import torch

        check_is_fitted(self, "heads_")
        Xt = torch.as_tensor(np.asarray(X, dtype=np.float32), device=self.heads_.exp[0].device)
        with torch.no_grad():
            probs = [p[0].cpu().numpy() for p in _predict_heads(self.heads_, Xt)]
        return probs[0] if self.single_output_ else probs

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predicted classes: (n,) for a 1-D target, else (n, L) in the columns' order."""
        probs = self.predict_proba(X)
        if self.single_output_:
            return probs.argmax(axis=1)
        return np.stack([p.argmax(axis=1) for p in probs], axis=1)

    def score(self, X: np.ndarray, Y) -> float:
        """Mean exact accuracy over heads (ignoring missing labels)."""
        Yarr = np.asarray(Y).reshape(len(X), -1)
        pred = self.predict(X).reshape(len(X), -1)
        ok = Yarr >= 0
        return float((pred[ok] == Yarr[ok]).mean())
