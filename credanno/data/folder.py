"""The ``folder`` source: import the layout the original cRedAnno code writes.

Layout (``extract_LIDC_IDRI_nodules.py`` of the public code)::

    FOLDER/Image/{train,val}/{0,1}/<img_id>.png     # 0 benign, 1 malignant
    FOLDER/meta_train.csv, FOLDER/meta_val.csv      # first column: img_id

``img_id`` is ``<patient>_s<scan id>_ann<annotation id>_n<nodule index>``; the CSV
columns are ``id, scan_id`` and the nine ratings, ``diameter, coords``. The public
files hold the nodule's *median* malignancy (e.g. 3.5) and, depending on the code
version, either each annotation's own attribute ratings or the nodule medians. We
therefore do what the public data loader does: group rows by nodule (patient + nodule
index from the image id), take the median of each rating over the nodule's rows, round
(halves to even) and subtract one for attribute labels; malignancy is the class folder
(checked against the median: < 3 must be in 0/, > 3 in 1/). ``val`` becomes ``test``.
Image ids are file contents: one that is absolute, holds a ``..`` component, or resolves
(through symbolic links too) outside the folder is refused, so that a CSV cannot import
files from elsewhere on the disk.
``raw_<label>`` keeps the CSV value when the column varies within a nodule (so it is the
annotation's own rating) and is 0 (unknown) when it is a nodule-level value.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from credanno.data.resample import resize_patch
from credanno.data.selection import attribute_label, valid_rating
from credanno.data.sources import PatchBatch, PrepareOptions, register_source
from credanno.errors import CredannoError
from credanno.labels import ATTRIBUTE_NAMES, LABEL_NAMES
from credanno.outputs import one_line

#: Folder split name -> table split name.
SPLITS = {"train": "train", "val": "test"}
META_COLUMNS = ("id", "scan_id", *ATTRIBUTE_NAMES, "malignancy", "diameter")
IMAGE_ID = re.compile(r"^(?P<patient>.+)_s(?P<scan>\d+)_ann(?P<ann>\d+)_n(?P<nodule>\d+)$")


def read_meta(path: Path) -> pd.DataFrame:
    """One meta CSV, index = image id; errors name the missing file or columns."""
    if not path.is_file():
        raise CredannoError(f"{path} not found; the folder source needs meta_train.csv and "
                            "meta_val.csv beside Image/ (pass the right --folder)")
    try:
        meta = pd.read_csv(path, index_col=0)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise CredannoError(f"{path} is not a readable CSV ({exc}); "
                            "re-export it from the cRedAnno code") from None
    missing = [c for c in META_COLUMNS if c not in meta.columns]
    if missing:
        raise CredannoError(f"{path} lacks columns {missing}; it needs {list(META_COLUMNS)}")
    meta.index = meta.index.astype(str)
    return meta


def read_png(path: Path, size: int) -> np.ndarray:
    """A grey PNG in [0, 1] (RGB averaged), resized to ``size x size`` if needed."""
    from matplotlib import image as mpimg  # imported here: only this source needs it

    img = mpimg.imread(path)
    if img.dtype != np.float32 or img.max() > 1.0:
        img = img / float(np.iinfo(img.dtype).max if img.dtype.kind in "ui" else 1.0)
    if img.ndim == 3:
        img = img[..., :3].mean(-1)
    return np.clip(resize_patch(img, size), 0.0, 1.0)


def image_path(root: Path, folder_split: str, cls: int, img_id: str, line: int) -> Path:
    """The PNG of ``img_id`` in class folder ``cls`` of ``root`` (a resolved path); an id
    that would leave ``root`` (absolute, ``..``, or a symbolic link pointing out) is an
    error naming its CSV line."""
    parts = re.split(r"[/\\]", img_id)
    where = f"meta_{folder_split}.csv line {line} (image id {one_line(img_id)!r})"
    if Path(img_id).is_absolute() or img_id[:1] in ("/", "\\") or ".." in parts:
        raise CredannoError(f"{where} is an absolute path or holds '..'; image ids must name "
                            f"files inside Image/{folder_split}/{{0,1}}/ of the folder")
    path = root / "Image" / folder_split / str(cls) / f"{img_id}.png"
    if path.exists() and not path.resolve().is_relative_to(root):
        raise CredannoError(f"{where}: {path} resolves to {path.resolve()}, outside the "
                            "folder (a symbolic link?); copy the image into the folder")
    return path


def folder_table(meta: pd.DataFrame, classes: dict[str, int], split: str) -> pd.DataFrame:
    """Table rows for one split: nodule medians, labels, raw ratings, ids."""
    parts = meta.index.to_series().str.extract(IMAGE_ID)
    bad = parts.index[parts["patient"].isna()].tolist()
    if bad:
        raise CredannoError(
            f"image ids {bad[:3]} do not read <patient>_s<scan>_ann<annotation>_n<nodule>; "
            "keep the names the cRedAnno code wrote")
    df = pd.DataFrame({"image_id": meta.index, "annotation_id": meta["id"].astype(np.int64),
                       "scan_id": meta["scan_id"].astype(np.int64),
                       "patient_id": parts["patient"].to_numpy(),
                       "nodule_index": parts["nodule"].astype(np.int64).to_numpy()})
    df["_nodule"] = df["patient_id"] + "/" + df["nodule_index"].astype(str)
    df["nodule_id"] = df.groupby("_nodule")["annotation_id"].transform("min")
    medians = meta[list(LABEL_NAMES)].groupby(df["_nodule"].to_numpy()).transform("median")
    varies = meta[list(LABEL_NAMES)].groupby(df["_nodule"].to_numpy()).transform("nunique") > 1
    per_annotation = {"malignancy": bool(varies["malignancy"].any())}
    per_annotation.update({n: bool(varies[list(ATTRIBUTE_NAMES)].any().any())
                           for n in ATTRIBUTE_NAMES})
    df["malignancy"] = [classes[i] for i in df["image_id"]]
    wrong = df["image_id"][(medians["malignancy"].to_numpy() < 3) != (df["malignancy"] == 0)]
    if len(wrong):
        raise CredannoError(
            f"{len(wrong)} images sit in a class folder that disagrees with their median "
            f"malignancy (e.g. {wrong.iloc[0]}); check the folder's 0/ and 1/ contents")
    for n in ATTRIBUTE_NAMES:
        df[n] = [attribute_label(n, float(m)) for m in medians[n]]
    for n in LABEL_NAMES:
        df[f"rating_{n}"] = medians[n].to_numpy(np.float32)
    for n in LABEL_NAMES:
        values = meta[n].to_numpy()
        df[f"raw_{n}"] = [int(v) if per_annotation[n] and valid_rating(n, v) else 0
                          for v in values]
    df["diameter"] = meta["diameter"].to_numpy(np.float32)
    df["split"] = split
    return df.drop(columns="_nodule")


@register_source("folder")
class FolderSource:
    def build(self, options: PrepareOptions) -> PatchBatch:
        if options.folder is None:
            raise CredannoError("the folder source needs --folder DIR (the cRedAnno "
                                "dataset folder holding Image/ and meta_*.csv)")
        if options.split != "nodule":
            raise CredannoError("the folder source keeps the folder's own train/val split; "
                                "drop --split")
        root = Path(options.folder).expanduser()
        if not root.is_dir():
            raise CredannoError(f"--folder {root} is not a directory; pass the cRedAnno "
                                "dataset folder holding Image/ and meta_*.csv")
        root = root.resolve()  # image paths must stay inside it (see image_path)
        size = options.selection.patch_size
        tables, images = [], []
        for folder_split, split in SPLITS.items():
            meta = read_meta(root / f"meta_{folder_split}.csv")
            classes, paths, missing = {}, [], []
            # line 1 of the CSV is its header
            for line, img_id in enumerate(meta.index, start=2):
                candidates = [image_path(root, folder_split, c, img_id, line) for c in (0, 1)]
                found = [c for c, p in zip((0, 1), candidates, strict=True) if p.is_file()]
                if not found:
                    missing.append(img_id)
                    continue
                classes[img_id] = found[0]
                paths.append(candidates[found[0]])
            if missing:
                raise CredannoError(
                    f"{len(missing)} images listed in meta_{folder_split}.csv are missing "
                    f"from Image/{folder_split}/{{0,1}}/ (e.g. {missing[0]}.png); "
                    "copy them or remove their rows")
            tables.append(folder_table(meta, classes, split))
            images.extend(read_png(p, size) for p in tqdm(
                paths, desc=f"reading {folder_split} PNGs", disable=not options.progress))
        table = pd.concat(tables, ignore_index=True)
        stack = (np.stack(images) if images else np.zeros((0, size, size))).astype(np.float32)
        attrs = {"source": "folder", "folder": str(root), "split": "folder",
                 "intensity": "as stored (the public code's per-patch min-max)"}
        return PatchBatch(images=stack, table=table, attrs=attrs, skipped={})
