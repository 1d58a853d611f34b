"""One entry point to data: a path in any supported layout, or the embedded synthetic faces."""

from __future__ import annotations

from typing import Any

from ferlab.data.types import FerData


def open_data(
    path: str | None, *, skip_bad: bool = False, synthetic: dict[str, Any] | None = None, progress: bool = True
) -> FerData:
    """Load ``path`` (see :func:`ferlab.data.formats.load_data`); ``None`` gives the embedded synthetic set."""
    if path is None:
        from ferlab.data.synthetic import make_synthetic

        return make_synthetic(**(synthetic or {}))
    from ferlab.data.formats import load_data

    return load_data(path, skip_bad=skip_bad, progress=progress)
