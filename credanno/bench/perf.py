"""Collect the performance benchmarks of ``benchmarks/*.py`` into one table.

Convention (docs/architecture.md): each script defines ``run(quick: bool = False) ->
list[dict]`` with rows ``{"benchmark", "metric", "value", "reference", "ratio", "target",
"ok"}``, ratios measured against a reference in the same process. Scripts without ``run``
are skipped; a script that fails contributes one row naming the error, and the others
still run.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import pandas as pd

from credanno.errors import CredannoError

COLUMNS = ("benchmark", "metric", "value", "reference", "ratio", "target", "ok")


def default_bench_dir() -> Path:
    """``benchmarks/`` of the working directory, else of the source checkout."""
    here = Path("benchmarks")
    if here.is_dir():
        return here
    return Path(__file__).resolve().parents[2] / "benchmarks"


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"credanno_benchmarks.{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    # scripts may import helpers beside them, as they do when run as `python benchmarks/x.py`
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def discover(bench_dir: str | os.PathLike | None = None,
             only: Sequence[str] | None = None) -> list[Path]:
    """The benchmark scripts (``*.py`` not starting with ``_``), optionally by stem."""
    root = Path(bench_dir) if bench_dir is not None else default_bench_dir()
    if not root.is_dir():
        raise CredannoError(f"benchmark folder {root} not found; run from the repository "
                            "root or pass --dir")
    scripts = sorted(p for p in root.glob("*.py") if not p.name.startswith("_"))
    if not scripts:  # an empty table would read as "all benchmarks passed"
        raise CredannoError(f"no benchmark scripts (*.py) in {root}; pass --dir with the "
                            "repository's benchmarks/ folder")
    if only:
        unknown = sorted(set(only) - {p.stem for p in scripts})
        if unknown:
            raise CredannoError(f"unknown benchmarks {unknown}; available: "
                                f"{', '.join(p.stem for p in scripts)}")
        scripts = [p for p in scripts if p.stem in set(only)]
    return scripts


def machine_description() -> str:
    """CPU model and cores, memory, GPU (if any), and library versions, in one line."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [f"{cpu}, {os.cpu_count()} cores"]
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        parts.append(f"{pages * size / 2**30:.0f} GiB RAM")
    except (ValueError, OSError, AttributeError):
        pass
    try:
        import torch

        if torch.cuda.is_available():
            parts.append(f"GPU {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}")
        else:
            parts.append("no GPU")
        parts.append(f"torch {torch.__version__}")
    except ImportError:
        pass
    parts.append(f"Python {platform.python_version()}, {platform.system()}")
    return "; ".join(parts)


def run_perf(bench_dir: str | os.PathLike | None = None, quick: bool = False,
             only: Sequence[str] | None = None) -> pd.DataFrame:
    """Run every benchmark script's ``run(quick)``; one row per reported metric."""
    rows: list[dict] = []
    scripts = discover(bench_dir, only)
    for path in scripts:
        t0 = time.perf_counter()
        try:
            module = _load(path)
            if not callable(getattr(module, "run", None)):
                continue
            out = module.run(quick=quick)
            if not isinstance(out, (list, tuple)):
                raise TypeError(f"run() returned {type(out).__name__}, not a list of dicts")
            for r in out:
                rows.append({"script": path.stem, **{c: r.get(c) for c in COLUMNS},
                             "seconds": None, "error": ""})
        except Exception as exc:  # one broken benchmark must not hide the others
            last = traceback.extract_tb(exc.__traceback__)[-1]
            rows.append({"script": path.stem, **dict.fromkeys(COLUMNS),
                         "benchmark": path.stem, "ok": False, "seconds": None,
                         "error": f"{type(exc).__name__}: {exc} ({Path(last.filename).name}:"
                                  f"{last.lineno})"})
        elapsed = time.perf_counter() - t0
        for r in rows:
            if r["script"] == path.stem and r["seconds"] is None:
                r["seconds"] = round(elapsed, 1)
    if not rows:
        raise CredannoError(f"none of {', '.join(p.name for p in scripts)} defines "
                            "run(quick); see docs/architecture.md for the convention")
    return pd.DataFrame(rows, columns=["script", *COLUMNS, "seconds", "error"])


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and pd.isna(v)):
        return ""
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def perf_markdown(df: pd.DataFrame, machine: str | None = None) -> str:
    """The collected rows as one Markdown table, headed by the machine description."""
    lines = [f"Machine: {machine or machine_description()}", "",
             "| benchmark | metric | value | reference | ratio | target | ok |",
             "|---|---|---:|---:|---:|---|---|"]
    for _, r in df.iterrows():
        if r["error"]:
            lines.append(f"| {r['script']} | failed: {r['error']} | | | | | NO |")
            continue
        lines.append("| " + " | ".join(_cell(r[c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


def print_rows(rows: Sequence[dict], script: str = "") -> None:
    """The ``__main__`` of a benchmark script: print its rows as :func:`run_perf` would."""
    df = pd.DataFrame([{"script": script, **{c: r.get(c) for c in COLUMNS}, "seconds": None,
                        "error": ""} for r in rows],
                      columns=["script", *COLUMNS, "seconds", "error"])
    print(perf_markdown(df))  # noqa: T201 - a script's output, not library output
