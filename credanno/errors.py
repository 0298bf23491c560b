"""One exception type for every problem a user can fix.

Library code raises :class:`CredannoError` with a one-line message that names the
problem and the fix; the CLI prints that line and exits non-zero, with no traceback.
"""

from __future__ import annotations


class CredannoError(Exception):
    """A user-facing error: bad input, missing file, incompatible artefacts."""

    exit_code: int = 2


class CredannoWarning(UserWarning):
    """A user-facing warning (clamped k, empty class in a subset, skipped scan)."""
