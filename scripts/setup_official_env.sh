#!/usr/bin/env bash
# Build (or reuse) the environment of Meta's official SAM3 code, the reference our numbers are held to:
# sam3 0.1.4 with what its modules import (psutil, scipy, torchmetrics) and open_clip_torch for the CLIP BPE
# vocabulary. It is never a dependency of medsam3-monai: sam3 brings its own CUDA build of torch (it runs on the
# CPU too), and nothing of this project is installed into it.
# Usage: scripts/setup_official_env.sh [VENV_DIR]
#        (default: $MEDSAM3_OFFICIAL_VENV or ~/.cache/medsam3-monai/sam3-official-venv); `make official` runs it.
# Used in CI by tests/test_official_detector.py (a tiny detector against sam3's), test_official_tracker.py (the
# tracker), test_official_preprocessing.py (the network input against Sam3Processor's) and
# test_official_segment.py (medsam3 segment against Sam3Processor), and by
# scripts/check_official.py (the full-size detector and losses: --official-python VENV_DIR/bin/python).
set -euo pipefail
venv="${1:-${MEDSAM3_OFFICIAL_VENV:-$HOME/.cache/medsam3-monai/sam3-official-venv}}"
python="${PYTHON:-python3.11}"
log() { echo "[setup_official_env] $*"; }
# shellcheck source=scripts/venv_common.sh
source "$(cd "$(dirname "$0")" && pwd)/venv_common.sh"
start=$SECONDS
# isolated (-I, from /): a torch/ in the caller's folder or PYTHONPATH must not decide
if ! (cd / && "$venv/bin/python" -I -c "import sam3, torch, open_clip, scipy, torchmetrics, psutil") >/dev/null 2>&1; then
  require_python "$python" setup_official_env
  new_venv "$venv" "$python" setup_official_env
  log "creating $venv: sam3==0.1.4 psutil scipy torchmetrics, open_clip_torch (--no-deps)"
  "$venv/bin/pip" install --quiet "sam3==0.1.4" psutil scipy torchmetrics
  "$venv/bin/pip" install --quiet --no-deps open_clip_torch
fi
"$venv/bin/python" - <<'PY'
from importlib import metadata
import torch
version = metadata.version("sam3")
assert version == "0.1.4", f"sam3 {version} installed, the reference is 0.1.4: remove the environment and rerun"
print(f"[setup_official_env] sam3 {version}, torch {torch.__version__}")
PY
log "ready in $((SECONDS - start)) s: $venv"
