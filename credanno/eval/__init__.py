"""Stage 2 of cRedAnno: k-NN and linear-probe evaluation of stored features.

The array-level cores (:func:`credanno.eval.knn.knn_classify`, the probe estimator)
take features and label arrays; the sweeps read feature stores and return an
:class:`~credanno.eval.results.EvalResult`. Names are imported lazily so that
``import credanno.eval`` does not pay for torch or faiss.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "knn_sweep": "credanno.eval.knn",
    "knn_classify": "credanno.eval.knn",
    "probe_sweep": "credanno.eval.probe",
    "JointLinearProbe": "credanno.eval.estimator",
    "EvalResult": "credanno.eval.results",
    "EvalData": "credanno.eval.data",
    "open_eval_data": "credanno.eval.data",
    "SubsetSpec": "credanno.eval.specs",
    "KnnSpec": "credanno.eval.specs",
    "ProbeSpec": "credanno.eval.specs",
    "PaperRecipe": "credanno.eval.specs",
    "label_subset": "credanno.eval.subsets",
    "draw_subsets": "credanno.eval.subsets",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'credanno.eval' has no attribute {name!r}")
