import os

import h5py
import numpy as np
import pytest

from credanno._atomic import atomic_path
from credanno.data.patchfile import read_patch_file, write_patch_file
from credanno.errors import CredannoError
from credanno.labels import LABEL_NAMES, label_spec
from credanno.transforms import EvalTransform


def test_patch_file_round_trip(tiny_patch_file, tiny_table):
    ps = read_patch_file(tiny_patch_file)
    assert ps.images.shape == (len(tiny_table), 32, 32)
    assert ps.images.dtype == np.float32
    assert list(ps.table["patient_id"]) == list(tiny_table["patient_id"])
    for name in LABEL_NAMES:
        np.testing.assert_array_equal(ps.table[name], tiny_table[name])
    assert ps.attrs["source"] == "synthetic"
    assert ps.attrs["schema"] == "credanno.patches"


def test_patch_file_errors(tmp_path, tiny_table):
    with pytest.raises(CredannoError, match="not found"):
        read_patch_file(tmp_path / "nope.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(CredannoError, match="corrupt"):
        read_patch_file(junk)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = 1
    with pytest.raises(CredannoError, match="not a credanno patch file"):
        read_patch_file(foreign)
    imgs = np.zeros((len(tiny_table), 32, 32), np.float32)
    imgs[0, 0, 0] = np.nan
    with pytest.raises(CredannoError, match="NaN"):
        write_patch_file(tmp_path / "nan.h5", imgs, tiny_table)
    assert not (tmp_path / "nan.h5").exists()


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_unknown_label_lists_valid_ones():
    with pytest.raises(CredannoError, match="valid labels: malignancy"):
        label_spec("roundness")


def test_eval_transform_shapes():
    import torch

    x = torch.rand(4, 32, 32)
    paper = EvalTransform(resize=256, crop=224)
    assert paper(x).shape == (4, 3, 224, 224)
    tiny = EvalTransform()
    out = tiny(x)
    assert out.shape == (4, 3, 32, 32)
    torch.testing.assert_close(out[:, 0], (x - tiny.mean) / tiny.std)
    assert EvalTransform.from_dict(paper.to_dict()) == paper


def test_cli_help_is_fast_and_lazy():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c",
                          "import sys; from credanno.cli import main; "
                          "sys.argv=['credanno','--help']; "
                          "import credanno.cli as c; c.cli.main(['--help'], standalone_mode=False);"
                          "print('torch' in sys.modules)"],
                         capture_output=True, text=True, env={**os.environ})
    assert out.returncode == 0
    assert out.stdout.strip().endswith("False")
