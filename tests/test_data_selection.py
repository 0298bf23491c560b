"""Selection rules and splits on small hand-made annotation groups (no pylidc)."""

import numpy as np
import pandas as pd
import pytest

from credanno.data.selection import (
    AnnotationRecord,
    SelectionParams,
    attribute_label,
    malignancy_label,
    median_rating,
    select_from_groups,
)
from credanno.data.splits import assign_split, unit_draw
from credanno.errors import CredannoError
from credanno.labels import ATTRIBUTE_NAMES, LABEL_NAMES
from credanno.table import validate_table

_next_id = iter(range(1, 100_000))


def group(malignancy, patient="LIDC-IDRI-0001", scan=1, skips=None, **attrs):
    """A nodule: one record per malignancy rating; other ratings default to 3 (or given)."""
    skips = skips or [None] * len(malignancy)
    recs = []
    for i, m in enumerate(malignancy):
        ratings = {n: 3 for n in ATTRIBUTE_NAMES}
        ratings["calcification"] = 6
        for name, values in attrs.items():
            ratings[name] = values[i]
        ratings["malignancy"] = m
        recs.append(AnnotationRecord(annotation_id=next(_next_id), scan_id=scan,
                                     patient_id=patient, ratings=ratings, diameter=5.0 + i,
                                     skip=skips[i]))
    return recs


def test_median_binarisation_and_exclusion():
    assert malignancy_label(2.5) == 0 and malignancy_label(3.5) == 1
    assert malignancy_label(3.0) is None and malignancy_label(float("nan")) is None
    groups = [group([1, 2, 2]), group([2, 3, 3]), group([4, 4, 5]), group([2, 2, 3, 3]),
              group([3, 3, 4, 4]), group([3, 3, 3, 5])]
    table, _ = select_from_groups(groups)
    per_nodule = table.groupby("nodule_id").agg(mal=("malignancy", "first"),
                                                med=("rating_malignancy", "first"))
    # [2,3,3] (median 3) and [3,3,3,5] (median 3) are excluded
    assert sorted(per_nodule["med"].tolist()) == [2.0, 2.5, 3.5, 4.0]
    assert dict(zip(per_nodule["med"], per_nodule["mal"], strict=True)) == {
        2.0: 0, 2.5: 0, 3.5: 1, 4.0: 1}


def test_attribute_rounding_half_to_even_and_zero_based():
    assert attribute_label("subtlety", 2.5) == 1      # 2.5 -> 2 -> class 1
    assert attribute_label("subtlety", 3.5) == 3      # 3.5 -> 4 -> class 3
    assert attribute_label("subtlety", 1.0) == 0
    assert attribute_label("texture", float("nan")) == -1
    g = group([1, 1, 2, 2], subtlety=[2, 2, 3, 3], sphericity=[3, 3, 4, 4],
              calcification=[6, 6, 6, 3])
    table, _ = select_from_groups([g])
    row = table.iloc[0]
    assert row["rating_subtlety"] == 2.5 and row["subtlety"] == 1
    assert row["rating_sphericity"] == 3.5 and row["sphericity"] == 3
    assert row["calcification"] == 5 and row["malignancy"] == 0
    # raw ratings are each annotation's own
    assert table["raw_subtlety"].tolist() == [2, 2, 3, 3]


def test_out_of_scale_rating_is_left_out_of_the_median():
    assert median_rating("internalStructure", [1, 1, 5]) == 1.0
    assert np.isnan(median_rating("internalStructure", [5, 0, None]))


def test_min_annotations_and_one_row_per_annotation():
    groups = [group([1, 1]), group([1, 1, 1]), group([5, 5, 5, 5])]
    table, _ = select_from_groups(groups)
    assert len(table) == 7 and table["nodule_id"].nunique() == 2
    assert (table.groupby("nodule_id")["annotation_id"].min()
            == table.groupby("nodule_id")["nodule_id"].first()).all()
    table, _ = select_from_groups(groups, SelectionParams(min_annotations=2))
    assert len(table) == 9


def test_public_skips_keep_medians_of_all_annotations():
    # the skipped rating still counts: median of [2, 4, 5] is 4 (of the kept [2, 4]: 3)
    g = group([2, 4, 5], skips=[None, None, "larger_than_fov"])
    h = group([1, 1, 1], skips=["single_slice"] * 3)
    table, skipped = select_from_groups([g, h])
    assert len(table) == 2 and table["rating_malignancy"].iloc[0] == 4.0
    assert skipped == {"single_slice": 3, "crop_outside_image": 0, "larger_than_fov": 1}
    table, skipped = select_from_groups([g, h], SelectionParams(public_skips=False))
    assert len(table) == 6 and sum(skipped.values()) == 0


def test_table_types_and_columns():
    table, _ = select_from_groups([group([1, 2, 2]), group([4, 5, 5])])
    table = assign_split(table, "nodule", seed=0)
    validate_table(table)
    for n in LABEL_NAMES:
        assert table[n].dtype == np.int64 and table[f"raw_{n}"].dtype == np.int64
        assert table[f"rating_{n}"].dtype == np.float32
    assert table["image_id"].str.match(r"LIDC-IDRI-0001_s1_ann\d+_n00").all()


def _many_nodules(n_patients=60, per_patient=3):
    groups = [group([1, 1, 1], patient=f"LIDC-IDRI-{p:04d}", scan=p)
              for p in range(n_patients) for _ in range(per_patient)]
    return select_from_groups(groups)[0]


def test_nodule_split_keeps_nodules_whole_and_is_seeded():
    table = _many_nodules()
    a = assign_split(table, "nodule", seed=42)
    assert (a.groupby("nodule_id")["split"].nunique() == 1).all()
    # train rows first
    assert (a["split"].iloc[: (a["split"] == "train").sum()] == "train").all()
    b = assign_split(table, "nodule", seed=42)
    pd.testing.assert_frame_equal(a, b)
    c = assign_split(table, "nodule", seed=7)
    assert not a.set_index("annotation_id")["split"].equals(
        c.set_index("annotation_id").loc[a["annotation_id"], "split"])
    frac = (a.groupby("nodule_id")["split"].first() == "train").mean()
    assert 0.55 < frac < 0.85


def test_patient_split_is_disjoint():
    table = _many_nodules()
    a = assign_split(table, "patient", seed=42)
    train = set(a.loc[a["split"] == "train", "patient_id"])
    test = set(a.loc[a["split"] == "test", "patient_id"])
    assert train and test and not train & test
    # the nodule split puts some patients on both sides
    n = assign_split(table, "nodule", seed=42)
    assert set(n.loc[n["split"] == "train", "patient_id"]) & set(
        n.loc[n["split"] == "test", "patient_id"])


def test_split_draw_does_not_depend_on_other_units():
    table = _many_nodules()
    full = assign_split(table, "nodule", seed=3).set_index("annotation_id")["split"]
    half = table[table["patient_id"] < "LIDC-IDRI-0030"]
    part = assign_split(half, "nodule", seed=3).set_index("annotation_id")["split"]
    assert part.equals(full.loc[part.index])
    assert unit_draw(3, "17") == unit_draw(3, "17") != unit_draw(4, "17")


def test_unknown_split_is_an_error():
    with pytest.raises(CredannoError, match="unknown split 'scan'.*nodule, patient"):
        assign_split(_many_nodules(2, 1), "scan")
