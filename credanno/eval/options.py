"""Parsing of the evaluation commands' list options (``--k 10,20,50``, ``--seeds 0-4``).

Plain functions (text in, values out) raising one-line :class:`CredannoError`, shared by
``credanno knn`` and ``credanno probe``, plus the writing of their outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from credanno import checks
from credanno.errors import CredannoError

if TYPE_CHECKING:
    from credanno.eval.specs import SubsetSpec


def _items(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def parse_ks(text: str) -> list[int]:
    """``"10,20,50"`` -> [10, 20, 50]; k must be a positive integer."""
    try:
        ks = [int(t) for t in _items(text)]
    except ValueError:
        raise CredannoError(f"--k {text!r} is not understood; pass e.g. --k 10,20,50") from None
    if not ks:
        raise CredannoError("--k is empty; pass e.g. --k 10,20,50")
    if min(ks) <= 0:
        raise CredannoError(f"--k {min(ks)}: k must be a positive number of neighbours; "
                            "pass e.g. --k 20")
    return ks


def parse_fracs(text: str) -> list[float]:
    """``"0.01,0.1,1"`` -> [0.01, 0.1, 1.0]; each in (0, 1]."""
    try:
        fracs = [float(t) for t in _items(text)]
    except ValueError:
        raise CredannoError(f"--frac {text!r} is not understood; pass e.g. --frac 0.01,0.1,1"
                            ) from None
    if not fracs:
        raise CredannoError("--frac is empty; pass e.g. --frac 0.01,0.1,1")
    bad = [f for f in fracs if not 0 < f <= 1]
    if bad:
        raise CredannoError(f"--frac {bad[0]:g}: a label fraction must be in (0, 1]; "
                            "pass e.g. --frac 0.01")
    return fracs


def parse_seeds(text: str) -> list[int]:
    """``"0-4"`` -> [0..4]; ``"0,3,7"`` -> [0, 3, 7]; ``"3"`` -> [0, 1, 2] (a count, as in
    ``credanno bench``). At most :data:`credanno.checks.MAX_SEEDS` seeds, each < 2**32."""
    text = str(text).strip()
    try:
        if "," in text:
            seeds = [int(t) for t in _items(text)]
        elif "-" in text[1:]:
            lo, hi = (int(t) for t in text.split("-", 1))
            seeds = range(lo, hi + 1)  # a range, not a list: --seeds 0-1000000000 is a typo
        else:
            seeds = range(int(text))
    except ValueError:
        raise CredannoError(f"--seeds {text!r} is not understood; pass a range (0-4), a list "
                            "(0,3,7) or a count (3)") from None
    if len(seeds) > checks.MAX_SEEDS:  # before min(): a huge range must not be walked
        raise CredannoError(f"--seeds {text!r} gives {len(seeds)} seeds, more than "
                            f"{checks.MAX_SEEDS}; pass e.g. --seeds 0-4")
    if not seeds or min(seeds) < 0:
        raise CredannoError(f"--seeds {text!r} gives no usable seed; pass e.g. --seeds 0-4")
    return checks.seeds(seeds)


def parse_labels(text: str | None) -> list[str] | None:
    """``"malignancy,texture"`` -> names (validated later against the store); None = all."""
    if text is None:
        return None
    names = _items(text)
    if not names:
        raise CredannoError("--labels is empty; pass e.g. --labels malignancy,texture")
    return names


def subset_spec(fracs: str, n_labels: int | None, mode: str, stratify: bool,
                seeds: str) -> SubsetSpec:
    """The :class:`SubsetSpec` of the shared subset options (``--n-labels`` replaces
    ``--frac``; ``--stratify`` stratifies by malignancy)."""
    from credanno.eval.specs import SubsetSpec

    return SubsetSpec(fracs=parse_fracs(fracs) if n_labels is None else (),
                      n_labels=None if n_labels is None else (n_labels,), mode=mode,
                      stratify="malignancy" if stratify else None, seeds=parse_seeds(seeds))


def emit(result, as_json: bool, csv: Path | None, predictions: Path | None) -> str:
    """Write the requested files and return the text for stdout."""
    if csv is not None:
        result.write_csv(csv, option="--csv")
    if predictions is not None:
        result.write_predictions(predictions, option="--predictions")
    if as_json:
        return result.to_json()
    parts = [result.to_table()]
    fig2 = result.fig2_table()
    if fig2:
        parts.append(fig2)
    return "\n\n".join(parts)
