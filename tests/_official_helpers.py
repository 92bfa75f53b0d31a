"""Meta's official SAM3 code (sam3 0.1.4) in its own environment (``make official``): where it is, and a skip with
the way to build it when it is not."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

OFFICIAL_VENV = Path(os.environ.get("MEDSAM3_OFFICIAL_VENV")
                     or Path.home() / ".cache" / "medsam3-monai" / "sam3-official-venv")


def official_python() -> Path:
    """The official environment's Python; the calling test skips, naming ``make official``, when it is not built."""
    python = OFFICIAL_VENV / "bin" / "python"
    if not python.exists():
        pytest.skip(f"the official SAM3 environment is not built at {OFFICIAL_VENV}: run `make official` "
                    "(scripts/setup_official_env.sh) to run this test")
    return python
