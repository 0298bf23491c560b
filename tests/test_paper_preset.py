"""The paper preset at toy size on the CPU (issue 14), and ``--max-steps``.

The paper's path (ViT-S/16, 224/96 px crops, 8 local crops, the on-device patch set and
batched multi-crop, the 65,536-prototype head) otherwise runs only on a GPU; here it takes
two optimiser steps at batch 4 on the CPU, and its checkpoint embeds into a 384-d store. The
``--max-steps`` semantics (probe checkpoint, start over, boundary stops resume bit-exactly)
are checked on a one-block ViT, where a step takes milliseconds.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

from credanno.data.patchfile import write_patch_file
from credanno.errors import CredannoError, CredannoWarning
from credanno.pretrain import load_config, pretrain
from credanno.pretrain.checkpoint import read_checkpoint
from credanno.pretrain.train import Trainer
from credanno.runtime import DistEnv
from credanno.synthetic import synthetic_images, synthetic_table

#: A 1-block, 32-wide ViT with a 16-prototype head (as tests/test_pretrain_train.py).
TINY = {"model_kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2}, "out_dim": 16,
        "head_hidden_dim": 32, "head_bottleneck_dim": 8, "local_crops": 2, "batch_size": 4,
        "epochs": 2, "warmup_epochs": 1, "device": "cpu"}


@pytest.fixture(scope="module")
def patch_file(tmp_path_factory):
    """At least 12 training images (3+ steps per epoch at batch 4) and some test images."""
    table = synthetic_table(n_nodules=12, per_nodule=3, seed=2)
    path = tmp_path_factory.mktemp("data") / "patches.h5"
    write_patch_file(path, synthetic_images(table), table, {"source": "synthetic"})
    return path


@pytest.fixture(scope="module")
def small_patch_file(tmp_path_factory):
    """About 12 images: ViT-S/16 at 224 px costs seconds per image on 2 CPU cores."""
    table = synthetic_table(n_nodules=5, per_nodule=3, seed=2)
    path = tmp_path_factory.mktemp("small") / "patches.h5"
    write_patch_file(path, synthetic_images(table), table, {"source": "synthetic"})
    return path


def _tiny(data, out, **kw):
    return load_config("cpu-tiny", overrides={**TINY, "data": str(data), "out": str(out), **kw})


def _weights(run):
    state = read_checkpoint(run)
    return {f"{part}.{k}": v for part in ("teacher_backbone", "student_backbone",
                                          "teacher_head", "student_head")
            for k, v in state[part].items()}


# -- --max-steps ---------------------------------------------------------------------------
def test_max_steps_mid_epoch_writes_a_probe_that_a_later_run_starts_over(patch_file, tmp_path):
    run = tmp_path / "run"
    probe = pretrain(_tiny(patch_file, run, max_steps=2))
    steps = Trainer(_tiny(patch_file, tmp_path / "x"), DistEnv()).steps_per_epoch
    assert steps > 2 and probe.metrics == [] and probe.partial["steps"] == 2
    state = read_checkpoint(run)
    assert (state["epoch"], state["steps"], state["partial_epoch"]["steps"]) == (0, 2, 2)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["partial"] and rows[0]["epoch"] == 1
    # a later run without --max-steps starts over (warned) and ends as an uninterrupted run
    with pytest.warns(CredannoWarning, match="starts over from epoch 0"):
        again = pretrain(_tiny(patch_file, run))
    full = pretrain(_tiny(patch_file, tmp_path / "full"))
    assert again.resumed_from == 0 and again.partial is None
    assert [m["epoch"] for m in again.metrics] == [1, 2]
    a, b = _weights(run), _weights(full.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_checkpoint(run)["partial_epoch"] is None


def test_max_steps_on_an_epoch_boundary_resumes_bit_exactly(patch_file, tmp_path):
    steps = Trainer(_tiny(patch_file, tmp_path / "x"), DistEnv()).steps_per_epoch
    first = pretrain(_tiny(patch_file, tmp_path / "run", max_steps=steps))
    assert first.partial is None and [m["epoch"] for m in first.metrics] == [1]
    assert read_checkpoint(tmp_path / "run")["steps"] == steps
    resumed = pretrain(_tiny(patch_file, tmp_path / "run"))   # max_steps may change
    assert resumed.resumed_from == 1 and [m["epoch"] for m in resumed.metrics] == [1, 2]
    full = pretrain(_tiny(patch_file, tmp_path / "full"))
    a, b = _weights(tmp_path / "run"), _weights(full.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_max_steps_is_validated(patch_file, tmp_path, capsys):
    with pytest.raises(CredannoError, match="max_steps must be an integer >= 0"):
        _tiny(patch_file, tmp_path / "r", max_steps=-1)
    toml = tmp_path / "bad.toml"
    toml.write_text("[run]\nmax_steps = 1.5\n")
    with pytest.raises(CredannoError, match="max_steps.*wrong type"):
        load_config("cpu-tiny", file=toml)
    from tests.helpers import cli_error

    line = cli_error(capsys, ["pretrain", "--preset", "cpu-tiny", "--data", str(patch_file),
                              "--max-steps", "-2", "--out", str(tmp_path / "c")])
    assert "max_steps" in line and "change the option" in line


# -- the paper preset at toy size ----------------------------------------------------------
def test_paper_preset_two_steps_on_cpu_then_embed_384d(small_patch_file, tmp_path, capsys):
    from credanno import stores
    from credanno.cli import main

    run, store, patch_file = tmp_path / "paper", tmp_path / "paper.h5", small_patch_file
    main(["pretrain", "--preset", "paper", "--data", str(patch_file), "--device", "cpu",
          "--max-steps", "2", "--batch-size", "4", "--out", str(run), "--no-progress"])
    out = capsys.readouterr().out
    assert "preset paper: vit_small_patch16_224 224/96 px" in out and "checkpoint:" in out
    state = read_checkpoint(run)
    cfg = state["config"]
    assert (cfg["arch"], cfg["global_size"], cfg["local_size"], cfg["local_crops"]) == \
        ("vit_small_patch16_224", 224, 96, 8)
    assert (cfg["out_dim"], cfg["batch_size"], state["steps"]) == (65536, 4, 2)
    assert any(v.shape[0] == 65536 for v in state["student_head"].values())
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses and all(map(math.isfinite, losses))
    main(["embed", "--checkpoint", str(run), "--data", str(patch_file), "--out", str(store),
          "--device", "cpu", "--batch-size", "16", "--quiet"])
    with stores.open(store) as s:
        cls = s.features(None, "cls")
        assert s.dim == 384 and cls.shape == (s.n, 384) and torch.isfinite(
            torch.from_numpy(cls)).all()
        if "last4" in s.feature_sets:
            assert s.features(None, "last4").shape == (s.n, 1536)


def _dino_vit_s16(path):
    """A file laid out like Meta's dino_deitsmall16_pretrain.pth: a timm ViT-S/16 state dict
    without a head (random values)."""
    import timm

    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    state = model.state_dict()
    torch.save(state, path)
    return state


def test_paper_preset_init_from_a_dino_layout_vit_s16(small_patch_file, tmp_path):
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    sd = _dino_vit_s16(path)
    assert "head.weight" not in sd and "pos_embed" in sd
    cfg = load_config("paper", overrides={"data": str(small_patch_file),
                                          "out": str(tmp_path / "r"),
                                          "device": "cpu", "batch_size": 4, "init": str(path)})
    trainer = Trainer(cfg, DistEnv())
    for name in ("student", "teacher"):
        bb = getattr(trainer, name).backbone.state_dict()
        assert all(torch.equal(bb[k], v) for k, v in sd.items()), name
    assert trainer.init_report["tensors"] == len(sd)


def _inductor_problem() -> str | None:
    if not (shutil.which("cc") or shutil.which("gcc")):
        return "torch.compile's inductor needs a C compiler (cc/gcc) on the CPU; none here"
    if os.environ.get("CREDANNO_INDUCTOR_TESTS") != "1":
        return ("inductor compiles the ViT's graphs in ~1 min per crop size on 2 CPU cores; "
                "set CREDANNO_INDUCTOR_TESTS=1 to run it (the aot_eager variant always runs)")
    return None


def _compile_one_step(patch_file, out):
    """``--compile`` (Module.compile of both ViTs) on the paper preset's crops and head, with
    one transformer block and 2 local crops so that compiling stays cheap."""
    cfg = load_config("paper", overrides={
        "data": str(patch_file), "out": str(out), "device": "cpu", "batch_size": 4,
        "max_steps": 1, "compile": True, "local_crops": 2, "model_kwargs": {"depth": 1}})
    result = pretrain(cfg)
    assert result.partial["steps"] == 1 and torch.isfinite(torch.tensor(result.partial["loss"]))
    state = read_checkpoint(result.run_dir)
    assert not any(k.startswith("_orig_mod") for k in state["student_backbone"])


def test_paper_preset_compile_path_traces(patch_file, tmp_path, monkeypatch):
    """Dynamo traces the trainer's compiled ViTs (both crop sizes, forward and backward);
    aot_eager runs the captured graphs without inductor's C++ build."""
    original = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, *a, **kw: original(self, *a, **{**kw,
                                                                     "backend": "aot_eager"}))
    torch._dynamo.reset()
    _compile_one_step(patch_file, tmp_path / "c")


@pytest.mark.skipif(_inductor_problem() is not None, reason=str(_inductor_problem()))
def test_paper_preset_compile_path_inductor(patch_file, tmp_path):
    torch._dynamo.reset()
    _compile_one_step(patch_file, tmp_path / "c")
