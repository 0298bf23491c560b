"""Speed of the default ``credanno bench budget`` on the demo store.

The whole default grid (budgets 0.5%, 1%, 2%, 5%, 10%, 100% x the five label-free
strategies x k-NN, tuned probe and probe + semi-supervised rounds x seeds 0-2, every
label) timed end to end on the demo's teacher store (``demo/stores/teacher.h5``, or
``--store PATH``), with the seconds of each part the result records: the picks, the
batched probe sweep (every cell's probe and every semi loop's seed set), then each
method's pass over the cells (k-NN; the probes' decisions; the semi loops' rounds). Target:
<= 60 s on 2 cores. Without the demo store (``credanno demo`` makes it) a synthetic store
of the same size (2,673 images, 192-d) stands in, and the rows say so. ``--quick``: seed
0 only.

Run: ``python benchmarks/budget_speed.py [--quick] [--store demo/stores/teacher.h5]``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

DEMO_STORE = Path("demo/stores/teacher.h5")
TARGET_S = 60.0


def _synthetic(folder: Path) -> Path:
    """A store the size of the demo's: 730 nodules, ~2,670 images, 192-d features."""
    from credanno import stores
    from credanno.synthetic import synthetic_features, synthetic_table

    table = synthetic_table(n_nodules=730, per_nodule=4, seed=0).head(2673)
    feats = synthetic_features(table, dim=192, signal=1.0)
    return stores.save(folder / "demo-size.h5", features={"cls": feats}, table=table,
                       provenance={"encoder": {"kind": "synthetic", "arch": "none"}})


def run(quick: bool = False, store: Path | None = None) -> list[dict]:
    import warnings

    import torch

    from credanno.bench.budget import BudgetSpec, run_budget

    seeds = (0,) if quick else (0, 1, 2)
    store = store or (DEMO_STORE if DEMO_STORE.exists() else None)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        what = "demo store" if store else "synthetic demo-size store"
        path = store or _synthetic(Path(tmp))
        run_budget(path, BudgetSpec(fracs=(0.01,), strategies=("random",), seeds=(0,),
                                    device="cpu"))  # warm up: imports, page cache
        t0 = time.perf_counter()
        res = run_budget(path, BudgetSpec(seeds=seeds, device="cpu"))
        total, parts = time.perf_counter() - t0, res.params["seconds_by_part"]
    label = f"default grid, seeds {seeds[0]}-{seeds[-1]}, {what}"
    rows = [{"benchmark": "budget_speed", "metric": f"bench budget {label} seconds "
             f"({torch.get_num_threads()} torch threads)", "value": round(total, 1),
             "reference": TARGET_S, "ratio": round(total / TARGET_S, 3),
             "target": "<= 60 s", "ok": total <= TARGET_S}]
    rows += [{"benchmark": "budget_speed", "metric": f"  of which {k}", "value": round(v, 1),
              "reference": round(total, 1), "ratio": round(v / total, 3), "target": "",
              "ok": None} for k, v in parts.items()]
    return rows


if __name__ == "__main__":
    arg = sys.argv[sys.argv.index("--store") + 1] if "--store" in sys.argv else None
    results = run(quick="--quick" in sys.argv, store=Path(arg) if arg else None)
    from credanno.bench.perf import print_rows

    print_rows(results)
