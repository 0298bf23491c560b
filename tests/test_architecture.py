"""Facts about where things live (docs/architecture.md), checked on the source itself."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "credanno"


def _imports(path: Path) -> set[str]:
    """Top-level module names imported anywhere in ``path`` (also inside functions)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def _h5py_allowed(rel: Path) -> bool:
    return rel.parts[0] == "stores" or rel == Path("data/patchfile.py")


def test_h5py_only_behind_the_storage_seam():
    """HDF5 is one backend: only credanno/stores/ and the patch file module speak it."""
    offenders = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                       if "h5py" in _imports(p) and not _h5py_allowed(p.relative_to(PACKAGE)))
    assert offenders == []


def test_table_and_cache_are_backend_free():
    for name in ("table.py", "cache.py"):
        assert not _imports(PACKAGE / name) & {"h5py", "zarr", "tables"}, name


def test_one_cache_module():
    """Every cache goes through credanno.cache: nothing else finds the cache folder."""
    assert not (PACKAGE / "data" / "cache.py").exists()
    users = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                   if "cache_dir" in p.read_text())
    assert users == ["cache.py", "paths.py"]


def test_cli_lists_choices_from_the_registries():
    """prepare's --source/--split/--intensity come from the registries, not a copied list."""
    from click.testing import CliRunner

    from credanno.cli import cli
    from credanno.data.intensity import intensity_names, register_intensity
    from credanno.data.sources import source_names
    from credanno.data.splits import split_names

    help_text = CliRunner().invoke(cli, ["prepare", "--help"]).output
    for names in (source_names(), split_names(), intensity_names()):
        assert f"[{'|'.join(names)}]" in help_text.replace("\n", "").replace(" ", "")

    @register_intensity("test-only-mode")
    def _mode(hu):  # a registered extension shows up in the CLI at once
        return hu

    try:
        result = CliRunner().invoke(cli, ["prepare", "--intensity", "nope"])
        assert result.exit_code != 0 and "test-only-mode" in result.output
    finally:
        from credanno.data import intensity

        intensity._MODES.pop("test-only-mode")
