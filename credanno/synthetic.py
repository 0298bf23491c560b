"""Small synthetic tables, patch files and features with a known class structure.

For tests, examples and benchmarks: real pipelines use :mod:`credanno.data` instead.
Labels follow the real scales; images and features carry a weak, known signal.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from credanno.labels import ATTRIBUTES, LABEL_NAMES, RATING_LEVELS


def synthetic_table(n_nodules: int = 40, per_nodule: int = 3, test_frac: float = 0.3,
                    seed: int = 0) -> pd.DataFrame:
    """A table of ``n_nodules * per_nodule`` images, train rows first, valid labels."""
    rng = np.random.default_rng(seed)
    nodule_ids = np.arange(1, n_nodules + 1)
    is_test = rng.random(n_nodules) < test_frac
    is_test[0], is_test[-1] = False, True  # both splits non-empty
    malignant = rng.random(n_nodules) < 0.5
    rows = []
    ann = 1
    for i, nid in enumerate(nodule_ids):
        medians = {"malignancy": 4.0 if malignant[i] else 2.0}
        for spec in ATTRIBUTES:
            medians[spec.name] = float(rng.integers(1, spec.n_classes + 1))
        for _ in range(per_nodule):
            row = {"annotation_id": ann, "nodule_id": int(nid), "scan_id": int(nid // 2 + 1),
                   "patient_id": f"LIDC-IDRI-{int(nid // 2 + 1):04d}",
                   "split": "test" if is_test[i] else "train",
                   "malignancy": int(malignant[i])}
            for spec in ATTRIBUTES:
                row[spec.name] = int(medians[spec.name]) - 1
            for name in LABEL_NAMES:
                row[f"rating_{name}"] = medians[name]
                jitter = int(np.clip(medians[name] + rng.integers(-1, 2), 1, RATING_LEVELS[name]))
                row[f"raw_{name}"] = jitter
            row["diameter"] = float(rng.uniform(3, 30))
            rows.append(row)
            ann += 1
    df = pd.DataFrame(rows)
    df["_order"] = (df["split"] == "test").astype(int)
    df = df.sort_values(["_order", "nodule_id", "annotation_id"], kind="stable")
    df = df.drop(columns="_order").reset_index(drop=True)
    for c in ("rating_" + n for n in LABEL_NAMES):
        df[c] = df[c].astype(np.float32)
    df["diameter"] = df["diameter"].astype(np.float32)
    return df


def synthetic_images(table: pd.DataFrame, size: int = 32, seed: int = 0) -> np.ndarray:
    """Noisy discs whose radius follows malignancy, so encoders have something to find."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    r = np.hypot(yy, xx)
    radius = np.where(table["malignancy"].to_numpy() == 1, size * 0.3, size * 0.15)
    imgs = (r[None] < radius[:, None, None]).astype(np.float32) * 0.6 + 0.2
    imgs += rng.normal(0, 0.05, imgs.shape).astype(np.float32)
    return np.clip(imgs, 0, 1)


def synthetic_features(table: pd.DataFrame, dim: int = 16, signal: float = 2.0,
                       seed: int = 0) -> np.ndarray:
    """Gaussian features whose first coordinates encode every label (float32)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(len(table), dim)).astype(np.float32)
    for j, name in enumerate(LABEL_NAMES[: dim]):
        x[:, j] += signal * table[name].to_numpy(np.float32)
    return x
