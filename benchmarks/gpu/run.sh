#!/usr/bin/env bash
# GPU evidence for yolods in one call (issue #14): on one GPU, in under 8 minutes of wall time,
#   install the carried wheels (.whl/) -> check imports and a process group of one (NCCL) -> draw a data set
#   -> training throughput of yolods against the Ultralytics trainer (and torch DDP), yolov8n/s(/m) @640 bf16,
#      synthetic on-device input and real input through the loaders -> peak memory per ZeRO stage, precision and
#      memory format -> train, stop, resume, val and predict end to end (e2e.sh) -> one torch.profiler window
#      -> report.md -> summary.md with the timeline.
# Every stage has its own time limit, cut further so the whole run stays inside --budget; a stage that fails or
# times out is recorded and the next one runs. Measurements append to OUT/results.jsonl (the bench's schema).
#
#   bash benchmarks/gpu/run.sh OUT_DIR                 # on the GPU machine (see benchmarks/gpu/README.md)
#   bash benchmarks/gpu/run.sh --cpu-smoke OUT_DIR     # every stage, tiny, on CPU (a few minutes)
#   bash benchmarks/gpu/run.sh --dry-run OUT_DIR       # the GPU commands, resolved by the bench, none run
#   bash benchmarks/gpu/run.sh --stages env,data,thr-n OUT_DIR   # some stages only (summary always runs)
#
# OUT_DIR receives at most 8 files, none in a subfolder: summary.md, log.txt, env.json, results.jsonl, report.md,
# profile.txt, step_breakdown.png, memory_per_rank.png. Scratch (data, the full report) goes to $YOLODS_GPU_WORK
# (default /tmp/yolods-gpu). Batches per model: YOLODS_GPU_BATCH_N / _S / _M (default 256 / 128 / 64).
set -u -o pipefail

usage() {
    echo "usage: bash benchmarks/gpu/run.sh [--cpu-smoke | --dry-run] [--stages LIST] [--budget SECONDS] OUT_DIR" >&2
    echo "stages: install,env,plan,data,thr-n,thr-s,memory,layout,e2e,profile,thr-m,report,summary" >&2
    exit 2
}

MODE=gpu
ONLY=""
BUDGET=""
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-smoke) MODE=cpu-smoke ;;
        --dry-run) MODE=dry-run ;;
        --stages) ONLY="${2:?--stages needs a list}"; shift ;;
        --budget) BUDGET="${2:?--budget needs seconds}"; shift ;;
        -h|--help) usage ;;
        -*) echo "run.sh: unknown option $1" >&2; usage ;;
        *) [ -z "$OUT" ] || usage; OUT="$1" ;;
    esac
    shift
done
[ -n "$OUT" ] || usage

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO" || exit 2
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || exit 2
WORK="${YOLODS_GPU_WORK:-/tmp/yolods-gpu}"
mkdir -p "$WORK" && WORK="$(cd "$WORK" && pwd)" || exit 2
PY="${PYTHON:-python3}"
SITE=/tmp/site
STAGES_PY="benchmarks/gpu/stages.py"
RUN_ID="gpu-$(date -u +%Y%m%dT%H%M%SZ)"

# ---------------------------------------------------------------------------------------------------------------
# Sizes. GPU: 640 px, bf16, a fixed batch per model with headroom on a 141 GB H200 (bf16 activations of yolov8n
# take ~0.15 GB per 640 px image, yolov8s ~0.3, yolov8m ~0.55: ~40 GB at these batches), 12 loader workers of 16
# cores. CPU smoke: the same stages at 32 px, batch 2, 1 timed step, fp32 (the Ultralytics trainer's bf16 needs
# CUDA). Paths must hold no spaces (the argument lists below are split on them).
if [ "$MODE" = cpu-smoke ]; then
    DEVICE=cpu IMGSZ=32 PREC=fp32 WORKERS=1 STEPS=1 WARMUP=1
    BATCH_N=2 BATCH_S=2 BATCH_M=2 E2E_BATCH=2
    MEM_MODEL=n MEM_BATCH=2 MEM_ZERO=0,3 MEM_PREC=bf16,fp32 MEM_STEPS=1 MEM_WARMUP=1
    PROF_MODEL=n PROF_BATCH=2 PROF_PREC=fp32 PROF_STEPS=1 PROF_WARMUP=1
    BUDGET="${BUDGET:-1500}" RESERVE=150 SCALE=4
    INTERCONNECT="CPU smoke run"
else
    DEVICE=cuda IMGSZ=640 PREC=bf16 STEPS=10 WARMUP=3
    cores=$(nproc 2>/dev/null || echo 16)
    WORKERS=$(( cores > 14 ? 12 : (cores > 3 ? cores - 2 : 1) ))
    BATCH_N="${YOLODS_GPU_BATCH_N:-256}" BATCH_S="${YOLODS_GPU_BATCH_S:-128}" BATCH_M="${YOLODS_GPU_BATCH_M:-64}"
    E2E_BATCH=64
    # yolov8s at 16 img/GPU is also the report's projection calibration (its goal model and batch)
    MEM_MODEL=s MEM_BATCH=16 MEM_ZERO=0,1,2,3 MEM_PREC=bf16,fp32,fp16 MEM_STEPS=6 MEM_WARMUP=3
    PROF_MODEL=s PROF_BATCH="$BATCH_S" PROF_PREC=bf16 PROF_STEPS=3 PROF_WARMUP=3
    BUDGET="${BUDGET:-465}" RESERVE=35 SCALE=1
    INTERCONNECT="one GPU, no network"
fi
MAX_BATCH=$(printf '%s\n' "$BATCH_N" "$BATCH_S" "$BATCH_M" | sort -n | tail -1)
# Real input reads one epoch without a restart: burn-in + timed + the model-state step, and Ultralytics' own
# burn-in + timed batches; 3 batches spare.
NUM_TRAIN=$(( (WARMUP + STEPS + 3) * MAX_BATCH ))
DATA_ROOT="$WORK/shapes-${IMGSZ}px-${NUM_TRAIN}"
DATA_YAML="$DATA_ROOT/data.yaml"

export PYTHONUNBUFFERED=1 YOLO_OFFLINE=1 MPLBACKEND=Agg YOLO_CONFIG_DIR="$WORK/ultralytics-settings"
if [ "$MODE" = gpu ]; then
    export DS_ACCELERATOR=cuda
    if compgen -G ".whl/*.whl" >/dev/null; then
        export PYTHONPATH="$SITE:$REPO"
    else
        export PYTHONPATH="$REPO"
    fi
else
    # As on the GPU machine, where they are not carried (prepare_wheels.sh says why): importing them fails.
    for module in polars ultralytics_platform; do
        mkdir -p "$WORK/absent/$module"
        echo "raise ImportError('$module is not on the GPU machine (benchmarks/gpu/prepare_wheels.sh)')" \
            >"$WORK/absent/$module/__init__.py"
    done
    export PYTHONPATH="$WORK/absent:$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi

# ---------------------------------------------------------------------------------------------------------------
# The bench commands (also checked by the plan stage and printed by --dry-run)
COMMON=(--device "$DEVICE" --imgsz "$IMGSZ" --run-id "$RUN_ID" --interconnect "$INTERCONNECT" --keep-going)
throughput_args() {  # MODEL BATCH
    echo --model "$1" --micro-batch "$2" --precision "$PREC" --zero 0 --input synthetic,real \
        --engine deepspeed,ddp,ultralytics --data "$DATA_YAML" --workers "$WORKERS" \
        --steps "$STEPS" --warmup-steps "$WARMUP"
}
memory_args() {  # ZERO [--channels-last on,off]: yolods refuses NHWC images at ZeRO 1-3 on CUDA (check_memory_format)
    echo --model "$MEM_MODEL" --micro-batch "$MEM_BATCH" --engine deepspeed --zero "$1" --precision "$MEM_PREC" \
        --input synthetic --steps "$MEM_STEPS" --warmup-steps "$MEM_WARMUP" "${@:2}"
}
# shellcheck disable=SC2046  # the argument lists above hold no spaces
THR_N=("$PY" -m yolods.bench "${COMMON[@]}" $(throughput_args n "$BATCH_N") --out "$OUT")
# shellcheck disable=SC2046
THR_S=("$PY" -m yolods.bench "${COMMON[@]}" $(throughput_args s "$BATCH_S") --out "$OUT")
# shellcheck disable=SC2046
THR_M=("$PY" -m yolods.bench "${COMMON[@]}" $(throughput_args m "$BATCH_M") --out "$OUT")
# shellcheck disable=SC2046
MEMORY=("$PY" -m yolods.bench "${COMMON[@]}" $(memory_args "$MEM_ZERO") --out "$OUT")
# shellcheck disable=SC2046
LAYOUT=("$PY" -m yolods.bench "${COMMON[@]}" $(memory_args 0 --channels-last on,off) --out "$OUT")
PROFILE=("$PY" "$STAGES_PY" profile "$OUT/profile.txt" --device "$DEVICE" --model "$PROF_MODEL" --imgsz "$IMGSZ"
    --micro-batch "$PROF_BATCH" --precision "$PROF_PREC" --zero 0 --warmup-steps "$PROF_WARMUP" --steps "$PROF_STEPS")
WHEEL_PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
if [ "$MODE" = gpu ]; then
    INSTALL=(bash -c "rm -rf $SITE && $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .whl/*.whl && echo \"stages: \$(ls .whl | wc -l) wheels installed into $SITE: \$(ls .whl | tr '\n' ' ')\"")
else  # here the wheels are cp312 manylinux ones: install them for that platform into scratch, off the path
    INSTALL=(bash -c "rm -rf $WORK/site && $PY -m pip install -q --no-index --no-deps --no-compile --target $WORK/site ${WHEEL_PLATFORM[*]} .whl/*.whl && echo \"stages: \$(ls .whl | wc -l) wheels install for cp312 manylinux x86_64\"")
fi
ENV_CHECK=(bash -c "{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | sed 's/^/stages: nvidia-smi: /'; } ; $PY $STAGES_PY env $OUT/env.json --device $DEVICE")
DATA=("$PY" "$STAGES_PY" data "$DATA_ROOT" --num-train "$NUM_TRAIN" --imgsz "$IMGSZ")
REPORT=(bash -c "rm -rf $WORK/report && mkdir -p $WORK/report && cp $OUT/results.jsonl $WORK/report/ && $PY -m yolods.bench.report $WORK/report && cp $WORK/report/report.md $WORK/report/step_breakdown.png $WORK/report/memory_per_rank.png $OUT/ && echo stages: report.md, step_breakdown.png, memory_per_rank.png copied")

echo "yolods GPU evidence: mode $MODE, budget ${BUDGET}s, out $OUT, scratch $WORK, run id $RUN_ID"
echo "  device $DEVICE, ${IMGSZ}px, $PREC, batches n/s/m $BATCH_N/$BATCH_S/$BATCH_M, $WORKERS loader workers, $STEPS timed steps after $WARMUP; data $NUM_TRAIN images"
echo "  PYTHONPATH=$PYTHONPATH"

if [ "$MODE" = dry-run ]; then  # the GPU run's bench commands, resolved by the bench's own parser and checks
    rc=0
    for cmd in THR_N THR_S MEMORY LAYOUT THR_M; do
        declare -n ref=$cmd
        echo "  ${ref[*]}"
        "$PY" "$STAGES_PY" plan "${ref[@]:3}" || rc=1
    done
    echo "  ${PROFILE[*]}"
    exit $rc
fi

# ---------------------------------------------------------------------------------------------------------------
# The stage runner: a time limit per stage, cut to what the budget leaves (less RESERVE for report and summary)
TIMELINE="$WORK/timeline.tsv"
: >"$TIMELINE"
LOG="$OUT/log.txt"
FAILURES=0
GATE_OK=1
GATE_FAILED=""

wanted() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }

record() {  # NAME START TOOK LIMIT STATUS NOTE
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$TIMELINE"
    printf '[%4ss] %-8s %-22s took %4ss of %4ss  %s\n' "$2" "$1" "$5" "$3" "$4" "$6"
}

stage() {  # NAME CAP MIN_SECONDS [gate|final] -- COMMAND...
    local name=$1 cap=$(( $2 * SCALE )) min=$(( $3 * SCALE )) kind=$4
    shift 5
    wanted "$name" || [ "$name" = summary ] || return 0
    local start=$SECONDS left limit rc took status note
    if [ "$kind" = final ]; then left=$(( BUDGET - start )); else left=$(( BUDGET - start - RESERVE )); fi
    if [ $GATE_OK -eq 0 ] && [ "$kind" = measure ]; then
        record "$name" "$start" 0 0 skipped "the $GATE_FAILED stage failed"
        return 0
    fi
    limit=$(( cap < left ? cap : left ))
    if [ "$limit" -lt "$min" ]; then
        record "$name" "$start" 0 "$limit" skipped "no time: ${left}s of the budget left, needs ${min}s"
        return 0
    fi
    printf '\n===== stage %s (limit %ss, at +%ss): %s\n' "$name" "$limit" "$start" "$*" >>"$LOG"
    timeout -k 10 "$limit" "$@" >"$WORK/stage-$name.log" 2>&1
    rc=$?
    took=$(( SECONDS - start ))
    cat "$WORK/stage-$name.log" >>"$LOG"
    echo "===== stage $name: exit $rc after ${took}s" >>"$LOG"
    grep -E '^(yolods\.bench: \[|yolods\.bench: skipped|stages: )' "$WORK/stage-$name.log" | cut -c1-240 | sed 's/^/         /'
    case $rc in
        0) status=ok ;;
        124|137) status="TIMEOUT" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    note=$(grep -cE '^yolods\.bench: \[[0-9]+/[0-9]+\] .* img/s' "$WORK/stage-$name.log")
    note="$note results lines"
    if [ $rc -ne 0 ]; then
        FAILURES=$(( FAILURES + 1 ))
        if [ "$kind" = gate ] && [ $GATE_OK -eq 1 ]; then GATE_OK=0; GATE_FAILED=$name; fi
        note="$note; $(grep -vE '^\s*$' "$WORK/stage-$name.log" | tail -1 | cut -c1-160 | tr '\t|' '  ')"
        echo "         --- last lines of stage $name ---"
        tail -n 25 "$WORK/stage-$name.log" | cut -c1-240 | sed 's/^/         | /'
    fi
    record "$name" "$start" "$took" "$limit" "$status" "$note"
}

# name          cap  min  kind (gate: a failure skips the measurements; final: may use the reserve)
if compgen -G ".whl/*.whl" >/dev/null; then
    stage install 60 10 "$([ "$MODE" = gpu ] && echo gate || echo check)" -- "${INSTALL[@]}"
else
    wanted install && record install 0 0 0 skipped "no .whl/ here (bash benchmarks/gpu/prepare_wheels.sh makes it)"
fi
stage env 60 10 gate -- "${ENV_CHECK[@]}"
if [ "$MODE" = cpu-smoke ]; then  # the GPU run's bench commands resolve (flags, configurations), none run
    stage plan 40 5 check -- env YOLODS_GPU_WORK="$WORK/dry-run" bash "$REPO/benchmarks/gpu/run.sh" --dry-run "$WORK/dry-run/out"
fi
stage data 60 10 measure -- "${DATA[@]}"
stage thr-n 110 45 measure -- "${THR_N[@]}"
stage thr-s 110 45 measure -- "${THR_S[@]}"
stage memory 100 40 measure -- "${MEMORY[@]}"
stage layout 50 20 measure -- "${LAYOUT[@]}"
stage e2e 120 60 measure -- bash "$REPO/benchmarks/gpu/e2e.sh" "$DATA_YAML" "$WORK" "$DEVICE" "$IMGSZ" "$E2E_BATCH" "$WORKERS"
stage profile 50 20 measure -- "${PROFILE[@]}"
stage thr-m 100 50 measure -- "${THR_M[@]}"
if [ -f "$OUT/results.jsonl" ]; then
    stage report 40 10 final -- "${REPORT[@]}"
else
    wanted report && record report "$SECONDS" 0 0 skipped "no results.jsonl"
fi
record summary "$SECONDS" 0 0 ok "total ${SECONDS}s of ${BUDGET}s"
echo
"$PY" "$STAGES_PY" summary "$OUT" --timeline "$TIMELINE" --mode "$MODE, $RUN_ID" >"$WORK/summary.log" 2>&1 \
    || { echo "summary failed:"; tail -n 20 "$WORK/summary.log"; FAILURES=$(( FAILURES + 1 )); }
cat "$WORK/summary.log"

# What comes back from the device: at most 8 files, at most 2 folders down
count=$(find "$OUT" -type f | wc -l)
deep=$(find "$OUT" -mindepth 3 -type f | wc -l)
echo
echo "OUT: $count files ($(du -sh "$OUT" | cut -f1)):" $(cd "$OUT" && ls)
[ "$count" -le 8 ] && [ "$deep" -eq 0 ] || { echo "run.sh: OUT holds $count files, $deep too deep: the device returns 8, 2 folders down"; FAILURES=$(( FAILURES + 1 )); }
echo "finished in ${SECONDS}s; $FAILURES stage(s) failed"
[ $FAILURES -eq 0 ]
