"""Helpers shared by test modules (import as ``from helpers import ...``)."""

from __future__ import annotations

import pytest

from credanno.cli import main


def cli_error(capsys, args: list[str]) -> str:
    """Run ``credanno ARGS``, expecting exit 2 with exactly one ``error:`` line and no
    traceback (warnings aside); return that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]
