"""Import of the original cRedAnno folder layout (Image/{train,val}/{0,1}/*.png + meta CSVs)."""

import numpy as np
import pandas as pd
import pytest
from matplotlib import image as mpimg

from credanno.data import prepare, read_patch_file
from credanno.errors import CredannoError
from credanno.labels import ATTRIBUTE_NAMES
from credanno.table import validate_table

# (split, patient, scan, nodule index, median malignancy, per-annotation subtlety)
NODULES = [("train", "LIDC-IDRI-0001", 1, 0, 2.0, [2, 3, 3]),
           ("train", "LIDC-IDRI-0002", 2, 3, 4.5, [4, 5, 5, 4]),
           ("val", "LIDC-IDRI-0003", 3, 1, 1.5, [2, 2, 3, 3])]


def make_folder(root, attributes_as_medians=False):
    rows = {"train": [], "val": []}
    ann = 100
    for split, pid, scan, nidx, mal, subtlety in NODULES:
        cls = 0 if mal < 3 else 1
        folder = root / "Image" / split / str(cls)
        folder.mkdir(parents=True, exist_ok=True)
        for s in subtlety:
            ann += 1
            img_id = f"{pid}_s{scan}_ann{ann}_n{nidx:02d}"
            img = np.full((32, 32), 0.2)
            img[10:22, 10:22] = ann / 200
            mpimg.imsave(folder / f"{img_id}.png", img, cmap="gray", vmin=0, vmax=1)
            row = {"": img_id, "id": float(ann), "scan_id": float(scan)}
            row.update({n: 1.0 for n in ATTRIBUTE_NAMES})
            row["subtlety"] = float(np.median(subtlety) if attributes_as_medians else s)
            row.update({"malignancy": mal, "diameter": 5.5,
                        "coords": "[0.5, 0.5, 0.5]"})
            rows[split].append(row)
    for split, r in rows.items():
        pd.DataFrame(r).to_csv(root / f"meta_{split}.csv", index=False)
    return root


def test_folder_import(tmp_path):
    root = make_folder(tmp_path / "ds")
    res = prepare(source="folder", folder=root, out=tmp_path / "f.h5")
    ps = read_patch_file(res.path)
    t = ps.table
    validate_table(t)
    assert ps.images.shape == (11, 32, 32) and ps.attrs["source"] == "folder"
    assert t["split"].tolist() == ["train"] * 7 + ["test"] * 4
    assert res.summary.loc["train", "nodules"] == 2 and res.summary.loc["test", "benign"] == 1
    first = t[t["patient_id"] == "LIDC-IDRI-0001"]
    # subtlety [2, 3, 3]: median 3 -> class 2; raw kept (it varies within the nodule)
    assert (first["rating_subtlety"] == 3).all() and (first["subtlety"] == 2).all()
    assert first["raw_subtlety"].tolist() == [2, 3, 3]
    second = t[t["patient_id"] == "LIDC-IDRI-0002"]
    # [4, 5, 5, 4]: median 4.5 rounds half to even -> 4 -> class 3; malignancy from 1/
    assert (second["subtlety"] == 3).all() and (second["malignancy"] == 1).all()
    # malignancy in the CSV is the nodule median: no per-annotation raw value
    assert (t["raw_malignancy"] == 0).all()
    val = t[t["split"] == "test"]
    assert (val["subtlety"] == 1).all() and (val["nodule_id"] == val["annotation_id"].min()).all()
    assert t["image_id"].iloc[0] == "LIDC-IDRI-0001_s1_ann101_n00"
    # pixel values survive the PNG round trip
    assert ps.images[0, 16, 16] == pytest.approx(101 / 200, abs=0.01)
    assert ps.images[0, 0, 0] == pytest.approx(0.2, abs=0.01)


def test_folder_with_median_attributes(tmp_path):
    root = make_folder(tmp_path / "ds", attributes_as_medians=True)
    t = read_patch_file(prepare(source="folder", folder=root, out=tmp_path / "f.h5").path,
                        images=False).table
    assert (t["raw_subtlety"] == 0).all()     # a nodule-level column: raw unknown
    assert t.loc[t["patient_id"] == "LIDC-IDRI-0002", "subtlety"].eq(3).all()


def test_folder_bad_inputs(tmp_path):
    with pytest.raises(CredannoError, match="--folder DIR"):
        prepare(source="folder", out=tmp_path / "x.h5")
    with pytest.raises(CredannoError, match="is not a directory"):
        prepare(source="folder", folder=tmp_path / "nope", out=tmp_path / "x.h5")
    root = make_folder(tmp_path / "ds")
    with pytest.raises(CredannoError, match="drop --split"):
        prepare(source="folder", folder=root, split="patient", out=tmp_path / "x.h5")

    meta = pd.read_csv(root / "meta_val.csv")
    meta.drop(columns=["texture", "diameter"]).to_csv(root / "meta_val.csv", index=False)
    with pytest.raises(CredannoError, match=r"meta_val.csv lacks columns \['texture', "
                                            r"'diameter'\]"):
        prepare(source="folder", folder=root, out=tmp_path / "x.h5")
    meta.to_csv(root / "meta_val.csv", index=False)

    png = next((root / "Image" / "train" / "1").glob("*.png"))
    png.unlink()
    with pytest.raises(CredannoError, match=rf"1 images listed in meta_train.csv are missing"
                                            rf".*{png.stem}"):
        prepare(source="folder", folder=root, out=tmp_path / "x.h5")

    (root / "meta_train.csv").unlink()
    with pytest.raises(CredannoError, match="meta_train.csv not found"):
        prepare(source="folder", folder=root, out=tmp_path / "x.h5")
    assert not (tmp_path / "x.h5").exists()


def test_folder_class_disagreeing_with_median_is_an_error(tmp_path):
    root = make_folder(tmp_path / "ds")
    src = next((root / "Image" / "val" / "0").glob("*.png"))
    (root / "Image" / "val" / "1").mkdir()
    src.rename(root / "Image" / "val" / "1" / src.name)
    with pytest.raises(CredannoError, match="disagrees with their median malignancy"):
        prepare(source="folder", folder=root, out=tmp_path / "x.h5")
