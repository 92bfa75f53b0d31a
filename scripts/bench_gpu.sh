#!/usr/bin/env bash
# One command on a CUDA machine: the full-size SAM3 numbers, printed as one JSON object on stdout.
#
#   bash scripts/bench_gpu.sh                  # about 15-30 min on one H100/H200 (random init: no weights needed)
#   PEAK_TFLOPS=989 TRAIN_BATCH=4 bash scripts/bench_gpu.sh > gpu.json
#   QUICK=1 bash scripts/bench_gpu.sh          # the issue's table in a few minutes: fewer repeats, none of the
#                                              # extra parts below (scripts/device_check.sh runs this)
#   ONLY="forward_compiled train_compiled" bash scripts/bench_gpu.sh   # just these parts (the others: skipped)
#   PART_TIMEOUT=240 PARTIAL_JSON=gpu.json bash scripts/bench_gpu.sh   # each part at most 240 s; the JSON so far
#                                              # rewritten to gpu.json after each part (a run cut short keeps it)
#
# Parts (each in its own process; a part that fails, e.g. out of memory, is recorded as {"error": ...} and the
# others still run; its stderr goes to $LOG_DIR):
#   forward            full detector at 1008 px, bf16 autocast, SDPA: images/s at batch 1 / 8 / 32 (the
#                      `medsam3 segment` forward + top-query masks, and the network forward alone), FLOPs, MFU,
#                      peak memory, host syncs per forward                              (scripts/bench_gpu.py)
#   forward_compiled   the same at batch 32 with torch.compile of the vision encoder                  (extra)
#   forward_channels_last  the same at batch 8 with channels-last conv weights                      (extra)
#   forward_chunk32    the eager forward at batch 32 with 32 find-queries per detector pass (one pass, not two) (extra)
#   evaluate           a whole 2D evaluation case (inference, back to each picture's size on the GPU, merge,
#                      metrics) against the bare 1008-px forward: case_over_forward (scripts/bench_gpu.py)
#   train              one training step (MedSAM3Trainer: forward, set-prediction loss, backward, AdamW), bf16:
#   train_checkpointing    images/s, peak memory and MFU, without and with gradient checkpointing
#                                                                                         (scripts/bench_train.py)
#   train_compiled     the same with the vision encoder compiled (train.json's `compile`)       (extra)
#   train_batch8_compiled  a step of 8 images, vision encoder compiled: a batch 4 leaves an H200 mostly waiting
#                      on kernel launches (the MFU goal is per GPU, not per batch size)                (extra)
#   train_batch16_checkpointing  16 images with gradient checkpointing, compiled (about what fits in 80 GB)  (extra)
#   volume             a synthetic 512 x 512 x 300 CT (NIfTI) as `medsam3 segment` runs it: the bundle's way in,
#                      segment_volume with the full detector (32 slices per forward: `--batch-size 32`) + full
#                      SAM3 tracker (random init), the way back;
#                      seconds per part, case_s (goal <= 15 s) and slices/s            (scripts/bench_gpu.py)
#   volume_compiled    the same CT as fast as `medsam3 segment` can go: the vision encoder and the tracker's
#                      per-slice modules compiled (in a warm-up on the first slices, compile_s, before the clock),
#                      32 find-queries per detector pass (one pass per slice batch, not two)    (extra)
#   volume_cudagraphs  volume_compiled with torch.compile's "reduce-overhead" mode (CUDA graphs): the tracker's
#                      per-slice step is hundreds of small kernels launched from Python, far below its FLOPs  (extra)
#   volume_profile     a 24-slice CT's operators by device time (detector + tracker)          (extra)
#   volume_8_prompts   a 100-slice CT with 8 organ prompts, the tracker propagating the 8 together (`segment_volume`'s
#                      tracker_batch, default 8)                                                 (extra)
#   volume_8_prompts_one_at_a_time  the same, one prompt at a time (tracker_batch 1)             (extra)
# Operator profiles (the forward at its last batch, a training step, volume_profile) go to $LOG_DIR/*_profile.txt.
# With gradient checkpointing, `mfu` counts the recomputed forward (hardware FLOPs) and `mfu_model_flops` does not
# (the step's model FLOPs, comparable with the runs without checkpointing).
set -uo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then  # the header above is the usage
    sed -n '2,/^[^#]/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 0
fi

cd "$(dirname "$0")/.."
VENV="${MEDSAM3_VENV:-$HOME/.cache/medsam3-monai/venv}"
PY="${PYTHON:-$([ -x "$VENV/bin/python" ] && echo "$VENV/bin/python" || echo python)}"
PEAK_TFLOPS="${PEAK_TFLOPS:-989}"
TRAIN_BATCH="${TRAIN_BATCH:-4}"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "bench_gpu.sh: no CUDA device: torch.cuda.is_available() is False with $PY. Run it on a machine with an" \
         "NVIDIA GPU (the CPU checks are scripts/bench_full_cpu.py and scripts/bench_segment.py)." >&2
    exit 3
fi
LOG_DIR="${LOG_DIR:-$(mktemp -d -t bench-gpu-XXXXXX)}"
PART_TIMEOUT="${PART_TIMEOUT:-0}"  # seconds per part (0: none); a part stopped there is recorded as an error
QUICK="${QUICK:-0}"
if [ "$QUICK" = 1 ]; then  # repeats after warm-up: forward / evaluate / training steps
    REPEATS=5 WARMUP=2 EVAL_REPEATS=3 TRAIN_ITERATIONS=8
else
    REPEATS=10 WARMUP=3 EVAL_REPEATS=10 TRAIN_ITERATIONS=20
fi
mkdir -p "$LOG_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's package

PARTS=(forward forward_compiled forward_channels_last forward_chunk32 evaluate train train_checkpointing train_compiled
       train_batch8_compiled train_batch16_checkpointing volume volume_compiled volume_cudagraphs volume_profile
       volume_8_prompts volume_8_prompts_one_at_a_time)
EXTRA=" forward_compiled forward_channels_last forward_chunk32 train_compiled train_batch8_compiled
 train_batch16_checkpointing volume_compiled volume_cudagraphs volume_profile volume_8_prompts
 volume_8_prompts_one_at_a_time "
ONLY="${ONLY:-}"

summarize() {  # summarize FILE: the parts' JSON objects as one (a part not run yet: {"pending": true}) into FILE
    "$PY" - "$LOG_DIR" "$PEAK_TFLOPS" "$QUICK" "${PARTS[@]}" >"$1" <<'PYEOF'
import json
import sys
from pathlib import Path

log_dir, peak, quick, names = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "1", sys.argv[4:]
parts = {}
for name in names:
    path = log_dir / f"{name}.json"
    if not path.exists():
        parts[name] = {"pending": True}
        continue
    try:
        parts[name] = json.loads(path.read_text())
    except json.JSONDecodeError:
        parts[name] = {"error": "no JSON output", "log": str(log_dir / f"{name}.log")}
result = {"benchmark": "bench_gpu.sh", "quick": quick, "peak_tflops": peak, "logs": str(log_dir), **parts}
print(json.dumps(result, indent=1))
PYEOF
}

part_done() {  # after each part: the summary so far into PARTIAL_JSON, when set (a run cut short keeps its parts)
    [ -n "${PARTIAL_JSON:-}" ] && summarize "$PARTIAL_JSON"
    return 0
}

run_part() {  # run_part NAME COMMAND...: the command's last JSON object, or {"error": ...}; skipped with ONLY
    local name="$1"; shift           # when NAME is not in it, and with QUICK=1 when NAME is an extra part
    if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then
        skip_part "$name" "not in ONLY"
        return 0
    fi
    if [ -z "$ONLY" ] && [ "$QUICK" = 1 ] && [[ "$EXTRA" == *" $name "* ]]; then
        skip_part "$name" "QUICK=1 (run without it, or with ONLY, for this part)"
        return 0
    fi
    local out="$LOG_DIR/$name.json" err="$LOG_DIR/$name.log" status=0
    echo "bench_gpu.sh: $name ..." >&2
    if [ "$PART_TIMEOUT" -gt 0 ]; then
        timeout "$PART_TIMEOUT" "$@" >"$out" 2>"$err" || status=$?
    else
        "$@" >"$out" 2>"$err" || status=$?
    fi
    if [ "$status" -eq 124 ] && [ "$PART_TIMEOUT" -gt 0 ]; then
        echo "timed out after $PART_TIMEOUT s (PART_TIMEOUT)" >>"$err"
    fi
    if [ "$status" -ne 0 ]; then
        "$PY" -c 'import json, sys; print(json.dumps({"error": (open(sys.argv[1]).read().strip().splitlines() or ["failed"])[-1], "log": sys.argv[1]}))' \
            "$err" >"$out"
    fi
    part_done
}

skip_part() {  # skip_part NAME WHY: recorded as {"skipped": WHY}
    "$PY" -c 'import json, sys; print(json.dumps({"skipped": sys.argv[1]}))' "$2" >"$LOG_DIR/$1.json"
    part_done
}

FORWARD=(--repeats "$REPEATS" --warmup "$WARMUP" --peak-tflops "$PEAK_TFLOPS")
TRAIN=(--full --device cuda --batch "$TRAIN_BATCH" --iterations "$TRAIN_ITERATIONS" --warmup "$WARMUP"
       --peak-tflops "$PEAK_TFLOPS")
# the issue's table first (forward, training, the CT), the evaluation case last
run_part forward "$PY" scripts/bench_gpu.py forward --batch 1 8 32 "${FORWARD[@]}" \
    --profile "$LOG_DIR/forward_profile.txt"
run_part train "$PY" scripts/bench_train.py "${TRAIN[@]}" --profile "$LOG_DIR/train_profile.txt"
run_part train_checkpointing "$PY" scripts/bench_train.py "${TRAIN[@]}" --checkpointing
run_part volume "$PY" scripts/bench_gpu.py volume --size 512 --depth 300 --slice-batch 32
run_part evaluate "$PY" scripts/bench_gpu.py evaluate --repeats "$EVAL_REPEATS"
# the extra parts (QUICK=1 skips them; ONLY picks any)
run_part forward_compiled "$PY" scripts/bench_gpu.py forward --batch 32 --compile "${FORWARD[@]}"
run_part forward_chunk32 "$PY" scripts/bench_gpu.py forward --batch 32 --detector-chunk 32 "${FORWARD[@]}"
run_part train_compiled "$PY" scripts/bench_train.py "${TRAIN[@]}" --compile
run_part train_batch8_compiled "$PY" scripts/bench_train.py "${TRAIN[@]}" --batch 8 --compile
run_part train_batch16_checkpointing "$PY" scripts/bench_train.py "${TRAIN[@]}" --batch 16 --checkpointing --compile
run_part volume_compiled "$PY" scripts/bench_gpu.py volume --size 512 --depth 300 --slice-batch 32 --compile \
    --detector-chunk 32
run_part volume_cudagraphs "$PY" scripts/bench_gpu.py volume --size 512 --depth 300 --slice-batch 32 --compile \
    --compile-mode reduce-overhead --detector-chunk 32
run_part volume_profile "$PY" scripts/bench_gpu.py volume --size 512 --depth 24 --slice-batch 8 \
    --profile "$LOG_DIR/volume_profile.txt"
ORGANS=(liver spleen "left kidney" "right kidney" stomach pancreas aorta gallbladder)
run_part volume_8_prompts "$PY" scripts/bench_gpu.py volume --size 512 --depth 100 --slice-batch 32 \
    --detector-chunk 32 --prompts "${ORGANS[@]}" --tracker-batch 8
run_part volume_8_prompts_one_at_a_time "$PY" scripts/bench_gpu.py volume --size 512 --depth 100 --slice-batch 32 \
    --detector-chunk 32 --prompts "${ORGANS[@]}" --tracker-batch 1
run_part forward_channels_last "$PY" scripts/bench_gpu.py forward --batch 8 --channels-last "${FORWARD[@]}"

summarize /dev/stdout
