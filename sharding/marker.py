"""The file a synthetic dataset declares itself with: ``<root>/dfdam_synthetic.json``.

:mod:`sharding.synthetic` writes it (generator, layout, seed, sizes, and the image count of
every split); :mod:`sharding.write` reads it to check each split's count against the
declared one instead of the official count of the full release. Standard library only, so
that reading it does not load the generator.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MARKER = "dfdam_synthetic.json"


def read_marker(root: Path | str) -> dict[str, Any] | None:
    """The synthetic marker of a dataset root, or ``None`` for a real dataset."""
    path = Path(root) / MARKER
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: unreadable synthetic marker ({exc}); delete it or regenerate the data") from None
