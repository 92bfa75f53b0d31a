#!/usr/bin/env bash
# Build (or refresh) the project's virtual environment and install medsam3-monai into it.
# Usage: scripts/setup_env.sh [VENV_DIR]   (default: $MEDSAM3_VENV or ~/.cache/medsam3-monai/venv)
# The environment lives outside the clone so CI and fresh clones can reuse it; it is rebuilt when
# missing or broken, and dependencies are re-resolved whenever pyproject.toml changes.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-${MEDSAM3_VENV:-$HOME/.cache/medsam3-monai/venv}}"
python="${PYTHON:-python3.11}"
stamp="$venv/.medsam3-deps"
want="$(sha256sum "$here/pyproject.toml" | cut -d' ' -f1)"

if ! "$venv/bin/python" -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "[setup_env] creating virtual environment at $venv"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip setuptools wheel
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup_env] installing dependencies (torch 2.14.1 + torchvision 0.29.1, CPU use)"
  "$venv/bin/pip" install --quiet -e "$here[test]"
  echo "$want" > "$stamp"
fi
# The editable install points at this clone; refresh it cheaply when the clone moved.
if ! (cd / && "$venv/bin/python" - "$here") <<'PY' >/dev/null 2>&1  # from / : the cwd must not shadow the install
import pathlib, sys
import medsam3_monai
sys.exit(0 if pathlib.Path(medsam3_monai.__file__).resolve().parent.parent == pathlib.Path(sys.argv[1]).resolve() else 1)
PY
then
  "$venv/bin/pip" install --quiet --no-deps --no-build-isolation -e "$here"
fi
# The MONAI Label client, for tests only (tests/test_monailabel_client.py drives `medsam3 serve` with it).
# --no-deps: monailabel's own pins would downgrade numpy and jsonschema; the client needs only requests.
if ! "$venv/bin/python" -c "import monailabel" >/dev/null 2>&1; then
  "$venv/bin/pip" install --quiet --no-deps monailabel==0.8.5
fi
echo "[setup_env] ready: $venv (to call medsam3 yourself: source $venv/bin/activate)"
