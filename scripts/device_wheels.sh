#!/usr/bin/env bash
# Wheels for a lent GPU machine whose Python lacks this project's packages, downloaded here (pip reaches PyPI
# from this machine, not from that one) into .whl/ (git-ignored), for scripts/device_check.sh to install there.
#
#   bash scripts/device_wheels.sh      # ~22 MB: the versions this checkout's environment runs, as cp312 wheels
#
# The GPU image of the workplace's `device` tool (Python 3.12) has torch, torchvision, numpy, scipy, scikit-image,
# pillow, tqdm, timm, huggingface-hub, tokenizers and safetensors, transformers 5.17 (this project needs
# compat.SUPPORTED_TRANSFORMERS), and no MONAI, Ignite, nibabel, open_clip (the CLIP BPE vocabulary) or jsonschema
# (datalists are validated). ITK and MLflow stay behind (large; the benchmarks read pictures and NIfTI files and
# track nothing). Set DEVICE_PYTHON to another X.Y for a machine with another Python.
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then  # the header above is the usage
    sed -n '2,/^[^#]/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 0
fi

cd "$(dirname "$0")/.."
VENV="${MEDSAM3_VENV:-$HOME/.cache/medsam3-monai/venv}"
PY="${PYTHON:-$([ -x "$VENV/bin/python" ] && echo "$VENV/bin/python" || echo python3)}"
DEVICE_PYTHON="${DEVICE_PYTHON:-3.12}"
NAMES=(transformers monai pytorch-ignite nibabel open_clip_torch ftfy wcwidth regex jsonschema referencing
       jsonschema-specifications rpds-py)

# NAME==VERSION of each, as installed here: the device runs what CI tests
PINS_LINE="$("$PY" - "${NAMES[@]}" <<'PYEOF'
import importlib.metadata
import sys

pins = []
for name in sys.argv[1:]:
    try:
        pins.append(f"{name}=={importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
        sys.exit(f"device_wheels.sh: {name} is not installed in this environment ({sys.executable}); "
                 "run scripts/setup_env.sh first")
print(" ".join(pins))
PYEOF
)"  # a plain assignment: a missing package stops the script here (set -e), with the message above
read -r -a PINS <<<"$PINS_LINE"

rm -rf .whl
mkdir -p .whl
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$DEVICE_PYTHON" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${PINS[@]}"
echo "device_wheels.sh: $(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1), in .whl/ for Python $DEVICE_PYTHON:" >&2
ls .whl >&2
