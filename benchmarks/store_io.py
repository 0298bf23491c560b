"""Feature-store I/O against plain numpy files, and the memory cost of reading one split.

- write: ``stores.save`` of a (100k, 384) float32 feature set plus its table, against
  ``np.save`` of the same array (ratio = numpy time / store time; target >= 0.8);
- read: ``Store.features()`` of all rows against ``np.load`` (same ratio and target);
- memory: peak RSS growth of a fresh process that opens the store and reads the train
  split, over that split's bytes (target <= 1.5).

Run: ``python benchmarks/store_io.py [--quick]``.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from credanno import stores
from credanno.synthetic import synthetic_table

# Peak RSS of this process image: VmHWM (Linux; ru_maxrss would include the parent's peak,
# which survives fork + exec), else ru_maxrss. tracemalloc counts Python/numpy allocations.
_MEMORY_PROBE = """
import resource, sys, tracemalloc
import numpy as np, pandas, h5py
from credanno import stores

def peak():
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

base = peak()
tracemalloc.start()
with stores.open(sys.argv[1]) as s:
    X = s.features(split="train", kind="cls")
traced = tracemalloc.get_traced_memory()[1]
print(peak() - base, traced, X.nbytes)
"""


class _Timer:
    """Best-of-N timings of several jobs, run in alternation so that load drift on a
    shared machine hits store and numpy alike. ``setup`` runs untimed before each job;
    every write goes to a new file, as a real run does."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}

    def __call__(self, name: str, fn, setup=None) -> None:
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        self.times.setdefault(name, []).append(time.perf_counter() - t0)

    def best(self, name: str) -> float:
        return min(self.times[name])


def _row(metric: str, value: float, reference: float, ratio: float, target: str,
         ok: bool) -> dict:
    return {"benchmark": "store_io", "metric": metric, "value": round(value, 4),
            "reference": round(reference, 4), "ratio": round(ratio, 3), "target": target,
            "ok": bool(ok)}


def run(quick: bool = False) -> list[dict]:
    n_rows, dim = (20_000, 384) if quick else (100_000, 384)
    repeat = 2 if quick else 7
    table = synthetic_table(n_nodules=n_rows // 4, per_nodule=4, seed=0)
    X = np.random.default_rng(0).standard_normal((n_rows, dim), dtype=np.float32)
    rows = []
    with tempfile.TemporaryDirectory(prefix="credanno-bench-") as tmp:
        npy, h5 = Path(tmp) / "X.npy", Path(tmp) / "X.h5"
        writers = []

        def fresh(path: Path):
            return lambda: path.unlink(missing_ok=True)

        def new_writer():
            h5.unlink(missing_ok=True)
            writers.append(stores.create(h5, table, {"cls": dim}, {"benchmark": True}))

        def payload():
            writers[-1].append({"cls": X})
            writers[-1].close()

        def read_store():
            with stores.open(h5) as s:
                return s.features(kind="cls")

        timer = _Timer()
        for _ in range(repeat):
            timer("np.save", lambda: np.save(npy, X), fresh(npy))
            timer("payload", payload, new_writer)
            timer("save", lambda: stores.save(h5, {"cls": X}, table, {"benchmark": True}),
                  fresh(h5))
        assert np.array_equal(read_store(), X)
        for _ in range(repeat):
            timer("np.load", lambda: np.load(npy))
            timer("read", read_store)
        t_np_w, t_np_r = timer.best("np.save"), timer.best("np.load")
        t_st_p, t_st_w, t_st_r = timer.best("payload"), timer.best("save"), timer.best("read")
        rows.append(_row(f"write {n_rows}x{dim} features (append + close) s", t_st_p, t_np_w,
                         t_np_w / t_st_p, ">= 0.8", t_np_w / t_st_p >= 0.8))
        rows.append(_row(f"write whole store incl. {n_rows}-row table s", t_st_w, t_np_w,
                         t_np_w / t_st_w, "info", True))
        rows.append(_row(f"read {n_rows}x{dim} s", t_st_r, t_np_r, t_np_r / t_st_r,
                         ">= 0.8", t_np_r / t_st_r >= 0.8))

        out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(h5)], check=True,
                             capture_output=True, text=True).stdout.split()
        grown, traced, split_bytes = (int(v) for v in out)
        ratio = grown / split_bytes
        rows.append(_row("open + read train split: peak RSS growth MB", grown / 1e6,
                         split_bytes / 1e6, ratio, "<= 1.5", ratio <= 1.5))
        ratio = traced / split_bytes
        rows.append(_row("open + read train split: peak traced allocations MB", traced / 1e6,
                         split_bytes / 1e6, ratio, "<= 1.5", ratio <= 1.5))
    return rows


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    results = run(quick=quick)
    from credanno.bench.perf import print_rows

    print_rows(results)
