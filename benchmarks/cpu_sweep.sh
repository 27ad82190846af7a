#!/usr/bin/env bash
# The committed CPU figures (benchmarks/results/cpu/): this repository's 2-core machine, gloo, 1 and 2 ranks.
#
#   bash benchmarks/cpu_sweep.sh            # ~35 min on 2 cores; OUT=... RUN_ID=... to override
#   ONLY=stages REPEATS=2 OUT=DIR bash benchmarks/cpu_sweep.sh   # the ZeRO-stage comparison alone (~10 min)
#   ONLY=stages IMGSZ=320 RANKS=2 REPEATS=2 OUT=DIR bash benchmarks/cpu_sweep.sh   # the same at 320 px, 2 ranks only
#   ONLY=stages RANKS=2 REPEATS=6 OUT=DIR bash benchmarks/cpu_sweep.sh   # enough passes for goal 2's intervals (~20 min; 320 px ~35)
#
# One rank = one core (OMP_NUM_THREADS=1), so the ideal 2-rank throughput is twice the 1-rank one. The 1-rank and
# 2-rank invocations alternate under one --run-id, so drifts in machine load fall on both; the report takes the
# median of each configuration's repeats.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-benchmarks/results/cpu}
RUN_ID=${RUN_ID:-cpu-$(date -u +%Y%m%dT%H%M%SZ)}
PYTHON=${PYTHON:-python}
export OMP_NUM_THREADS=1

# --require-clean: these are the committed figures, so they must come from committed code (a dirty tree is refused)
common=(--run-id "$RUN_ID" --out "$OUT" --micro-batch 8 --interconnect "loopback, one VM (gloo)" --require-clean)
one() { "$PYTHON" -m yolods.bench "${common[@]}" "$@"; }
two() { "$PYTHON" -m torch.distributed.run --nproc_per_node 2 -m yolods.bench "${common[@]}" "$@"; }

# ZeRO stages against DDP (and Ultralytics at 1 rank), synthetic and real input: the main comparison, on yolov8n
# and on yolov8s (3.7x the parameters and 3x the compute per image; fewer steps, as each takes 3x longer)
# IMGSZ: ZeRO's extra work per step is mostly per layer and per parameter, not per pixel, so its share (and the
# ratio to DDP) depends on the image size; RANKS=2 skips the 1-rank invocations.
IMGSZ=${IMGSZ:-160}
RANKS=${RANKS:-1,2}
stages() {  # $1: one|two; the rest: model flags
  local launcher=$1; shift
  if [[ ,$RANKS, == *,$([[ $launcher == one ]] && echo 1 || echo 2),* ]]; then
    "$launcher" --imgsz "$IMGSZ" --zero 0,1,2,3 --input synthetic,real "$@"
  fi
}
# Each invocation measures its configurations in one process, DDP first; every second pass runs them in reverse
# (--reverse), so what one configuration leaves in the process (a ZeRO-3 engine is never freed) falls on all.
for pass in $(seq "${REPEATS:-3}"); do
  order=(); (( pass % 2 == 0 )) && order=(--reverse)
  stages one --steps 20 --warmup-steps 5 "${order[@]}"
  stages two --steps 20 --warmup-steps 5 --comms-logger "${order[@]}"
  stages one --model s --steps 10 --warmup-steps 3 "${order[@]}"
  stages two --model s --steps 10 --warmup-steps 3 "${order[@]}"
done
if [[ ${ONLY:-} == stages ]]; then
  exec "$PYTHON" -m yolods.bench.report "$OUT" --require-clean
fi
# precision
for _ in 1 2; do
  one --imgsz 160 --steps 20 --warmup-steps 5 --zero 0,2 --precision bf16 --engine deepspeed,ddp
  two --imgsz 160 --steps 20 --warmup-steps 5 --zero 0,2 --precision bf16 --engine deepspeed,ddp
done
# ZeRO-2 buckets and overlap at 2 ranks, with DeepSpeed's wall-clock breakdown and comms logger
two --imgsz 160 --steps 20 --warmup-steps 5 --zero 2 --engine deepspeed --reduce-bucket-size 5e5,2e6,2e7 \
    --overlap-comm on,off --repeat 2 --wall-clock-breakdown --comms-logger
# image size (yolov8s is in the stage comparison above)
one --imgsz 320 --steps 10 --warmup-steps 3 --zero 0,2 --engine deepspeed,ddp
two --imgsz 320 --steps 10 --warmup-steps 3 --zero 0,2 --engine deepspeed,ddp

"$PYTHON" -m yolods.bench.report "$OUT" --require-clean
