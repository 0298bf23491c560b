"""``credanno bench gpu``: the dry run's rows (structure and finiteness, never speed), the
one-line refusal without a GPU, and the faiss row's skip without faiss GPU support."""

from __future__ import annotations

import json
import math

import pytest
import torch

from credanno.bench import gpu as gpu_bench
from tests.helpers import cli_error

NO_GPU = not torch.cuda.is_available()


def test_dry_run_writes_every_row_finite(tmp_path, capsys):
    from credanno.cli import main

    out = tmp_path / "gpu.json"
    main(["bench", "gpu", "--dry-run", "--out", str(out)])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["dry_run"] is True and report["device"] == "cpu" and report["machine"]
    rows = report["rows"]
    assert [r["id"] for r in rows] == list(gpu_bench.ROW_IDS)
    for r in rows:
        assert {"benchmark", "metric", "value", "reference", "ratio", "target", "ok"} <= set(r)
        assert r["note"] == "", r
        assert isinstance(r["value"], float) and math.isfinite(r["value"]), r
        for key in ("reference", "ratio"):
            assert r[key] is None or math.isfinite(r[key]), r
        assert r["metric"] in printed
    assert "wrote" in printed and "dry run" in printed


@pytest.mark.skipif(not NO_GPU, reason="torch sees a GPU here")
def test_without_a_gpu_one_line_naming_dry_run(capsys):
    line = cli_error(capsys, ["bench", "gpu"])
    assert "needs a CUDA GPU" in line and "--dry-run" in line
    line = cli_error(capsys, ["bench", "gpu", "--device", "cpu"])
    assert "--dry-run" in line


def test_faiss_without_gpu_support_is_a_skipped_row(monkeypatch):
    monkeypatch.setattr(gpu_bench, "faiss_gpu_problem",
                        lambda: "the installed faiss has no GPU support; install "
                                "faiss-gpu-cu12")
    (row,) = gpu_bench.knn_rows("cuda", gpu_bench.DRY)   # refused before touching a GPU
    assert row["value"] is None and row["ok"] is None
    assert row["note"].startswith("skipped:") and "faiss-gpu-cu12" in row["note"]
    assert "faiss-gpu-cu12" in gpu_bench.gpu_markdown([{**row, "seconds": 0.0}])


def test_one_gpu_skips_ddp(tmp_path):
    sizes = gpu_bench.Sizes(ddp_ranks=1)
    (row,) = gpu_bench.ddp_rows("cuda", sizes, tmp_path)
    assert row["value"] is None and "DDP needs more than one" in row["note"]
