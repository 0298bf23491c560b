"""End-to-end pretraining on tiny data: contract, resume, init weights, CLI and bad input."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from credanno.data.patchfile import write_patch_file
from credanno.errors import CredannoError
from credanno.pretrain import load_config, pretrain
from credanno.pretrain import train as train_mod
from credanno.pretrain.callbacks import Callback
from credanno.pretrain.checkpoint import latest_run, load_backbone, read_checkpoint
from credanno.runtime import DistEnv
from credanno.synthetic import synthetic_images, synthetic_table

#: A 1-block, 32-wide ViT with a 16-prototype head: a step takes milliseconds.
TINY = {"model_kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2}, "out_dim": 16,
        "head_hidden_dim": 32, "head_bottleneck_dim": 8, "local_crops": 2, "batch_size": 8,
        "epochs": 2, "warmup_epochs": 1, "device": "cpu", "drop_path": 0.1}


@pytest.fixture(scope="module")
def small_patch_file(tmp_path_factory):
    """~24 training images (and some test images that pretraining must ignore)."""
    table = synthetic_table(n_nodules=12, per_nodule=3, seed=1)
    path = tmp_path_factory.mktemp("data") / "patches.h5"
    write_patch_file(path, synthetic_images(table), table, {"source": "synthetic"})
    return path


def tiny_config(data, out, **kw):
    return load_config("cpu-tiny", overrides={**TINY, "data": str(data),
                                              "out": None if out is None else str(out), **kw})


def _all_weights(run_dir):
    state = read_checkpoint(run_dir)
    flat = {}
    for part in ("teacher_backbone", "student_backbone", "teacher_head", "student_head"):
        flat.update({f"{part}.{k}": v for k, v in state[part].items()})
    flat["centre"] = state["centre"]
    return flat, state


def test_run_writes_the_checkpoint_contract(small_patch_file, tmp_path):
    result = pretrain(tiny_config(small_patch_file, tmp_path / "run"))
    assert [m["epoch"] for m in result.metrics] == [1, 2]
    for key in ("loss", "lr", "wd", "momentum", "images_per_s", "epoch_time_s"):
        assert all(key in m for m in result.metrics)
    run = result.run_dir
    assert (run / "config.json").exists() and (run / "loss.png").stat().st_size > 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert json.loads((run / "config.json").read_text())["epochs"] == 2
    state = read_checkpoint(run)
    assert state["format"] == "credanno.dino" and state["format_version"] == 1
    assert state["epoch"] == 2 and state["train_images"] < 36   # training split only
    assert not any(k.startswith("module.") for k in state["student_backbone"])
    assert {"optimizer", "centre", "scaler", "teacher_head"} <= set(state)
    assert "rng" not in state      # nothing to restore: every draw is counter-based
    assert latest_run(tmp_path) == run
    model, info = load_backbone(run, which="teacher")
    assert not model.training and info.epoch == 2 and info.which == "teacher"
    assert (info.eval_transform.resize, info.eval_transform.crop) == (32, 32)
    x = info.eval_transform(torch.rand(3, 32, 32))
    assert model(x).shape == (3, 32)
    student, _ = load_backbone(run, which="student")
    random, rinfo = load_backbone(run, which="random")
    assert rinfo.which == "random"
    assert not torch.equal(random.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    assert not torch.equal(student.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    # the teacher followed the student (EMA) away from their common initial weights
    init = train_mod.Trainer(tiny_config(small_patch_file, tmp_path / "init"), DistEnv())
    assert torch.equal(init.teacher.backbone.blocks[0].attn.qkv.weight,
                       init.student.backbone.blocks[0].attn.qkv.weight)
    assert not torch.equal(model.blocks[0].attn.qkv.weight,
                           init.teacher.backbone.blocks[0].attn.qkv.weight)


def test_resume_after_kill_equals_uninterrupted_run(small_patch_file, tmp_path, monkeypatch):
    full = pretrain(tiny_config(small_patch_file, tmp_path / "full"))
    original = train_mod.Trainer.run_epoch

    def killed_in_epoch_2(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt  # the process dies mid-run, after epoch 1's checkpoint
        return original(self, epoch)

    monkeypatch.setattr(train_mod.Trainer, "run_epoch", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_config(small_patch_file, tmp_path / "resumed"))
    assert read_checkpoint(tmp_path / "resumed")["epoch"] == 1
    monkeypatch.setattr(train_mod.Trainer, "run_epoch", original)
    # no generator state is saved or needed: scrambling the process's own changes nothing
    torch.manual_seed(12345)
    np.random.seed(12345)
    torch.rand(7)
    resumed = pretrain(tiny_config(small_patch_file, tmp_path / "resumed"))
    assert resumed.resumed_from == 1 and [m["epoch"] for m in resumed.metrics] == [1, 2]
    a, state_a = _all_weights(full.run_dir)
    b, state_b = _all_weights(resumed.run_dir)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
    assert state_a["optimizer"]["state"].keys() == state_b["optimizer"]["state"].keys()
    # a finished run is not trained again; other settings on the same folder are refused
    again = pretrain(tiny_config(small_patch_file, tmp_path / "resumed"))
    assert again.resumed_from == 2
    with pytest.raises(CredannoError, match="other settings"):
        pretrain(tiny_config(small_patch_file, tmp_path / "resumed", lr=1e-2))


def _save_layouts(tmp_path, img_size):
    """A timm ViT saved as DINO's training checkpoint and as timm safetensors."""
    import timm
    from safetensors.torch import save_file

    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0,
                            img_size=img_size, patch_size=8, **TINY["model_kwargs"])
    sd = src.state_dict()
    dino = tmp_path / "dino_checkpoint.pth"
    wrapped = {f"module.backbone.{k}": v for k, v in sd.items()}
    wrapped["module.head.last_layer.weight_g"] = torch.ones(16, 1)
    torch.save({"teacher": wrapped, "student": wrapped, "epoch": 100,
                "args": argparse.Namespace(arch="vit_small")}, dino)
    safet = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(safet))
    return sd, dino, safet


def test_init_weights_both_layouts_interpolated_no_training_state(small_patch_file, tmp_path):
    sd, dino, safet = _save_layouts(tmp_path, img_size=64)   # 8x8 grid -> 4x4 grid at 32 px
    for i, weights in enumerate((dino, safet)):
        cfg = tiny_config(small_patch_file, tmp_path / f"run{i}", init=str(weights), epochs=1)
        trainer = train_mod.Trainer(cfg, DistEnv())
        bb = trainer.student.backbone
        assert torch.equal(bb.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])
        assert bb.pos_embed.shape == (1, 17, 32) and sd["pos_embed"].shape == (1, 65, 32)
        assert torch.equal(trainer.teacher.backbone.cls_token, sd["cls_token"])
        assert any("pos_embed" in note for note in trainer.init_report["adapted"])
    result = pretrain(cfg)
    assert read_checkpoint(result.run_dir)["epoch"] == 1   # never the file's epoch 100


def test_init_weights_errors(small_patch_file, tmp_path, monkeypatch):
    import timm

    wide = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0,
                             img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2)
    path = tmp_path / "wide.pth"
    torch.save(wide.state_dict(), path)
    cases = [(str(path), "do not fit the architecture.*(unexpected: blocks.1|wrong shape)"),
             (str(tmp_path / "missing.pth"), "not found"),
             ("timm:vit_small_patch16_224.dino", "HF_HUB_OFFLINE")]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for spec, match in cases:
        with pytest.raises(CredannoError, match=match):
            pretrain(tiny_config(small_patch_file, tmp_path / "bad", init=spec, epochs=1))


def test_bad_inputs_are_one_line_errors(small_patch_file, tmp_path, monkeypatch):
    with pytest.raises(CredannoError, match="not found"):
        pretrain(tiny_config(tmp_path / "nope.h5", tmp_path / "r"))
    with pytest.raises(CredannoError, match="unknown timm architecture"):
        pretrain(tiny_config(small_patch_file, tmp_path / "r", arch="vit_nonexistent"))
    with pytest.raises(CredannoError, match="exceeds the"):
        pretrain(tiny_config(small_patch_file, tmp_path / "r", batch_size=4096))
    # a NaN loss stops the run and keeps the last good checkpoint
    original = train_mod.Trainer.train_step

    def nan_in_epoch_2(self, epoch, it, indices):
        loss = original(self, epoch, it, indices)
        return loss * float("nan") if epoch == 1 else loss

    monkeypatch.setattr(train_mod.Trainer, "train_step", nan_in_epoch_2)
    with pytest.raises(CredannoError, match="loss became nan in epoch 2.*epoch 1 checkpoint kept"):
        pretrain(tiny_config(small_patch_file, tmp_path / "nan"))
    assert read_checkpoint(tmp_path / "nan")["epoch"] == 1

    def out_of_memory(self, epoch, it, indices):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_mod.Trainer, "train_step", out_of_memory)
    with pytest.raises(CredannoError, match="out of memory at batch size 8; pass --batch-size 4"):
        pretrain(tiny_config(small_patch_file, tmp_path / "oom"))


def _shuffled_labels_file(folder):
    """A patch file whose malignancy labels are random: k-NN accuracy is then far from 1."""
    table = synthetic_table(n_nodules=12, per_nodule=3, seed=1)
    images = synthetic_images(table)
    table["malignancy"] = np.random.default_rng(0).permutation(table["malignancy"].to_numpy())
    path = folder / "shuffled.h5"
    write_patch_file(path, images, table, {"source": "synthetic"})
    return path


def test_monitor_reports_knn_on_training_holdout(tmp_path):
    pytest.importorskip("credanno.eval.knn")
    from credanno.eval.knn import knn_classify
    from credanno.pretrain.monitor import KnnMonitor, holdout_split

    data = _shuffled_labels_file(tmp_path)
    result = pretrain(tiny_config(data, tmp_path / "mon", epochs=3, monitor_every=2,
                                  monitor_k=5))
    # every monitor_every epochs, and after the last one
    assert ["knn_malignancy_acc" in m for m in result.metrics] == [False, True, True]
    # queries: the labelled images of held-out training nodules; bank: the other labelled ones
    images, table = train_mod.load_train_images(str(data))
    labels, nodules = table["malignancy"].to_numpy(), table["nodule_id"].to_numpy()
    bank, queries = holdout_split(nodules, labels, 0.2, seed=0)
    assert len(bank) and len(queries) and not set(nodules[bank]) & set(nodules[queries])
    assert sorted([*bank, *queries]) == np.flatnonzero(labels >= 0).tolist()
    # the reported accuracy is k-NN on the final teacher's features, recomputed here
    model, info = load_backbone(result.run_dir, which="teacher")
    with torch.no_grad():
        feats = model(info.eval_transform(torch.from_numpy(images)))
    feats = torch.nn.functional.normalize(feats.float(), dim=-1).numpy()
    preds = np.asarray(knn_classify(feats[bank], labels[bank], feats[queries], ks=[5],
                                    n_classes=2)[5])
    last = result.metrics[-1]
    assert last["knn_k"] == 5
    assert last["knn_malignancy_acc"] == pytest.approx(np.mean(preds == labels[queries]),
                                                       abs=1e-12)
    # a k above the bank size is clamped to it, and the row says so
    trainer = train_mod.Trainer(tiny_config(data, tmp_path / "k", monitor_k=1000), DistEnv())
    monitor = KnnMonitor()
    monitor.on_train_start(trainer, 0)
    assert monitor.measure(trainer)["knn_k"] == len(monitor.bank) < 1000


class _Snapshots(Callback):
    """Copies of the student's prototype (last) layer and of its other weights, at the start
    and after every epoch."""

    def __init__(self):
        self.last, self.rest = [], []

    def _take(self, trainer):
        last_ids = {id(p) for p in trainer.last_layer_params}
        self.last.append([p.detach().clone() for p in trainer.last_layer_params])
        self.rest.append([p.detach().clone() for p in trainer.student_params
                          if id(p) not in last_ids])

    def on_train_start(self, trainer, start_epoch):
        self._take(trainer)

    def on_epoch_end(self, trainer, epoch, row):
        self._take(trainer)
        return {}


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("freeze", [1, 0])
def test_freeze_last_layer_really_freezes_the_prototypes(small_patch_file, tmp_path, freeze):
    """DINO's freeze_last_layer: no update of the prototype layer in the first epoch(s);
    the other weights train, and the prototypes move once released."""
    cfg = tiny_config(small_patch_file, tmp_path / "run", freeze_last_layer=freeze)
    spy = _Snapshots()
    trainer = train_mod.Trainer(cfg, DistEnv(),
                                callbacks=[*train_mod.default_callbacks(cfg), spy])
    trainer.run()
    (init, after1, after2), rest = spy.last, spy.rest
    assert trainer.last_layer_params and not _same(rest[0], rest[1])   # epoch 1 trained
    assert _same(init, after1) == bool(freeze)
    assert not _same(after1, after2)                                  # epoch 2 moves them
    assert (tmp_path / "run" / "metrics.jsonl").exists()              # defaults still ran


def test_cli_pretrain(small_patch_file, tmp_path, capsys):
    from credanno.cli import main

    toml = tmp_path / "tiny.toml"
    toml.write_text("[model]\nmodel_kwargs = { depth = 1, embed_dim = 32, num_heads = 2 }\n"
                    "out_dim = 16\nhead_hidden_dim = 32\nhead_bottleneck_dim = 8\n")
    args = ["pretrain", "--preset", "cpu-tiny", "--config", str(toml), "--data",
            str(small_patch_file), "--epochs", "1", "--batch-size", "8", "--local-crops", "1",
            "--out", str(tmp_path / "cli"), "--device", "cpu", "--seed", "3", "--no-progress"]
    main(args)
    out = capsys.readouterr().out
    assert "loss" in out and "checkpoint:" in out
    cfg = read_checkpoint(tmp_path / "cli")["config"]
    assert (cfg["seed"], cfg["local_crops"], cfg["out_dim"]) == (3, 1, 16)
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", "--data", str(tmp_path / "missing.h5"), "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_default_run_name_resumes_unfinished_run(small_patch_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    original = train_mod.Trainer.run_epoch

    def killed(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(train_mod.Trainer, "run_epoch", killed)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_config(small_patch_file, None))
    (first,) = (tmp_path / "runs").iterdir()
    assert first.name.startswith("cpu-tiny-")
    monkeypatch.setattr(train_mod.Trainer, "run_epoch", original)
    result = pretrain(tiny_config(small_patch_file, None))       # same command, no --out
    assert result.run_dir.resolve() == first.resolve() and result.resumed_from == 1
    assert latest_run(tmp_path / "runs").resolve() == first.resolve()


def test_bf16_autocast_path_trains(small_patch_file, tmp_path):
    """The GPU's bf16 path (autocast, fp32 loss) exercised on the CPU."""
    result = pretrain(tiny_config(small_patch_file, tmp_path / "bf16", amp="bf16", epochs=1))
    assert math.isfinite(result.metrics[0]["loss"])
    state = read_checkpoint(result.run_dir)
    assert state["student_backbone"]["cls_token"].dtype == torch.float32   # master weights
