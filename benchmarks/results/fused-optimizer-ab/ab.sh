#!/usr/bin/env bash
# Before/after of the fused optimizer for ZeRO 1-3 (commit b7ba469), A B A B on one core per process:
# worktrees /work/wt-old at 2607459 (before) and /work/wt-new at 466c6e9 (after), both clean.
export OMP_NUM_THREADS=1
for round in 1 2; do
  for tree in old new; do
    cd /work/wt-$tree && PYTHONPATH=/work/wt-$tree python -m yolods.bench --model s --imgsz 160 --zero 1,2 \
      --engine deepspeed,ddp --input synthetic --steps 10 --warmup-steps 3 --run-id ab-$tree --out /work/ab-$tree
  done
done
