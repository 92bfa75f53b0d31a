"""Running the bundles as users do (``python -m monai.bundle run`` in a subprocess) and checking a refusal."""

from __future__ import annotations

import subprocess
import sys

from medsam3_monai.bundle import BUNDLE_CONFIGS


def run_bundle(configs: list[str], *overrides: str, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` of ``configs`` (merged in order) with ``overrides`` (``env``: variables added to
    this process's); output captured."""
    import os

    files = [str(BUNDLE_CONFIGS / name) for name in configs]
    argv = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(files),
            "--meta_file", str(BUNDLE_CONFIGS / "metadata.json"), *overrides]
    return subprocess.run(argv, capture_output=True, text=True, env=None if env is None else {**os.environ, **env})


def assert_refused(result: subprocess.CompletedProcess, expected: str) -> str:
    """An input error's ending: exit 2, no traceback, the last line ``medsam3 bundle: error: ...`` holding
    ``expected``; returns that line."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("medsam3 bundle: error: ") and expected in last, last
    return last
