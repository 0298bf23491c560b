"""torchrun with 2 CPU processes (gloo) reproduces the single-process run on the same batch.

Each rank takes half of every global batch; the crops of an image are a function of its
index, DDP averages the gradients and the centre is all-reduced, so 2 x B/2 must equal B up
to floating-point summation order. Drop path is off (its masks are drawn per rank).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from credanno.data.patchfile import write_patch_file
from credanno.pretrain.checkpoint import read_checkpoint
from credanno.synthetic import synthetic_images, synthetic_table

TOML = """
[model]
model_kwargs = { depth = 1, embed_dim = 32, num_heads = 2 }
out_dim = 16
head_hidden_dim = 32
head_bottleneck_dim = 8
drop_path = 0.0
[optim]
warmup_epochs = 0
"""


def _run(args, env, cwd):
    proc = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_two_process_step_matches_single_process(tmp_path):
    table = synthetic_table(n_nodules=8, per_nodule=3, seed=2)
    data = tmp_path / "p.h5"
    write_patch_file(data, synthetic_images(table), table, {"source": "synthetic"})
    (tmp_path / "tiny.toml").write_text(TOML)
    common = ["pretrain", "--preset", "cpu-tiny", "--config", "tiny.toml", "--data", str(data),
              "--epochs", "1", "--batch-size", "8", "--local-crops", "2", "--device", "cpu",
              "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    _run([sys.executable, "-m", "credanno", *common, "--out", "single"], env, tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          "-m", "credanno", *common, "--out", "ddp"], env, tmp_path)
    single, ddp = read_checkpoint(tmp_path / "single"), read_checkpoint(tmp_path / "ddp")
    assert single["epoch"] == ddp["epoch"] == 1
    for part in ("student_backbone", "teacher_backbone", "student_head", "teacher_head"):
        for key, value in single[part].items():
            assert torch.allclose(value, ddp[part][key], atol=1e-5, rtol=1e-4), f"{part}.{key}"
    # the steps did move the student away from the teacher (the comparison is not vacuous)
    w = "blocks.0.mlp.fc1.weight"
    assert not torch.allclose(single["student_backbone"][w], single["teacher_backbone"][w])
    assert torch.allclose(single["centre"], ddp["centre"], atol=1e-6)
    # only rank 0 wrote files: one checkpoint, one metrics line
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == 1
