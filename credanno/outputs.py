"""One home for writing tabular outputs and for putting strings from files into text.

Strings read from files (a patch file's ``source`` attribute, patient ids, store names,
provenance) are data, not markup: :func:`md_text` and :func:`md_code` escape them where they
enter Markdown or HTML, :func:`one_line` where they enter a one-line terminal message, and
:func:`write_csv` neutralises cells that a spreadsheet would run as formulas (OWASP,
"CSV Injection"). Every table and JSON file goes through :func:`write_csv` /
:func:`write_json`, which write atomically (:func:`credanno._atomic.atomic_path`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pandas as pd

from credanno._atomic import atomic_path

#: first characters that make a spreadsheet treat a cell as a formula (OWASP CSV injection)
FORMULA_PREFIXES: tuple[str, ...] = ("=", "+", "-", "@", "\t", "\r")

# C0 and C1 control characters (newline, carriage return, tab, escape, ...), and the
# Unicode line and paragraph separators, which also break a line
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
# backslash first, so that the backslashes added for the others are not escaped again
_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~$])")
_HTML = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def one_line(value: Any) -> str:
    """``str(value)`` with runs of control characters (newlines, tabs, escapes) collapsed
    to one space, so that a string from a file cannot break or forge a line of output."""
    return _CONTROL.sub(" ", str(value)).strip()


def md_text(value: Any) -> str:
    """``value`` as literal text for Markdown (and the HTML it renders to), on one line.

    Control characters become a space; ``& < >`` become HTML entities (no tags);
    the Markdown specials ``\\ ` * _ [ ] | ~ $`` are backslash-escaped (no emphasis, links,
    code or table cells; ``$`` also keeps matplotlib captions out of math mode), and so are
    ``#``, ``+``, ``-``, ``=`` at the start (no heading or list when it begins a line).
    """
    text = "".join(_HTML.get(ch, ch) for ch in one_line(value))
    text = _MD_SPECIAL.sub(r"\\\1", text)
    if text[:1] in ("#", "+", "-", "="):
        text = "\\" + text
    return text


def md_code(value: Any) -> str:
    """``value`` as a one-line Markdown code span (paths): the fence is longer than any run
    of backticks inside, so the text cannot close it; renderers escape HTML in code."""
    text = one_line(value)
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text[:1] == "`" or text[-1:] == "`" else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def neutralise_cell(value: Any) -> Any:
    """A string starting like a formula gets a leading ``'``; anything else is unchanged,
    except that carriage returns become newlines.

    The CSV writer quotes a cell holding a newline but not one holding a lone carriage
    return, which spreadsheets read as a row break: ``"x\r=cmd"`` would put a formula at
    the start of a new row."""
    if not isinstance(value, str):
        return value
    if value.startswith(FORMULA_PREFIXES):
        value = "'" + value
    return value.replace("\r\n", "\n").replace("\r", "\n")


def neutralise_formulas(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``df`` whose text cells cannot run as spreadsheet formulas.

    Only object, string and categorical columns are touched: numeric columns stay numbers
    (a negative number is a number, not a formula).
    """
    out = df.copy()
    for col in out.columns:
        series = out[col]
        if isinstance(series, pd.DataFrame):  # duplicate column names: leave to pandas
            continue
        if (pd.api.types.is_object_dtype(series.dtype)
                or pd.api.types.is_string_dtype(series.dtype)
                or isinstance(series.dtype, pd.CategoricalDtype)):
            out[col] = series.astype(object).map(neutralise_cell)
    if pd.api.types.is_object_dtype(out.index.dtype):
        out.index = out.index.map(neutralise_cell)
    return out


def write_csv(df: pd.DataFrame, path: str | os.PathLike, *, option: str = "--csv",
              **to_csv_kwargs: Any) -> Path:
    """Write ``df`` to ``path`` as CSV, atomically, formulas neutralised; return the path.

    ``option`` names the command-line option that chose ``path`` (for error messages);
    ``to_csv_kwargs`` go to :meth:`pandas.DataFrame.to_csv` (e.g. ``index=False``).
    """
    path = Path(path)
    safe = neutralise_formulas(df)
    with atomic_path(path, option=option) as tmp:
        safe.to_csv(tmp, **to_csv_kwargs)
    return path


def write_json(obj: Any, path: str | os.PathLike, *, option: str = "--json",
               indent: int | None = 2) -> Path:
    """Write ``obj`` to ``path`` as JSON (no NaN/Infinity, which JSON lacks), atomically."""
    path = Path(path)
    text = obj if isinstance(obj, str) else json.dumps(obj, indent=indent, allow_nan=False)
    with atomic_path(path, option=option) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    return path
