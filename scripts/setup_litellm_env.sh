#!/usr/bin/env bash
# Build (or reuse) the environment of LiteLLM's proxy, the real OpenAI-compatible server that
# tests/test_agent_litellm.py puts in front of the agent: litellm[proxy] 1.108.7 (its mock replies answer
# without any upstream model) and prisma 0.15.0 (the proxy imports it on every error path; without it a refused
# request becomes "500 No module named 'prisma'"). It is never a dependency of medsam3-monai: the agent reaches
# it over HTTP with this project's own `openai` client, and nothing of this project is installed into it.
# Usage: scripts/setup_litellm_env.sh [VENV_DIR]
#        (default: $MEDSAM3_LITELLM_VENV or ~/.cache/medsam3-monai/litellm-venv); `make litellm` runs it.
set -euo pipefail
venv="${1:-${MEDSAM3_LITELLM_VENV:-$HOME/.cache/medsam3-monai/litellm-venv}}"
python="${PYTHON:-python3.11}"
litellm_version="1.108.7"
prisma_version="0.15.0"
log() { echo "[setup_litellm_env] $*"; }
# shellcheck source=scripts/venv_common.sh
source "$(cd "$(dirname "$0")" && pwd)/venv_common.sh"
start=$SECONDS
# isolated (-I, from /): a torch/ in the caller's folder or PYTHONPATH must not decide
if ! (cd / && "$venv/bin/python" -I -c "import litellm.proxy.proxy_server, prisma") >/dev/null 2>&1; then
  require_python "$python" setup_litellm_env
  new_venv "$venv" "$python" setup_litellm_env
  log "creating $venv: litellm[proxy]==$litellm_version prisma==$prisma_version (about a minute from the package index)"
  "$venv/bin/pip" install --quiet "litellm[proxy]==$litellm_version" "prisma==$prisma_version"
fi
"$venv/bin/python" - "$litellm_version" <<'PY'
import sys
from importlib import metadata
version = metadata.version("litellm")
assert version == sys.argv[1], (f"litellm {version} installed, the tests expect {sys.argv[1]}: remove the environment "
                                "and rerun")
print(f"[setup_litellm_env] litellm {version}")
PY
log "ready in $((SECONDS - start)) s: $venv"
