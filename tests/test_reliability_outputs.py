"""Strings from files stay data: CSV cells cannot run as spreadsheet formulas, Markdown and
one-line outputs escape them, and folder import cannot reach outside its folder."""

import csv
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from matplotlib import image as mpimg

from credanno import stores
from credanno.errors import CredannoError
from credanno.outputs import md_code, md_text, one_line, write_csv, write_json
from credanno.synthetic import synthetic_features, synthetic_images, synthetic_table

pytestmark = [pytest.mark.filterwarnings("ignore::credanno.errors.CredannoWarning"),
              pytest.mark.usefixtures("one_torch_thread")]

EVIL = "<script>alert(1)</script>\n# injected"
FORMULAS = ["=HYPERLINK(\"http://x\")", "+1+1", "-2+3", "@SUM(A1)", "\tTAB", "\rCR"]


def _cells(path: Path, column: str) -> list[str]:
    """The raw text of one CSV column, as a spreadsheet would read it."""
    with open(path, newline="") as f:
        return [row[column] for row in csv.DictReader(f)]


# -- CSV formula neutralisation -------------------------------------------------------------

def test_write_csv_neutralises_formulas_and_keeps_numbers(tmp_path):
    df = pd.DataFrame({"patient_id": [*FORMULAS, "LIDC-IDRI-0001"],
                       "value": [-1.5, -2.0, 0.0, 3.25, -0.125, 7.0, -9.5],
                       "count": [-1, 2, 3, 4, 5, 6, 7]})
    out = write_csv(df, tmp_path / "t.csv", index=False)
    assert out == tmp_path / "t.csv"
    ids = _cells(out, "patient_id")
    # a carriage return, which the CSV writer leaves unquoted, becomes a (quoted) newline
    assert ids[:-1] == ["'" + f.replace("\r", "\n") for f in FORMULAS]
    assert ids[-1] == "LIDC-IDRI-0001"                 # a '-' inside is harmless
    back = pd.read_csv(out)
    assert back["value"].dtype == np.float64 and back["value"].tolist() == df["value"].tolist()
    assert back["count"].tolist() == df["count"].tolist()
    assert _cells(out, "value")[0] == "-1.5"           # negative numbers are not quoted
    assert df["patient_id"].iloc[0].startswith("=")     # the caller's frame is untouched
    assert not list(tmp_path.glob(".*.part"))


def test_carriage_return_cannot_start_a_row(tmp_path):
    out = write_csv(pd.DataFrame({"id": ["x\r=cmd()", "y\r\n@z"], "v": [1, 2]}),
                    tmp_path / "t.csv", index=False)
    raw = out.read_bytes()
    assert b"\r" not in raw and raw.count(b"\n") == 5      # header, 2 rows, 2 in cells
    assert _cells(out, "id") == ["x\n=cmd()", "y\n@z"]     # inside quoted cells


def test_write_json_is_atomic_and_strict(tmp_path):
    path = write_json({"a": [1, 2]}, tmp_path / "x.json")
    assert path.read_text() == '{\n  "a": [\n    1,\n    2\n  ]\n}\n'
    with pytest.raises(ValueError):
        write_json({"a": float("nan")}, tmp_path / "y.json")
    assert not (tmp_path / "y.json").exists() and not list(tmp_path.glob(".*.part"))


def _formula_store(path: Path) -> Path:
    table = synthetic_table(n_nodules=30, per_nodule=2, seed=0)
    # one formula-like patient id per nodule family, so that test rows carry them too
    table["patient_id"] = [FORMULAS[i % len(FORMULAS)] + f"P{i}"
                           for i in table["nodule_id"].to_numpy()]
    return stores.save(path, features={"cls": synthetic_features(table, dim=8)}, table=table,
                       provenance={"encoder": {"kind": "synthetic"}})


def test_knn_predictions_csv_neutralises_patient_ids(tmp_path):
    from credanno.cli import cli

    store = _formula_store(tmp_path / "s.h5")
    pred, rec = tmp_path / "pred.csv", tmp_path / "rec.csv"
    res = CliRunner().invoke(cli, ["knn", "--store", str(store), "--k", "3", "--n-seeds", "1",
                                   "--labels", "malignancy", "--predictions", str(pred),
                                   "--csv", str(rec)])
    assert res.exit_code == 0, res.output
    ids = _cells(pred, "patient_id")
    assert ids and all(i.startswith("'") for i in ids)
    assert {"=", "+", "-", "@"} <= {i[1] for i in ids} <= {"=", "+", "-", "@", "\t", "\n"}
    # the numbers around them stay numbers
    assert pd.read_csv(pred)["malignancy_p0"].dtype == np.float64
    assert pd.read_csv(rec)["acc"].dtype == np.float64


# -- Markdown / one-line escaping -----------------------------------------------------------

def test_md_helpers():
    assert md_text(EVIL) == "&lt;script&gt;alert(1)&lt;/script&gt; # injected"
    assert md_text("# a_b*c|d [x](y) `z` $m$") == r"\# a\_b\*c\|d \[x\](y) \`z\` \$m\$"
    assert md_text("a\\b") == "a\\\\b"
    assert one_line("a\r\nb\x1b[31mc\u2028d") == "a b [31mc d"
    assert md_code("runs/x") == "`runs/x`"
    assert md_code("a`b\nc") == "``a`b c``"


def _evil_store(tmp_path: Path) -> Path:
    table = synthetic_table(n_nodules=30, per_nodule=2, seed=0)
    return stores.save(tmp_path / "evil.h5", features={"cls": synthetic_features(table, dim=8)},
                       table=table, provenance={"data": {"source": EVIL}})


def _assert_escaped(text: str) -> None:
    assert "<script>" not in text and "</script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    # the newline in the attribute did not start a line (no injected heading)
    assert not any(line.lstrip().startswith("# injected") for line in text.splitlines())
    for line in text.splitlines():
        if "injected" in line:
            assert "&lt;script&gt;" in line


def test_describe_source_escapes_store_and_patch_file_source(tmp_path):
    from credanno.data.patchfile import write_patch_file
    from credanno.viz.source import describe_source

    d = describe_source({"data": {"source": EVIL}})
    assert d.text == "&lt;script&gt;alert(1)&lt;/script&gt; # injected data"
    assert "\n" not in d.kind and not d.is_real
    # the patch file's own attribute, read when the provenance only names the file
    table = synthetic_table(n_nodules=10, per_nodule=2, seed=0)
    patch = write_patch_file(tmp_path / "p.h5", synthetic_images(table), table,
                             {"source": EVIL})
    assert describe_source({"data": {"path": str(patch)}}).text == d.text


def test_table1_data_line_is_one_escaped_line(tmp_path):
    from credanno.bench.table1 import Table1Config, run_table1

    store = _evil_store(tmp_path)
    t1 = run_table1(store, seeds=(0,), configs=(Table1Config("full", "5-NN", "knn", 1.0, 5),))
    header = t1.header()
    assert header.startswith("Data: &lt;script&gt;") and "\n" not in header
    _assert_escaped(header)
    assert f"Store: `{store}`." in header


def test_demo_report_escapes_file_strings(tmp_path):
    from credanno.bench.fig2 import fig2_from_table1
    from credanno.bench.fig4 import Fig4Result
    from credanno.bench.table1 import Table1Config, run_table1
    from credanno.demo.report import ReportInputs, report_text

    store = _evil_store(tmp_path)
    t1 = run_table1(store, seeds=(0,), configs=(Table1Config("full", "5-NN", "knn", 1.0, 5),))
    f2 = fig2_from_table1(t1, paper=False)
    f4 = Fig4Result(raw=pd.DataFrame({"series": ["ours: 5-NN"], "frac": [1.0], "seed": [0],
                                      "acc": [0.5], "n_labelled": [10]}),
                    data=t1.data, store=Path("we_ird*store.h5"))
    out = tmp_path / "demo"
    figures = {k: out / "figures" / f"{k}.png" for k in ("tsne", "tsne_compare", "fig2",
                                                         "fig4")}
    cfg = SimpleNamespace(preset="cpu-tiny", arch="vit_tiny", model_kwargs={}, epochs=1)
    run = SimpleNamespace(run_dir=out / "runs" / "demo", metrics=[])
    text = report_text(ReportInputs(
        out=out, t1={"teacher": t1}, f2=f2, f4=f4, figures=figures, cfg=cfg, run=run,
        patch=tmp_path / "pa`tch.h5", seeds=[0], timings={"prepare (given patch file)": 1.0},
        reused={}, notes=["prepare: <b>bold</b>\n# not a heading"]))
    _assert_escaped(text)
    assert "<b>" not in text and "- prepare: &lt;b&gt;bold&lt;/b&gt; # not a heading" in text
    assert f"Patch file: ``{tmp_path / 'pa`tch.h5'}``" in text
    assert r"Store we\_ird\*store.h5;" in text
    # the report's own title is its only top-level heading
    assert [ln for ln in text.splitlines() if ln.startswith("# ")] == ["# credanno demo report"]


# -- folder import stays inside its folder --------------------------------------------------

def _folder_with_id(tmp_path: Path, img_id: str, target: Path | None = None) -> Path:
    """The test_data_folder layout plus one extra train row naming ``img_id``; the image
    that id points at is written (at ``target`` when given), so only the check stops it."""
    from test_data_folder import make_folder

    root = make_folder(tmp_path / "ds")
    meta = pd.read_csv(root / "meta_train.csv")
    row = meta.iloc[0].copy()
    row.iloc[0], row["id"] = img_id, 999.0
    meta = pd.concat([meta, row.to_frame().T], ignore_index=True)
    meta.to_csv(root / "meta_train.csv", index=False)
    dest = target or root / "Image" / "train" / "0" / f"{img_id}.png"
    dest.parent.mkdir(parents=True, exist_ok=True)
    mpimg.imsave(dest, np.full((32, 32), 0.5), cmap="gray", vmin=0, vmax=1)
    return root


@pytest.mark.parametrize("how", ["dotdot", "absolute"])
def test_folder_refuses_ids_leaving_the_folder(tmp_path, how):
    from credanno.data import prepare

    outside = tmp_path / "secret_s9_ann999_n00.png"
    img_id = ("../../../../secret_s9_ann999_n00" if how == "dotdot"
              else str(outside.with_suffix("")))
    root = _folder_with_id(tmp_path, img_id, target=outside)
    assert (root / "Image" / "train" / "0" / f"{img_id}.png").resolve() == outside.resolve()
    with pytest.raises(CredannoError) as exc:
        prepare(source="folder", folder=root, out=tmp_path / "x.h5")
    msg = str(exc.value)
    assert "\n" not in msg and "meta_train.csv line 9" in msg and img_id in msg
    assert "absolute path or holds '..'" in msg
    assert not (tmp_path / "x.h5").exists()


def test_folder_refuses_symlink_out_of_the_folder(tmp_path):
    from credanno.data import prepare

    img_id = "LIDC-IDRI-0009_s9_ann999_n00"
    outside = tmp_path / "elsewhere.png"
    root = _folder_with_id(tmp_path, img_id, target=outside)
    link = root / "Image" / "train" / "0" / f"{img_id}.png"
    os.symlink(outside, link)
    with pytest.raises(CredannoError, match=r"meta_train.csv line 9 .*outside the folder"):
        prepare(source="folder", folder=root, out=tmp_path / "x.h5")
    # a link that stays inside the folder is fine
    link.unlink()
    os.symlink(next((root / "Image" / "train" / "0").glob("LIDC-IDRI-0001*.png")), link)
    prepare(source="folder", folder=root, out=tmp_path / "x.h5")
    assert (tmp_path / "x.h5").exists()
