#!/usr/bin/env bash
# The GPU checks of the throughput work in one run that fits a short lease of a GPU machine (a few minutes on an
# H100/H200; the `device` tool's run lends 10 minutes a command): the wheels of scripts/device_wheels.sh installed
# aside, `QUICK=1 bash scripts/bench_gpu.sh` (the full-size 1008-px table: forward images/s at batch 1/8/32,
# a whole evaluation case against the forward, training steps with and without gradient checkpointing with MFU,
# a 512 x 512 x 300 CT through detector + tracker), then the tests that need a CUDA device.
#
#   bash scripts/device_wheels.sh                 # here, once: the wheels into .whl/
#   bash scripts/device_check.sh                  # there (the device tool: carry [".whl"])
#   ONLY="volume_compiled forward_compiled" PART_TIMEOUT=400 bash scripts/device_check.sh   # chosen parts only
#
# Each part of the benchmark stops after PART_TIMEOUT seconds (default 240: an error entry, the next part runs).
# Results go to $OUT (or RESULTS_DIR, default ./device_results): gpu.json (bench_gpu.sh's JSON), gpu_tests.log
# (pytest), gpu_logs.txt (each part's log, the end of it), profiles.txt (the parts' operator profiles, one after
# the other), nvidia_smi.txt and imports.log: six files, as the device tool returns at most eight. Exit status:
# 3 no CUDA device, 4 the project cannot be imported, 6 a part of the benchmark failed (its error in gpu.json),
# else pytest's.
set -uo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then  # the header above is the usage
    sed -n '2,/^[^#]/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 0
fi

cd "$(dirname "$0")/.."
RESULTS="${OUT:-${RESULTS_DIR:-$PWD/device_results}}"
PY="${PYTHON:-python3}"
mkdir -p "$RESULTS"
# no CUDA device: say so first (exit 3, as bench_gpu.sh), before installing or testing anything on the CPU
if "$PY" -c 'import torch' 2>/dev/null && ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "device_check.sh: no CUDA device here (torch.cuda.is_available() is False): run it on a GPU machine" >&2
    exit 3
fi

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/medsam3_site \
        .whl/*.whl || { echo "device_check.sh: installing .whl/*.whl failed" >&2; exit 4; }
    export PYTHONPATH="/tmp/medsam3_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! "$PY" -c 'import monai, ignite, nibabel, open_clip, transformers, medsam3_monai' 2>"$RESULTS/imports.log"; then
    echo "device_check.sh: this Python cannot import the project (see $RESULTS/imports.log); run" \
         "scripts/device_wheels.sh where pip reaches PyPI and bring .whl/ along" >&2
    exit 4
fi
nvidia-smi >"$RESULTS/nvidia_smi.txt" 2>&1 || true

LOGS="$(mktemp -d -t medsam3-device-XXXXXX)"
# gpu.json is rewritten after each part, so a run stopped early (the loan's time limit) still returns what it did
QUICK="${QUICK:-1}" PART_TIMEOUT="${PART_TIMEOUT:-240}" PARTIAL_JSON="$RESULTS/gpu.json" PYTHON="$PY" \
    LOG_DIR="$LOGS" bash scripts/bench_gpu.sh >/dev/null
status=$?
for log in "$LOGS"/*.log; do  # at most a few files come back from a lent machine: the parts' logs as one
    [ -e "$log" ] || continue
    echo "==> $(basename "$log")"
    tail -n 40 "$log"
done >"$RESULTS/gpu_logs.txt"
for profile in "$LOGS"/*_profile.txt; do
    [ -e "$profile" ] || continue
    echo "==> $(basename "$profile")"
    cat "$profile"
done >"$RESULTS/profiles.txt"
rm -rf "$LOGS"  # what came back is in $RESULTS

"$PY" -m pytest -q -p no:cacheprovider -rs tests/test_boundary_merge.py tests/test_training_step.py \
    tests/test_network_forward.py::test_the_decoder_reads_the_grid_size_from_a_host_tensor \
    tests/test_bitmasks.py::test_masks_on_a_cuda_device_are_packed_there \
    >"$RESULTS/gpu_tests.log" 2>&1
tests=$?
if grep -q "needs a CUDA device" "$RESULTS/gpu_tests.log"; then
    echo "device_check.sh: the GPU test was skipped: pytest saw no CUDA device" >&2
    tests=5
fi
if [ "$status" -eq 0 ]; then  # a part that failed (out of memory, an exception) is an {"error": ...} entry
    "$PY" - "$RESULTS/gpu.json" <<'PYEOF' || status=6
import json
import sys

parts = {name: part for name, part in json.load(open(sys.argv[1])).items() if isinstance(part, dict)}
failed = sorted(name for name, part in parts.items() if "error" in part)
if failed:
    sys.exit(f"device_check.sh: parts failed: {', '.join(failed)} (gpu_logs.txt)")
PYEOF
fi
echo "device_check.sh: bench_gpu.sh exit $status, pytest exit $tests; results in $RESULTS" >&2
[ "$status" -ne 0 ] && exit "$status"
exit "$tests"
