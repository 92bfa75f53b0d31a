#!/usr/bin/env bash
# Build (or refresh) the MONAI Label environment: monailabel 0.8.5 + medsam3-monai, apart from the project's.
# Usage: scripts/setup_monailabel_env.sh [VENV_DIR]
#        (default: $MEDSAM3_MONAILABEL_VENV or ~/.cache/medsam3-monai/monailabel-venv); `make monailabel` runs it.
#
# Why a second environment: monailabel 0.8.5 depends on pydicom-seg 0.4.1, which pins jsonschema<4 and
# numpy<2, while medsam3-monai asks for jsonschema>=4.18, so `pip install monailabel==0.8.5 -e .` stops with
# ResolutionImpossible (see apps/monailabel_medsam3/README.md). Here the conflict is resolved on purpose:
#   1. monailabel 0.8.5 with its whole dependency set (numpy 1.26.4, jsonschema 3.2.0, pandas, sam2 built
#      from its sdist) and torch 2.14.1 + torchvision 0.29.1, the only torch pair that imports on this machine;
#      plus pydicom<3: pydicom-seg 0.4.1 (no upper bound declared) imports pydicom._storage_sopclass_uids,
#      gone in pydicom 3, so with the pydicom 3.0.2 pip picks `monailabel start_server` dies on import
#      (this also takes pynetdicom 2.1.1 and dicomweb-client 0.60.1);
#   2. medsam3-monai's other runtime dependencies (transformers 5.24, open_clip_torch, ...) under a
#      constraints file pinning everything step 1 installed, so nothing monailabel needs moves;
#   3. medsam3-monai itself, editable, --no-deps.
# The one requirement left unmet is medsam3-monai's jsonschema>=4.18: only the catalogue/datalist schema checks
# (medsam3_monai.data.schemas, Draft202012Validator) need it, never the inference path the app uses.
# The check at the end lists every unmet requirement and fails on any other.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-${MEDSAM3_MONAILABEL_VENV:-$HOME/.cache/medsam3-monai/monailabel-venv}}"
python="${PYTHON:-python3.11}"
monailabel_version="0.8.5"
stamp="$venv/.medsam3-monailabel-deps"
want="$(cat "$here/pyproject.toml" "$0" | sha256sum | cut -d' ' -f1)"
log() { echo "[setup_monailabel_env] $*"; }

if ! command -v "$python" >/dev/null 2>&1; then
  echo "[setup_monailabel_env] $python not found: monailabel $monailabel_version needs Python 3.11 or older" \
       "(it imports distutils and cgi, gone in 3.12/3.13); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if ! "$python" -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] < (3, 12) else 1)'; then
  echo "[setup_monailabel_env] $python is not Python 3.11: medsam3-monai needs >=3.11 and monailabel" \
       "$monailabel_version imports distutils/cgi (removed in 3.12/3.13); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

# shellcheck source=scripts/venv_common.sh
source "$here/scripts/venv_common.sh"
start=$SECONDS
# isolated (-I, from /): a torch/ in the caller's folder or PYTHONPATH must not decide
if ! (cd / && "$venv/bin/python" -I -c "import torch, torchvision, monailabel") >/dev/null 2>&1; then
  new_venv "$venv" "$python" setup_monailabel_env
  log "creating virtual environment at $venv"
  "$venv/bin/pip" install --quiet --upgrade pip setuptools wheel
  rm -f "$stamp"
fi
pip=("$venv/bin/pip" install --quiet)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "1/3 monailabel==$monailabel_version with its dependencies (+ torch 2.14.1, torchvision 0.29.1, pydicom<3;" \
      "builds sam2)"
  "${pip[@]}" "monailabel==$monailabel_version" "torch==2.14.1" "torchvision==0.29.1" "pydicom<3"

  log "2/3 medsam3-monai's other dependencies, keeping every version monailabel installed"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  "$venv/bin/pip" freeze --exclude-editable | grep -E '^[A-Za-z0-9_.-]+==' > "$work/constraints.txt"
  "$venv/bin/python" - "$here/pyproject.toml" > "$work/requirements.txt" <<'PY'
import re, sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
# jsonschema>=4.18 cannot coexist with pydicom-seg's jsonschema<4 (monailabel): left at 3.2.0 on purpose
print("\n".join(d for d in deps if re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].lower() != "jsonschema"))
PY
  "${pip[@]}" -r "$work/requirements.txt" -c "$work/constraints.txt"

  log "3/3 medsam3-monai (editable, --no-deps)"
  "${pip[@]}" --no-deps --no-build-isolation -e "$here"
  echo "$want" > "$stamp"
fi
# The editable install points at this clone; refresh it cheaply when the clone moved.
if ! (cd / && "$venv/bin/python" - "$here") <<'PY' >/dev/null 2>&1  # from / : the cwd must not shadow the install
import pathlib, sys
import medsam3_monai
sys.exit(0 if pathlib.Path(medsam3_monai.__file__).resolve().parent.parent == pathlib.Path(sys.argv[1]).resolve() else 1)
PY
then
  "${pip[@]}" --no-deps --no-build-isolation -e "$here"
fi

# `pip check` itself crashes here (pip 25+ rejects itk 5.4.7's wheel tag "cp311-abi3-manylinux_2_28_x86_64"),
# so the requirements are checked with importlib.metadata + packaging instead.
(cd / && "$venv/bin/python" -) <<'PY'
import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
expected = {("medsam3-monai", "jsonschema")}  # see the header of this script
unmet, unexpected, seen = [], [], set()
for dist in metadata.distributions():
    name = canonicalize_name(dist.metadata["Name"])
    if name in seen:  # the same distribution found twice on sys.path (e.g. an egg-info in the clone)
        continue
    seen.add(name)
    for spec in dist.requires or []:
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        have = installed.get(canonicalize_name(req.name))
        if have is None or not req.specifier.contains(have, prereleases=True):
            line = f"{name} {dist.version} requires {req}, installed: {have or 'none'}"
            unmet.append(line)
            if (name, canonicalize_name(req.name)) not in expected:
                unexpected.append(line)
for line in unmet:
    print(f"[setup_monailabel_env] unmet (known, see README): {line}" if line not in unexpected else
          f"[setup_monailabel_env] UNMET: {line}")
import monailabel, numpy, torch, transformers, monai, jsonschema  # noqa: E401
from medsam3_monai.inferers.predict import Predictor  # noqa: F401
from medsam3_monai.deploy.segment_cli import output_labels, write_label_volume, write_mask_image  # noqa: F401
print(f"[setup_monailabel_env] monailabel {monailabel.__version__}, torch {torch.__version__}, monai {monai.__version__}, "
      f"transformers {transformers.__version__}, numpy {numpy.__version__}, jsonschema {jsonschema.__version__}")
sys.exit(1 if unexpected else 0)
PY
log "ready in $((SECONDS - start)) s: $venv"
log "start the app: source $venv/bin/activate && monailabel start_server --app $here/apps/monailabel_medsam3 --studies DIR"
