"""Reliability of pretraining (issue 10): config validation, damaged checkpoints, resume on
changed data, metrics surviving a kill, unwritable run folders, non-square patches."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
import torch

from credanno.data.patchfile import write_patch_file
from credanno.errors import CredannoError
from credanno.pretrain import load_config, pretrain
from credanno.pretrain import outputs as outputs_mod
from credanno.pretrain import runs as runs_mod
from credanno.pretrain import train as train_mod
from credanno.pretrain.checkpoint import load_backbone, read_checkpoint
from credanno.synthetic import synthetic_images, synthetic_table

#: A 1-block, 32-wide ViT with a 16-prototype head: an epoch takes a fraction of a second.
TINY = {"model_kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2}, "out_dim": 16,
        "head_hidden_dim": 32, "head_bottleneck_dim": 8, "local_crops": 1, "batch_size": 8,
        "epochs": 1, "warmup_epochs": 0, "device": "cpu"}


def _patch_file(path, seed=1):
    table = synthetic_table(n_nodules=8, per_nodule=3, seed=seed)
    write_patch_file(path, synthetic_images(table), table, {"source": "synthetic"})
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _patch_file(tmp_path_factory.mktemp("data") / "patches.h5")


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A finished 1-epoch run whose checkpoint the damage tests copy and edit."""
    torch.set_num_threads(1)
    return pretrain(tiny(data, tmp_path_factory.mktemp("runs") / "run")).run_dir


def tiny(data, out, **kw):
    return load_config("cpu-tiny", overrides={**TINY, "data": str(data),
                                              "out": None if out is None else str(out), **kw})


def _cli(args, capsys):
    from credanno.cli import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# -- item 10: the resolved config is validated completely, before anything is written ------

@pytest.mark.parametrize("toml, field", [
    ("[model]\npatch_size = 0\n", "patch_size"),
    ("[crops]\nglobal_size = 0\n", "global_size"),
    ("[crops]\nlocal_size = -16\n", "local_size"),
    ("[model]\nhead_layers = 0\n", "head_layers"),
    ("[model]\neval_crop = 40\n", "eval_crop"),          # larger than eval_resize 32
    ("[model]\ndrop_path = 1.5\n", "drop_path"),
    ("[optim]\nlr = nan\n", "lr"),
    ("[optim]\nmin_lr = -1.0\n", "min_lr"),
    ("[optim]\nwarmup_epochs = -1\n", "warmup_epochs"),
    ("[dino]\nteacher_temp = 0.0\n", "teacher_temp"),
    ("[dino]\nmomentum_teacher = 1.5\n", "momentum_teacher"),
    ("[dino]\ncenter_momentum = inf\n", "center_momentum"),
    ("[crops]\nglobal_scale = [0.5, 0.2]\n", "global_scale"),
    ("[crops]\nblur_sigma = [0.0, 1.0]\n", "blur_sigma"),
    ("[run]\nseed = -1\n", "seed"),
    ("[run]\nmonitor_k = 0\n", "monitor_k"),
])
def test_toml_config_errors_name_field_and_file(tmp_path, data, toml, field):
    file = tmp_path / "bad.toml"
    file.write_text(toml)
    with pytest.raises(CredannoError) as exc:
        load_config("cpu-tiny", file=file, overrides={"data": str(data),
                                                      "out": str(tmp_path / "run")})
    msg = str(exc.value)
    assert f"{field} must be" in msg and str(file) in msg and "\n" not in msg
    assert not (tmp_path / "run").exists()


def test_invalid_config_built_in_code_writes_nothing(tmp_path, data):
    cfg = tiny(data, tmp_path / "run")
    cfg.global_size = 0            # used to fail only after config.json was written
    with pytest.raises(CredannoError, match="global_size must be an integer >= 1"):
        pretrain(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, value, field", [
    ("--epochs", "0", "epochs"), ("--epochs", "-3", "epochs"),
    ("--monitor-every", "-1", "monitor_every"), ("--batch-size", "0", "batch_size"),
    ("--lr", "-1", "lr"), ("--local-crops", "-2", "local_crops"),
])
def test_cli_bad_numbers_are_one_line_errors(tmp_path, data, capsys, flag, value, field):
    line = _cli(["pretrain", "--preset", "cpu-tiny", "--data", str(data), "--out",
                 str(tmp_path / "run"), "--device", "cpu", "--no-progress", flag, value], capsys)
    assert f"{field} must be" in line and "command line" in line
    assert not (tmp_path / "run").exists()


# -- item 9: damaged checkpoints are one-line errors naming the field ----------------------

def _damaged(trained, tmp_path, edit):
    state = torch.load(trained / "checkpoint.pt", weights_only=True)
    edit(state)
    (tmp_path / "bad").mkdir(exist_ok=True)
    torch.save(state, tmp_path / "bad" / "checkpoint.pt")
    return tmp_path / "bad"


def _shrink(sd, key="pos_embed"):
    sd[key] = sd[key][..., :-1]


DAMAGE = [
    ("backbone", lambda s: s.pop("backbone")),
    ("teacher_backbone", lambda s: s.pop("teacher_backbone")),
    ("student_backbone", lambda s: s.update(student_backbone="weights")),
    ("teacher_backbone", lambda s: _shrink(s["teacher_backbone"])),
    ("teacher_backbone", lambda s: s["teacher_backbone"].pop("cls_token")),
    ("backbone.arch", lambda s: s["backbone"].update(arch=5)),
    ("backbone.kwargs", lambda s: s["backbone"].update(kwargs=[1, 2])),
    ("epoch", lambda s: s.update(epoch="1")),
    ("epoch", lambda s: s.update(epoch=-1)),
    ("format_version", lambda s: s.update(format_version="1")),
    ("format_version", lambda s: s.update(format_version=1.5)),
    ("eval_transform", lambda s: s.update(eval_transform="garbage")),
    ("eval_transform", lambda s: s.pop("eval_transform")),
    ("eval_transform.resize", lambda s: s["eval_transform"].update(resize="big")),
    ("eval_transform", lambda s: s["eval_transform"].update(crop=0)),
    ("config", lambda s: s.update(config=None)),
]


@pytest.mark.parametrize("field, edit", DAMAGE)
def test_damaged_checkpoint_names_the_field(trained, tmp_path, field, edit):
    bad = _damaged(trained, tmp_path, edit)
    which = "student" if field == "student_backbone" else "teacher"
    with pytest.raises(CredannoError) as exc:
        load_backbone(bad, which=which)
    msg = str(exc.value)
    assert f"damaged checkpoint: {field} " in msg and "\n" not in msg


def test_damaged_checkpoint_through_the_cli(trained, tmp_path, data, capsys):
    bad = _damaged(trained, tmp_path, lambda s: _shrink(s["teacher_backbone"]))
    line = _cli(["embed", "--data", str(data), "--checkpoint", str(bad), "--out",
                 str(tmp_path / "s.h5"), "--device", "cpu", "--quiet"], capsys)
    assert "teacher_backbone" in line and "wrong-shape" in line


@pytest.mark.parametrize("field, edit", [
    ("teacher_head", lambda s: _shrink(s["teacher_head"], next(iter(s["teacher_head"])))),
    ("student_head", lambda s: s.pop("student_head")),
    ("optimizer", lambda s: s.update(optimizer={"state": {}, "param_groups": []})),
    ("centre", lambda s: s.update(centre=torch.zeros(1, 3))),
    ("metrics", lambda s: s.update(metrics=[{"epoch": 7}])),
    ("metrics", lambda s: s["metrics"][0].pop("loss")),
    ("epoch", lambda s: s.update(epoch=5)),
])
def test_resume_from_damaged_training_state_names_the_field(trained, tmp_path, data, field,
                                                            edit):
    bad = _damaged(trained, tmp_path, edit)
    before = (bad / "checkpoint.pt").read_bytes()
    with pytest.raises(CredannoError) as exc:
        pretrain(tiny(data, bad))                    # the same settings: resume / already done
    assert f"damaged checkpoint: {field}" in str(exc.value)
    assert (bad / "checkpoint.pt").read_bytes() == before      # nothing was overwritten


def test_optimizer_moments_of_the_wrong_shape_are_refused(trained, tmp_path, data):
    def edit(state):
        first = next(iter(state["optimizer"]["state"].values()))
        first["exp_avg"] = first["exp_avg"].reshape(-1)[:1].clone()

    bad = _damaged(trained, tmp_path, edit)
    with pytest.raises(CredannoError, match="damaged checkpoint: optimizer state exp_avg"):
        pretrain(tiny(data, bad))


# -- item 12: a resume refuses other images at the same path --------------------------------

def _killed_in_epoch_2(monkeypatch):
    original = train_mod.Trainer.run_epoch

    def killed(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt  # the process dies after epoch 1's checkpoint
        return original(self, epoch)

    monkeypatch.setattr(train_mod.Trainer, "run_epoch", killed)
    return original


def test_resume_refuses_a_replaced_patch_file(tmp_path, monkeypatch):
    data = _patch_file(tmp_path / "p.h5", seed=1)
    run = tmp_path / "run"
    original = _killed_in_epoch_2(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny(data, run, epochs=2))
    monkeypatch.setattr(train_mod.Trainer, "run_epoch", original)
    assert json.loads((run / "config.json").read_text())["data_sha256"]
    _patch_file(data, seed=2)                           # other images, same path
    with pytest.raises(CredannoError) as exc:
        pretrain(tiny(data, run, epochs=2))
    msg = str(exc.value)
    assert "is not the patch file" in msg and "--out" in msg and "\n" not in msg
    assert read_checkpoint(run)["epoch"] == 1


def test_default_run_name_does_not_resume_on_other_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = _patch_file(tmp_path / "p.h5", seed=1)
    original = _killed_in_epoch_2(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny(data, None, epochs=2))
    (first,) = (tmp_path / "runs").iterdir()
    monkeypatch.setattr(train_mod.Trainer, "run_epoch", original)
    monkeypatch.setattr(runs_mod, "_timestamp", lambda: "second")
    _patch_file(data, seed=2)
    result = pretrain(tiny(data, None, epochs=2))       # the same command on other data
    assert result.resumed_from == 0 and result.run_dir.resolve() != first.resolve()


# -- item 13: metrics survive a kill between the checkpoint and metrics.jsonl -------------

def _kill_after_checkpoint_of(n_rows, monkeypatch):
    """Die after the checkpoint of epoch ``n_rows`` but before its metrics and plot."""
    original = outputs_mod.write_metrics

    def write(path, metrics):
        if len(metrics) == n_rows:
            raise KeyboardInterrupt
        original(path, metrics)

    monkeypatch.setattr(outputs_mod, "write_metrics", write)
    return original


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_already_trained_run_restores_metrics_and_plot(tmp_path, data, monkeypatch):
    run = tmp_path / "run"
    original = _kill_after_checkpoint_of(2, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny(data, run, epochs=2))
    assert read_checkpoint(run)["epoch"] == 2
    assert len(_rows(run)) == 1 and not (run / "loss.png").exists()
    monkeypatch.setattr(outputs_mod, "write_metrics", original)
    again = pretrain(tiny(data, run, epochs=2))
    assert again.resumed_from == 2
    assert [m["epoch"] for m in _rows(run)] == [1, 2] == [m["epoch"] for m in again.metrics]
    assert _rows(run) == read_checkpoint(run)["metrics"]
    assert again.loss_curve == run / "loss.png" and (run / "loss.png").stat().st_size > 0


def test_resumed_run_keeps_every_epochs_row(tmp_path, data, monkeypatch):
    run = tmp_path / "run"
    original = _kill_after_checkpoint_of(2, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny(data, run, epochs=3))
    monkeypatch.setattr(outputs_mod, "write_metrics", original)
    (run / "metrics.jsonl").write_text("not json\n")   # a damaged file is rewritten too
    result = pretrain(tiny(data, run, epochs=3))
    assert result.resumed_from == 2
    assert [m["epoch"] for m in _rows(run)] == [1, 2, 3]
    assert [m["epoch"] for m in result.metrics] == [1, 2, 3]
    assert (run / "loss.png").exists()


# -- item 7: run folders that cannot be created are one-line errors -------------------------

def test_run_folder_under_a_file_or_too_long(tmp_path, data, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CredannoError, match="cannot create run folder .*choose a writable --out"):
        pretrain(tiny(data, blocker / "run"))
    line = _cli(["pretrain", "--preset", "cpu-tiny", "--config", _tiny_toml(tmp_path),
                 "--data", str(data), "--epochs", "1", "--batch-size", "8", "--device", "cpu",
                 "--out", str(tmp_path / ("r" * 300)), "--no-progress"], capsys)
    assert "--out" in line and "name too long" in line.lower()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root ignores directory permissions")
def test_run_folder_without_write_permission(tmp_path, data):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        with pytest.raises(CredannoError, match="cannot create run folder.*Permission denied"):
            pretrain(tiny(data, parent / "run"))
    finally:
        parent.chmod(0o700)


def _tiny_toml(tmp_path):
    toml = tmp_path / "tiny.toml"
    toml.write_text("[model]\nmodel_kwargs = { depth = 1, embed_dim = 32, num_heads = 2 }\n"
                    "out_dim = 16\nhead_hidden_dim = 32\nhead_bottleneck_dim = 8\n")
    return str(toml)


# -- item 14: non-square patches are refused at the start ----------------------------------

def test_non_square_patches_are_refused_before_writing(tmp_path):
    data = _patch_file(tmp_path / "p.h5")
    with h5py.File(data, "r+") as f:
        n = f["images"].shape[0]
        del f["images"]
        f.create_dataset("images", data=np.full((n, 32, 24), 0.5, np.float32))
    with pytest.raises(CredannoError) as exc:
        pretrain(tiny(data, tmp_path / "run"))
    assert "square" in str(exc.value) and "\n" not in str(exc.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content, match", [
    (b"[crops]\nglobal_scale = [\"a\", \"b\"]\n", "global_scale.*wrong type"),
    (b"\xff\xfe not utf-8", "is not valid TOML"),
    (None, "cannot read config file"),                 # a folder
])
def test_unreadable_or_mistyped_toml_is_one_line(tmp_path, content, match):
    file = tmp_path / "c.toml"
    if content is None:
        file.mkdir()
    else:
        file.write_bytes(content)
    with pytest.raises(CredannoError, match=match) as exc:
        load_config("cpu-tiny", file=file)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("errno_, text", [(13, "Permission denied"),
                                          (30, "Read-only file system")])
def test_run_folder_mkdir_errors_are_one_line(tmp_path, data, monkeypatch, errno_, text):
    """Permission and read-only file-system errors (simulated: tests may run as root)."""
    import pathlib

    def refuse(self, *args, **kwargs):
        raise OSError(errno_, os.strerror(errno_), str(self))

    monkeypatch.setattr(pathlib.Path, "mkdir", refuse)
    with pytest.raises(CredannoError) as exc:
        pretrain(tiny(data, tmp_path / "run"))
    msg = str(exc.value)
    assert msg.startswith("cannot create run folder") and text in msg and "--out" in msg
