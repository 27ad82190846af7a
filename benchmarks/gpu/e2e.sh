#!/usr/bin/env bash
# The user's path on one device, end to end: `yolods.train` (validation, checkpoints, weights every epoch), stopped
# by SIGTERM after its first epoch's checkpoint, `--resume`d to the end, then `YOLO(best.pt)`, `yolods.val` and
# `yolods.predict` on the result. The H200 run of 2026-11-29 timed train steps only: this is the part of yolods
# that had never run on a GPU. run.sh's `e2e` stage runs it; it exits non-zero at the first step that fails.
#
#   bash benchmarks/gpu/e2e.sh DATA_YAML WORK_DIR DEVICE IMGSZ BATCH WORKERS
set -u -o pipefail
DATA_YAML="${1:?usage: e2e.sh DATA_YAML WORK_DIR DEVICE IMGSZ BATCH WORKERS}" WORK="$2" DEVICE="$3" IMGSZ="$4"
BATCH="$5" WORKERS="$6"
PY="${PYTHON:-python3}"
RUN="$WORK/e2e/run"
rm -rf "$WORK/e2e"
mkdir -p "$WORK/e2e"

say() { echo "stages: e2e: $*"; }
fail() { say "FAILED: $*"; exit 1; }

# 1. Train 3 epochs; SIGTERM once the first epoch's checkpoint is complete (its weights are written after it).
"$PY" -m yolods.train --data "$DATA_YAML" --model yolov8n.yaml --epochs 3 --batch "$BATCH" --imgsz "$IMGSZ" \
    --device "$DEVICE" --workers "$WORKERS" --project "$WORK/e2e" --name run --exist_ok >"$WORK/e2e/train.log" 2>&1 &
train=$!
for _ in $(seq 3000); do
    [ -f "$RUN/weights/last.pt" ] && break
    kill -0 "$train" 2>/dev/null || break
    sleep 0.1
done
[ -f "$RUN/weights/last.pt" ] || { tail -n 20 "$WORK/e2e/train.log"; fail "no weights/last.pt from the first epoch"; }
kill -TERM "$train"
wait "$train"
code=$?
epochs=$(( $(grep -c . "$RUN/results.csv") - 1 ))
case $code in
    143) say "stopped by SIGTERM after the first epoch's checkpoint: exit 143 (requeue), $epochs epoch(s) in results.csv" ;;
    0) say "finished before the SIGTERM arrived (epochs this short end first): --resume meets a finished run" ;;
    *) tail -n 20 "$WORK/e2e/train.log"; fail "the stopped run exited $code, not 143" ;;
esac

# 2. Resume to the end.
"$PY" -m yolods.train --resume "$RUN" >"$WORK/e2e/resume.log" 2>&1 \
    || { tail -n 20 "$WORK/e2e/resume.log"; fail "--resume"; }
epochs=$(( $(grep -c . "$RUN/results.csv") - 1 ))
[ "$epochs" -eq 3 ] || fail "results.csv holds $epochs epochs after the resume, not 3"
say "resumed and finished: 3 epochs in results.csv"

# 3. The weights in Ultralytics, then yolods.val and yolods.predict on them.
"$PY" - "$RUN/weights/best.pt" <<'PYTHON' || fail "YOLO(best.pt)"
import sys

import yolods  # noqa: F401  (offline first)
from ultralytics import YOLO

model = YOLO(sys.argv[1])
print(f"stages: e2e: YOLO(best.pt): {type(model.model).__name__}, {len(model.names)} classes")
PYTHON
"$PY" -m yolods.val --model "$RUN/weights/best.pt" --data "$DATA_YAML" --device "$DEVICE" --imgsz "$IMGSZ" \
    --project "$WORK/e2e" --name val >"$WORK/e2e/val.log" 2>&1 || { tail -n 20 "$WORK/e2e/val.log"; fail "yolods.val"; }
say "yolods.val: $(grep -E '^\s+all ' "$WORK/e2e/val.log" | tail -1 | tr -s ' ')"
images="$(dirname "$DATA_YAML")/images/val"
"$PY" -m yolods.predict --model "$RUN/weights/best.pt" --source "$images" --device "$DEVICE" --imgsz "$IMGSZ" \
    --project "$WORK/e2e" --name predict >"$WORK/e2e/predict.log" 2>&1 \
    || { tail -n 20 "$WORK/e2e/predict.log"; fail "yolods.predict"; }
say "yolods.predict: $(tail -n 1 "$WORK/e2e/predict.log")"
say "ok"
