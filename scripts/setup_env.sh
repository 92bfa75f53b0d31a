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

# shellcheck source=scripts/venv_common.sh
source "$here/scripts/venv_common.sh"

# isolated (-I, from /): a torch/ in the caller's folder or PYTHONPATH must not decide
if ! (cd / && "$venv/bin/python" -I -c "import torch, torchvision") >/dev/null 2>&1; then
  require_python "$python" setup_env
  new_venv "$venv" "$python" setup_env
  echo "[setup_env] creating virtual environment at $venv"
  "$venv/bin/pip" install --quiet --upgrade pip setuptools wheel
fi
# A venv whose stamp matches can still have lost or changed a dependency since (a `pip install` or `pip uninstall`
# by hand, an interrupted upgrade): check every requirement of the installed package (`pip check` itself stops on
# itk 5.4.7's malformed WHEEL tag) and re-resolve when one is missing or of another version.
if [ -f "$stamp" ] && ! (cd / && "$venv/bin/python") <<'PY' >&2
import sys
from importlib import metadata
from packaging.requirements import Requirement
try:
    wanted = metadata.requires("medsam3-monai") or []
except metadata.PackageNotFoundError:
    sys.exit("[setup_env] medsam3-monai is not installed in this environment: reinstalling")
bad = []
for line in wanted:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": "test"}):
        continue
    try:
        version = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        bad.append(f"{req.name} missing")
        continue
    if version not in req.specifier:
        bad.append(f"{req.name} {version} (wants {req.specifier})")
if bad:
    sys.exit("[setup_env] the environment does not meet pyproject.toml: " + ", ".join(bad) + ": re-resolving")
PY
then
  rm -f "$stamp"
fi
if [ ! -f "$venv/.medsam3-venv" ] && [ ! -f "$stamp" ]; then  # a working environment of the user's own: never deleted
  touch "$venv/.medsam3-adopted"
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
echo "[setup_env] ready: $venv (to call medsam3 yourself: source $(printf %q "$venv/bin/activate"))"
