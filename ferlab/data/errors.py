"""The error and warning types of the data loaders, and the internal signals between their stages."""

from __future__ import annotations

import os


class DataError(ValueError):
    """A data source is missing, of unknown layout or malformed.

    The message names the file and, for a bad CSV row, the 1-based line number (the header is line 1), e.g.
    ``fer2013.csv line 1234: 2303 pixels, expected 2304``. ``path`` and ``line`` hold the same facts.
    """

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None, line: int | None = None):
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.line = line


class DataWarning(UserWarning):
    """Rows were skipped (``skip_bad=True``) or similar data-quality news."""


def _error(path: str | os.PathLike[str], problem: str, line: int | None = None) -> DataError:
    where = f"{path} line {line}" if line is not None else f"{path}"
    return DataError(f"{where}: {problem}", path=path, line=line)


class _RowError(Exception):
    """One CSV row is invalid (internal; becomes a DataError or a skipped row)."""


class _Fallback(Exception):
    """The vectorised fast path cannot vouch for the file: re-read it row by row (internal)."""
