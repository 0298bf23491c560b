""":class:`JointLinearProbe`: the joint G_exp/G_cls heads (Eq. 3) as a scikit-learn
estimator, on :func:`credanno.eval.probe.train_joint_heads`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from credanno.errors import CredannoError
from credanno.eval.probe import (
    HeadLayout,
    ProbeRun,
    _predict_heads,
    split_validation,
    train_joint_heads,
)
from credanno.eval.specs import PaperRecipe
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
    ``cv``) or ``"paper"`` (its settings in ``paper``, a
    :class:`~credanno.eval.specs.PaperRecipe`; None: ``PaperRecipe()``, the paper's
    section 3 with lr 5e-4); see :class:`~credanno.eval.specs.ProbeSpec`. Fitted state:
    ``heads_``, ``layout_``, ``classes_``, ``single_output_``.
    """

    def __init__(self, recipe: str = "tuned", Cs: tuple[float, ...] = TUNED_CS, cv: int = 5,
                 paper: PaperRecipe | None = None, standardize: bool = True, seed: int = 0,
                 device: str = "cpu", cls_label: str | int | None = "malignancy") -> None:
        # stored as given (scikit-learn's clone and set_params rely on it); read in fit
        self.recipe, self.Cs, self.cv, self.paper = recipe, Cs, cv, paper
        self.standardize, self.seed, self.device, self.cls_label = (standardize, seed, device,
                                                                     cls_label)

    def _layout(self, Y, soft: list | None) -> tuple[np.ndarray, HeadLayout, bool]:
        """Labels (n, L), their layout, and whether the target is 1-D; a label's number of
        classes: its LIDC scale, else the largest label (or soft-target width) seen."""
        if isinstance(Y, pd.DataFrame):
            names = [str(c) for c in Y.columns]
            arr, single = Y.to_numpy().astype(np.int64), False
            cls = names.index(self.cls_label) if self.cls_label in names else None
        else:
            arr = np.asarray(Y).astype(np.int64)
            single = arr.ndim == 1
            arr = arr.reshape(len(arr), -1)
            names = [str(i) for i in range(arr.shape[1])]
            cls = self.cls_label if isinstance(self.cls_label, int) else None
        counts = [label_spec(c).n_classes if c in LABEL_NAMES else int(arr[:, i].max()) + 1
                  for i, c in enumerate(names)]
        if soft is not None:
            if len(soft) != len(names):
                raise CredannoError(f"{len(soft)} soft-target arrays for {len(names)} labels; "
                                    "pass one (or None) per label")
            counts = [c if s is None or names[i] in LABEL_NAMES else max(c, np.shape(s)[1])
                      for i, (c, s) in enumerate(zip(counts, soft, strict=True))]
        return arr, HeadLayout(names, counts, cls), single

    def _paper(self) -> PaperRecipe:
        return PaperRecipe() if self.paper is None else self.paper

    def _spec(self) -> ProbeSpec:
        from credanno.eval.specs import ProbeSpec

        p = self._paper()
        return ProbeSpec(kind=None, recipe=self.recipe, Cs=self.Cs, cv_folds=self.cv,
                         epochs=p.epochs, batch_size=p.batch_size, momentum=p.momentum,
                         select=p.select if self.recipe == "paper" else "last",
                         val_frac=p.val_frac, standardize=self.standardize,
                         device=self.device)

    def fit(self, X: np.ndarray, Y, views: np.ndarray | None = None,
            groups: np.ndarray | None = None,
            soft: Sequence[np.ndarray | None] | np.ndarray | None = None) -> JointLinearProbe:
        """Train on all rows of ``X`` (n, D) (paper recipe with ``select="val"``: hold out
        ``val_frac``; tuned: CV folds keep whole ``groups``, e.g. nodules, when given).

        ``soft``: class-probability targets (e.g. soft pseudo-labels) instead of the labels,
        one entry per label column: an (n, C_l) array (rows of NaN: use the label) or None
        (that label's hard labels only); for a 1-D target, one (n, C) array.
        """
        if soft is not None and not isinstance(soft, (list, tuple)):
            soft = [soft]  # a 1-D target's one array
        Yarr, layout, single = self._layout(Y, None if soft is None else list(soft))
        X = require_finite(np.asarray(X, dtype=np.float32), "features")
        spec = self._spec()
        rows = np.arange(len(X))
        val = None
        paper = self._paper()
        if self.recipe == "paper" and paper.select == "val":
            rows, val = split_validation(rows, paper.val_frac, self.seed)
        if soft is not None:
            soft = layout.to_columns(list(soft), len(X))
        run = ProbeRun(rows, paper.lr, self.seed, val, groups)
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
