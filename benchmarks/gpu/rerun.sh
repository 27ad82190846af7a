#!/usr/bin/env bash
# The second call of issue #14's GPU session (2026-11-29), after run.sh's memory stage died on a CUDA fault
# ("misaligned address", ZeRO-1 fp32), which ended its process and every configuration after it. In what the
# session had left (about 5 minutes), by priority, each part its own process and time limit:
#   1. that configuration alone with CUDA_LAUNCH_BLOCKING=1 and without --keep-going: the op that faults;
#   2. the memory sweep again, one process per precision (fp32 per layout, ZeRO-1 last), so a fault costs one row;
#   3. yolov8s real input, yolods against Ultralytics, 25 timed steps instead of 10.
# The report is rendered afterwards from OUT/results.jsonl (python -m yolods.bench.report), off the device.
# A record of what ran at 9b7d7e7 (benchmarks/results/gpu): yolods now refuses its NHWC configurations at ZeRO 1-3
# (yolods.model.check_memory_format), so part 2's NHWC runs at ZeRO 1-3 would end at the bench's check today.
#
#   bash benchmarks/gpu/rerun.sh OUT_DIR        # on the GPU machine, .whl/ carried (benchmarks/gpu/README.md)
set -u -o pipefail
OUT="${1:?usage: bash benchmarks/gpu/rerun.sh OUT_DIR}"
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1 YOLO_OFFLINE=1 MPLBACKEND=Agg YOLO_CONFIG_DIR=/tmp/yolods-gpu/ultralytics-settings
export DS_ACCELERATOR=cuda PYTHONPATH="/tmp/site:$PWD"
DATA_ROOT=/tmp/yolods-gpu/shapes-640px-4096

part() {  # LIMIT NAME COMMAND...: run with a time limit, log everything, print the bench's verdict lines
    local limit=$1 name=$2 start=$SECONDS
    shift 2
    echo "===== $name (limit ${limit}s, at +${SECONDS}s): $*" >>"$LOG"
    timeout -k 5 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    echo "===== $name: exit $rc after $(( SECONDS - start ))s" | tee -a "$LOG"
}

BENCH=(python3 -m yolods.bench --device cuda --imgsz 640 --run-id "gpu-rerun-$(date -u +%Y%m%dT%H%M%SZ)"
    --interconnect "one GPU, no network" --out "$OUT")  # an array: timeout runs programs, not shell functions
MEMORY=(--model s --micro-batch 16 --engine deepspeed --input synthetic --steps 6 --warmup-steps 3)

part 40 install bash -c "rm -rf /tmp/site && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl"
part 30 data python3 benchmarks/gpu/stages.py data "$DATA_ROOT" --num-train 4096 --imgsz 640
[ -n "${SKIP_DIAGNOSE:-}" ] || part 45 diagnose env CUDA_LAUNCH_BLOCKING=1 python3 -m yolods.bench --device cuda --imgsz 640 --out /tmp/diagnose \
    --model s --micro-batch 16 --engine deepspeed --input synthetic --steps 1 --warmup-steps 1 \
    --zero 1 --precision fp32 --channels-last on
part 60 memory-bf16 "${BENCH[@]}" "${MEMORY[@]}" --keep-going --precision bf16 --zero 0,1,2,3 --channels-last on,off
part 60 memory-fp16 "${BENCH[@]}" "${MEMORY[@]}" --keep-going --precision fp16 --zero 0,1,2,3 --channels-last on,off
part 35 memory-fp32-nhwc "${BENCH[@]}" "${MEMORY[@]}" --keep-going --precision fp32 --zero 0,2,3,1 --channels-last on
part 35 memory-fp32-nchw "${BENCH[@]}" "${MEMORY[@]}" --keep-going --precision fp32 --zero 0,2,3,1 --channels-last off
part 80 throughput-s "${BENCH[@]}" --model s --micro-batch 128 --precision bf16 --zero 0 --input real \
    --engine deepspeed,ultralytics --data "$DATA_ROOT/data.yaml" --workers 12 --steps 25 --warmup-steps 3 --keep-going
grep -E '^yolods\.bench: \[|FAILED|Error|error' "$LOG" | cut -c1-300 | tail -60
echo "finished in ${SECONDS}s"
