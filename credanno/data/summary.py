"""Counts of a patch table beside the paper's (Sec. 3 and the public label files)."""

from __future__ import annotations

import pandas as pd

COUNT_COLUMNS = ("nodules", "benign", "malignant", "images", "patients")

#: The public label files' counts (protocol.md): 730 nodules, 2673 images, 451 patients.
PAPER_COUNTS: dict[str, dict[str, int]] = {
    "train": {"nodules": 518, "benign": 276, "malignant": 242, "images": 1904, "patients": 365},
    "test": {"nodules": 212, "benign": 108, "malignant": 104, "images": 769, "patients": 176},
    "total": {"nodules": 730, "benign": 384, "malignant": 346, "images": 2673, "patients": 451},
}


def _counts(df: pd.DataFrame) -> dict[str, int]:
    per_nodule = df.groupby("nodule_id")["malignancy"].first()
    return {"nodules": int(per_nodule.size), "benign": int((per_nodule == 0).sum()),
            "malignant": int((per_nodule == 1).sum()), "images": int(len(df)),
            "patients": int(df["patient_id"].nunique())}


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """One row per split (train, test, total): our counts, then ``paper_<count>`` columns."""
    rows = {}
    for split in ("train", "test"):
        rows[split] = _counts(table[table["split"] == split])
    rows["total"] = _counts(table)
    df = pd.DataFrame.from_dict(rows, orient="index")[list(COUNT_COLUMNS)]
    paper = pd.DataFrame.from_dict(PAPER_COUNTS, orient="index")[list(COUNT_COLUMNS)]
    df = df.join(paper.add_prefix("paper_"))
    df.index.name = "split"
    return df


def format_summary(summary: pd.DataFrame, skipped: dict[str, int] | None = None) -> str:
    """The summary as text: 'ours (paper)' per cell, then the skipped annotations."""
    cells = pd.DataFrame(index=summary.index)
    for col in COUNT_COLUMNS:
        pairs = zip(summary[col], summary[f"paper_{col}"], strict=True)
        cells[col] = [f"{a} ({b})" for a, b in pairs]
    text = "counts: ours (paper)\n" + cells.to_string()
    if skipped:
        lines = [f"  {reason}: {n}" for reason, n in skipped.items() if n]
        if lines:
            text += "\nannotations of selected nodules without an image:\n" + "\n".join(lines)
    return text
