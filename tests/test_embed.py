"""``credanno embed``: encoders, feature sets, views, the CLI, checkpoints and torchrun."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from credanno import stores
from credanno.augment import ViewAugmentation
from credanno.cli import main
from credanno.data.patchfile import file_sha256, read_patch_file
from credanno.embed import embed
from credanno.encoders import build_encoder
from credanno.errors import CredannoError
from credanno.transforms import EvalTransform

ARCH = "vit_tiny_patch16_224"
TINY = {"img_size": 32, "patch_size": 8, "depth": 4, "embed_dim": 48, "num_heads": 3}
TINY_OPTS = [x for k, v in TINY.items() for x in ("--encoder-option", f"{k}={v}")]

pytestmark = pytest.mark.usefixtures("one_torch_thread")




def _tiny_vit(seed, **extra):
    import timm

    torch.manual_seed(seed)
    return timm.create_model(ARCH, pretrained=False, num_classes=0, **TINY, **extra).eval()


def save_contract_checkpoint(path, epoch=3):
    """A checkpoint in exactly the docs/architecture.md format (keys a pretraining run writes)."""
    # pretraining builds its encoders with dynamic_img_size (global and local crops)
    teacher, student = _tiny_vit(1, dynamic_img_size=True), _tiny_vit(2, dynamic_img_size=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({
        "format": "credanno.dino", "format_version": 1, "epoch": epoch,
        "config": {"model": {"arch": ARCH}},
        "backbone": {"arch": ARCH, "kwargs": {**TINY, "dynamic_img_size": True}},
        "teacher_backbone": teacher.state_dict(), "student_backbone": student.state_dict(),
        "eval_transform": EvalTransform(resize=32, crop=32).to_dict(),
    }, path)
    return teacher, student


def _reference_features(model, images, transform=None):
    """cls / last4 computed by hand: final-norm CLS of the last (4) blocks."""
    x = (transform or EvalTransform(resize=32, crop=32))(torch.from_numpy(images))
    with torch.no_grad():
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        tokens = []
        for blk in model.blocks:
            x = blk(x)
            tokens.append(model.norm(x)[:, 0])
    return tokens[-1].numpy(), torch.cat(tokens[-4:], 1).numpy()


def test_cli_pixels(tiny_patch_file, tmp_path, capsys):
    out = tmp_path / "px.h5"
    main(["embed", "--encoder", "pixels", "--data", str(tiny_patch_file), "--out", str(out),
          "--quiet", "--batch-size", "17"])
    assert f"wrote {out} (120 images; cls 1024-d)" in capsys.readouterr().out
    ps = read_patch_file(tiny_patch_file)
    with stores.open(out) as s:
        np.testing.assert_array_equal(s.features(), ps.images.reshape(120, -1))
        assert s.feature_sets == ["cls"]
        np.testing.assert_array_equal(s.labels("malignancy"), ps.table["malignancy"])
        assert list(s.table()["patient_id"]) == list(ps.table["patient_id"])
        prov = s.provenance
    assert prov["encoder"]["kind"] == "pixels"
    assert prov["patch_file"]["sha256"] == file_sha256(tiny_patch_file)


def test_cli_tiny_timm_vit_with_views(tiny_patch_file, tmp_path):
    out = tmp_path / "vit.h5"
    main(["embed", "--encoder", f"timm:{ARCH}", *TINY_OPTS, "--data", str(tiny_patch_file),
          "--out", str(out), "--quiet", "--views", "2", "--batch-size", "50"])
    ps = read_patch_file(tiny_patch_file)
    cls, last4 = _reference_features(_tiny_vit(0), ps.images)
    with stores.open(out) as s:
        assert s.dims == {"cls": 48, "last4": 192}
        np.testing.assert_allclose(s.features(kind="cls"), cls, atol=1e-5)
        np.testing.assert_allclose(s.features(kind="last4"), last4, atol=1e-5)
        v = s.views(kind="last4")
        n_train = len(s.rows("train"))
        assert v.shape == (2, n_train, 192)
        assert not np.allclose(v[0], v[1])
        prov = s.provenance
    assert prov["encoder"]["which"] == "random" and prov["encoder"]["kwargs"] == TINY
    assert prov["views"]["n"] == 2
    assert prov["transform"]["crop"] == 32


def test_view_augmentation_is_seeded_per_row_and_view():
    aug = ViewAugmentation(max_shift=2, seed=0)
    imgs = torch.rand(6, 32, 32)
    rows = np.arange(10, 16)
    a = aug(imgs, rows, view=1)
    np.testing.assert_array_equal(a[2:], aug(imgs[2:], rows[2:], view=1))  # batch-independent
    assert not torch.equal(a, aug(imgs, rows, view=2))
    flip, k, dy, dx = aug.params(10, 1)
    assert abs(dy) <= 2 and abs(dx) <= 2 and 0 <= k < 4
    # views keep the nodule: same intensities up to the shifted-in border
    assert torch.allclose(a[:, 4:-4, 4:-4].mean(), imgs[:, 4:-4, 4:-4].mean(), atol=0.05)


def test_checkpoint_embed_defaults_to_newest_teacher(tiny_patch_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    shutil.copy(tiny_patch_file, tmp_path / "data" / "phantom.h5")
    save_contract_checkpoint(tmp_path / "runs" / "old" / "checkpoint.pt")
    teacher, student = save_contract_checkpoint(tmp_path / "runs" / "new" / "checkpoint.pt")
    os.utime(tmp_path / "runs" / "old" / "checkpoint.pt", (1, 1))
    main(["embed", "--quiet"])  # right after `credanno pretrain`: no arguments
    out = tmp_path / "stores" / "new.h5"
    images = read_patch_file(out.parent.parent / "data" / "phantom.h5").images
    cls, last4 = _reference_features(teacher, images)
    with stores.open(out) as s:
        np.testing.assert_allclose(s.features(kind="cls"), cls, atol=1e-5)
        np.testing.assert_allclose(s.features(kind="last4"), last4, atol=1e-5)
        enc = s.provenance["encoder"]
    assert enc["which"] == "teacher" and enc["epoch"] == 3 and enc["arch"] == ARCH
    assert enc["sha256"] == file_sha256(tmp_path / "runs" / "new" / "checkpoint.pt")
    student_store = embed(checkpoint="runs/new", which="student")
    random_store = embed(checkpoint="runs/new/checkpoint.pt", which="random")
    assert student_store.resolve() == tmp_path / "stores" / "new-student.h5"
    with stores.open(student_store) as s:
        np.testing.assert_allclose(s.features(), _reference_features(student, images)[0],
                                   atol=1e-5)
    with pytest.raises(CredannoError, match="encoder.which teacher vs student"):
        stores.check_compatible(out, student_store)
    with stores.open(random_store) as s:
        assert s.provenance["encoder"]["which"] == "random"
        assert not np.allclose(s.features(), cls)


def test_timm_weights_files(tiny_patch_file, tmp_path):
    from safetensors.torch import save_file

    model = _tiny_vit(5)
    pt, st = tmp_path / "w.pt", tmp_path / "w.safetensors"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, pt)
    save_file(model.state_dict(), str(st))
    # loaded weights are normalised with the model's own (pretrained_cfg) statistics
    own = EvalTransform(32, 32, mean=tuple(model.pretrained_cfg["mean"]),
                        std=tuple(model.pretrained_cfg["std"]))
    cls, _ = _reference_features(model, read_patch_file(tiny_patch_file).images, own)
    for weights in (pt, st):
        path = embed(tiny_patch_file, encoder=f"timm:{ARCH}", weights=weights,
                     encoder_kwargs=TINY, out=tmp_path / f"{weights.suffix}.h5")
        with stores.open(path) as s:
            np.testing.assert_allclose(s.features(), cls, atol=1e-5)
            assert EvalTransform.from_dict(s.provenance["transform"]) == own
            assert s.provenance["encoder"]["weights_sha256"] == file_sha256(weights)
    small = {**TINY, "embed_dim": 24}
    with pytest.raises(CredannoError, match="do not fit the architecture"):
        build_encoder(f"timm:{ARCH}", weights=st, kwargs=small)
    save_contract_checkpoint(tmp_path / "ck.pt")
    with pytest.raises(CredannoError, match="use|--checkpoint"):
        build_encoder(f"timm:{ARCH}", weights=tmp_path / "ck.pt", kwargs=TINY)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CredannoError, match="cannot read weights"):
        build_encoder(f"timm:{ARCH}", weights=tmp_path / "junk.pt", kwargs=TINY)


def test_non_vit_timm_model_gives_pooled_cls():
    enc = build_encoder("timm:mobilenetv3_small_050", kwargs={})
    assert list(enc.feature_sets) == ["cls"]
    assert enc.transform.crop == 224 and enc.transform.resize == 256  # the paper's 256 -> 224
    assert enc(torch.rand(2, 32, 32))["cls"].shape == (2, enc.feature_sets["cls"])


def test_embed_errors(tiny_patch_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cases = [
        (dict(checkpoint="runs/x", encoder="pixels"), "either --checkpoint or --encoder"),
        (dict(encoder="dino:vits16"), "unknown encoder 'dino:vits16'"),
        (dict(encoder="timm:"), "needs an architecture"),
        (dict(encoder="timm:not_a_model"), "unknown timm architecture"),
        (dict(encoder="pixels", which="student"), "--which student applies to --checkpoint"),
        (dict(encoder="timm:x", weights="w.pt", which="random"), "applies to --checkpoint"),
        (dict(which="best"), "unknown --which"),
        (dict(encoder="pixels", weights="w.pt"), "takes no architecture, weights"),
        (dict(encoder="pixels", batch_size=0), "--batch-size"),
        (dict(encoder="pixels", views=-1), "--views"),
        (dict(), "no pretraining run"),
        (dict(checkpoint="runs/missing"), "no pretraining checkpoint"),
    ]
    for kwargs, match in cases:
        with pytest.raises(CredannoError, match=match):
            embed(tiny_patch_file, **kwargs)
    with pytest.raises(CredannoError, match="patch file .* not found"):
        embed(tmp_path / "none.h5", encoder="pixels")
    if not torch.cuda.is_available():
        with pytest.raises(CredannoError, match="torch sees no GPU"):
            embed(tiny_patch_file, encoder="pixels", device="cuda")
    with pytest.raises(SystemExit) as info:
        main(["embed", "--encoder", "pixels", "--data", str(tiny_patch_file),
              "--encoder-option", "novalue"])
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith("error: --encoder-option 'novalue'")
    assert not (tmp_path / "stores").exists() or not list((tmp_path / "stores").iterdir())


@pytest.mark.parametrize("failure", ["nan", "interrupt"])
def test_failed_embed_leaves_no_store(tiny_patch_file, tmp_path, monkeypatch, failure):
    import credanno.embed as embed_mod

    real = embed_mod._encode_batch
    calls = []

    def broken(enc, images, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            if failure == "interrupt":
                raise KeyboardInterrupt
            return {"cls": torch.full((len(images), 1024), float("nan"))}, None
        return real(enc, images, *a, **k)

    monkeypatch.setattr(embed_mod, "_encode_batch", broken)
    out = tmp_path / "s" / "x.h5"
    with pytest.raises(KeyboardInterrupt if failure == "interrupt" else CredannoError):
        embed(tiny_patch_file, encoder="pixels", out=out, batch_size=40)
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_torchrun_two_processes_equal_single_process(tiny_patch_file, tmp_path):
    common = ["embed", "--encoder", f"timm:{ARCH}", *TINY_OPTS, "--data",
              str(tiny_patch_file), "--batch-size", "25", "--views", "1", "--quiet"]
    single = tmp_path / "single.h5"
    main([*common, "--out", str(single)])
    dist_out = tmp_path / "dist.h5"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",  # picks a free port
         "--nproc_per_node", "2", "-m", "credanno", *common,
         "--out", str(dist_out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("wrote") == 1  # rank 0 alone reports
    with stores.open(single) as a, stores.open(dist_out) as b:
        for kind in a.feature_sets:
            np.testing.assert_array_equal(a.features(kind=kind), b.features(kind=kind))
            np.testing.assert_array_equal(a.views(kind=kind), b.views(kind=kind))
        assert a.table().equals(b.table())
        stores.check_compatible(a, b)
        pa, pb = dict(a.provenance), dict(b.provenance)
        pa.pop("created"), pb.pop("created")
        assert pa == pb
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist.h5", "patches.h5", "single.h5"]
