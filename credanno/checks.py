"""Checks of numbers that users pass in (seeds, counts, rates), shared by the library and CLI.

Each raises a one-line :class:`CredannoError` naming the option (``name``) and what it
accepts, so that a NaN, a negative seed or a billion seeds fail at once instead of
producing a traceback, garbage results or a hang.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from credanno.errors import CredannoError

#: numpy's and openTSNE's seeds are unsigned 32-bit integers.
MAX_SEED = 2**32 - 1
#: more seeds than this is a typo (``--seeds 1000000000``), not an experiment.
MAX_SEEDS = 1000


def finite(value: float, name: str, *, low: float | None = None, high: float | None = None,
           low_open: bool = True, high_open: bool = False,
           example: str | None = None) -> float:
    """``value`` as a float, finite and within ``(low, high]`` (``low_open``/``high_open``
    choose which ends are excluded); ``None`` bounds are unbounded."""
    hint = f"; pass e.g. {name} {example}" if example else ""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise CredannoError(f"{name} {value!r} is not a number{hint}") from None
    if not math.isfinite(x):
        raise CredannoError(f"{name} {value}: must be a finite number{hint}")
    below = low is not None and (x <= low if low_open else x < low)
    above = high is not None and (x >= high if high_open else x > high)
    if below or above:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        opens = "(" if low_open or low is None else "["
        closes = "]" if high is not None and not high_open else ")"
        span = f"{opens}{lo}, {hi}{closes}"
        raise CredannoError(f"{name} {x:g}: must be in {span}{hint}")
    return x


def count(value: int, name: str, *, low: int = 1, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]`` (a number of epochs, a size, a seed)."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise CredannoError(f"{name} {value!r}: must be a whole number")
    try:
        n = int(value)
    except (TypeError, ValueError, OverflowError):
        raise CredannoError(f"{name} {value!r}: must be a whole number") from None
    if n < low or (high is not None and n > high):
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise CredannoError(f"{name} {n}: must be {span}")
    return n


def seed(value: int, name: str = "--seed") -> int:
    """A random seed: a whole number in [0, 2**32 - 1]."""
    return count(value, name, low=0, high=MAX_SEED)


def seeds(values: Iterable[int] | int, name: str = "--seeds") -> list[int]:
    """A list of seeds: at most :data:`MAX_SEEDS`, each in [0, 2**32 - 1]."""
    values = [values] if isinstance(values, int) else list(values)
    if not values:
        raise CredannoError(f"{name} gives no seed; pass e.g. {name} 0-4")
    if len(values) > MAX_SEEDS:
        raise CredannoError(f"{name}: {len(values)} seeds is more than {MAX_SEEDS}; "
                            f"pass e.g. {name} 0-4")
    return [seed(v, name) for v in values]
