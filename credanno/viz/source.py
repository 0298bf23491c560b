"""What data a store was computed from, stated on every figure and table.

The phantom patches are simulated, so that no figure made from them can be mistaken for a
real-CT result, every output names its source, read from the store's provenance (the
patch file's ``source`` attribute) or, failing that, from the patch file itself.
That attribute is file contents: an unknown one is shown escaped, on one line
(:func:`credanno.outputs.md_text`), since ``Data:`` lines go to terminals, Markdown and
figure captions.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from credanno.outputs import md_text, one_line

#: source attribute -> how figures and tables describe it
SOURCE_WORDS: dict[str, str] = {
    "phantom": "PHANTOM data (simulated nodule patches, not real CT)",
    "synthetic": "SYNTHETIC test data (not CT)",
    "lidc": "real LIDC-IDRI CT",
    "folder": "user-supplied patch folder",
}

#: provenance keys that may name the patch file's source directly, or nest it
_SOURCE_KEYS = ("source", "data_source", "patch_source")
_NESTED_KEYS = ("data", "patch_file", "patches", "patch", "input")
_PATH_KEYS = ("path", "patch_file", "patch_path", "data_path", "data", "file")


@dataclass(frozen=True)
class DataSource:
    """``kind``: phantom | synthetic | lidc | folder | unknown | another source name (one
    line); ``text``: for captions and ``Data:`` lines, safe in Markdown and on one line."""

    kind: str
    text: str

    @property
    def is_real(self) -> bool:
        return self.kind == "lidc"


def _maybe_json(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _find_source(prov: dict[str, Any]) -> str | None:
    for key in _SOURCE_KEYS:
        if isinstance(prov.get(key), str) and prov[key]:
            return prov[key]
    for key in _NESTED_KEYS:
        sub = _maybe_json(prov.get(key))
        if isinstance(sub, dict):
            found = _find_source(sub)
            if found:
                return found
    return None


def _patch_paths(prov: dict[str, Any]) -> list[Path]:
    found = []
    for key in _PATH_KEYS:
        value = _maybe_json(prov.get(key))
        if isinstance(value, str) and value.endswith((".h5", ".hdf5")):
            found.append(Path(value))
        elif isinstance(value, dict):
            found.extend(_patch_paths(value))
    return found


def _candidates(prov: dict[str, Any], store: str | os.PathLike | None) -> list[Path]:
    """Patch-file paths named by the provenance, as given and, for relative ones (written
    relative to the working directory of `credanno embed`), beside the store's folders."""
    out = []
    for path in _patch_paths(prov):
        out.append(path)
        if store is not None and not path.is_absolute():
            parent = Path(store).resolve().parent
            out += [parent / path, parent.parent / path]
    return out


def describe_source(provenance: dict[str, Any],
                    store: str | os.PathLike | None = None) -> DataSource:
    """Name the data a store (or patch file) was computed from.

    ``store``: the store's path, to find a patch file named relative to its folders.
    """
    prov = {k: _maybe_json(v) for k, v in dict(provenance).items()}
    kind = _find_source(prov)
    if kind is None:
        from credanno.data.patchfile import read_patch_file
        from credanno.errors import CredannoError

        for path in _candidates(prov, store):
            if path.exists():
                try:
                    kind = read_patch_file(path, images=False).attrs.get("source")
                except CredannoError:
                    continue
                if kind:
                    break
    kind = one_line(kind).lower() if kind is not None else ""
    if not kind:
        return DataSource("unknown", "data of unknown source (provenance does not say)")
    return DataSource(kind, SOURCE_WORDS.get(kind, f"{md_text(kind)} data"))


def patch_file_of(provenance: dict[str, Any],
                  store: str | os.PathLike | None = None) -> Path | None:
    """The patch file a store was embedded from, if its provenance names one that exists."""
    prov = {k: _maybe_json(v) for k, v in dict(provenance).items()}
    for path in _candidates(prov, store):
        if path.exists():
            return path
    return None
