"""Parsing of the commands' list options (``--k 10,20,50``, ``--frac 0.01,1``, ``--seeds 0-4``).

Plain functions (text in, values out) raising one-line :class:`CredannoError`: the one
parser of ``--frac`` and ``--seeds``/``--n-seeds`` for every command (knn, probe, bench,
demo), plus the writing of the evaluation commands' outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from credanno import checks
from credanno.errors import CredannoError

if TYPE_CHECKING:
    pass


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


def parse_fracs(text: str, option: str = "--frac") -> list[float]:
    """``"0.01,0.1,1"`` -> [0.01, 0.1, 1.0]; each in (0, 1]. ``option`` names the flag in
    errors (``--frac``, ``--cnn-frac``)."""
    try:
        fracs = [float(t) for t in _items(text)]
    except ValueError:
        raise CredannoError(f"{option} {text!r} is not understood; pass e.g. "
                            f"{option} 0.01,0.1,1") from None
    if not fracs:
        raise CredannoError(f"{option} is empty; pass e.g. {option} 0.01,0.1,1")
    bad = [f for f in fracs if not 0 < f <= 1]  # NaN fails the comparison too
    if bad:
        raise CredannoError(f"{option} {bad[0]:g}: a label fraction must be in (0, 1]; "
                            f"pass e.g. {option} 0.01")
    return fracs


def parse_seeds(text: str, option: str = "--seeds") -> list[int]:
    """``"0-4"`` -> [0..4]; ``"0,3,7"`` -> [0, 3, 7]; ``"7"`` -> [7] (that one seed; the
    first N seeds are :func:`first_seeds`, ``--n-seeds N``). At most
    :data:`credanno.checks.MAX_SEEDS` seeds, each < 2**32."""
    text = str(text).strip()
    try:
        if "," in text:
            seeds = [int(t) for t in _items(text)]
        elif "-" in text[1:]:
            lo, hi = (int(t) for t in text.split("-", 1))
            seeds = range(lo, hi + 1)  # a range, not a list: --seeds 0-1000000000 is a typo
        else:
            seeds = [int(text)]
    except ValueError:
        raise CredannoError(f"{option} {text!r} is not understood; pass a range (0-4), a list "
                            "(0,3,7) or one seed (7)") from None
    if len(seeds) > checks.MAX_SEEDS:  # before min(): a huge range must not be walked
        raise CredannoError(f"{option} {text!r} gives {len(seeds)} seeds, more than "
                            f"{checks.MAX_SEEDS}; pass e.g. {option} 0-4")
    if not seeds:
        raise CredannoError(f"{option} {text!r} gives no seed; pass e.g. {option} 0-4")
    return checks.seeds(seeds, option)


def first_seeds(n: int, option: str = "--n-seeds") -> list[int]:
    """``--n-seeds N``: the first ``n`` seeds, 0 .. n-1."""
    return list(range(checks.count(n, option, high=checks.MAX_SEEDS)))


def parse_labels(text: str | None) -> list[str] | None:
    """``"malignancy,texture"`` -> names (validated later against the store); None = all."""
    if text is None:
        return None
    names = _items(text)
    if not names:
        raise CredannoError("--labels is empty; pass e.g. --labels malignancy,texture")
    return names


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
