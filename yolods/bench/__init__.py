"""Benchmark suite: throughput, step-time breakdown, communication and memory per rank, against world size.

    python -m yolods.bench [--zero 0,1,2,3] [--model n,s] [--input synthetic,real] --out DIR   # measure, append
    python -m yolods.bench.report DIR                                                         # report.md + PNGs
    python -m yolods.bench --tune [--budget-min 5]               # the fastest DeepSpeed config here: ds_tuned.json
    python -m yolods.bench --fit micro-batch --memory-budget-gib 8 --nproc 2   # the largest micro batch that fits

Measuring: sweep (flags -> configurations), engines (built through yolods.build: TrainStep and the DDP
baseline), inputs, measure (timed steps, link probe, comms log), memory (peak and model-state bytes),
ultralytics_baseline, runner (one configuration on every rank), results (JSON lines), cli; tune (coordinate
descent over the runner's measurements), fit and fit_child (the largest value that fits, a fresh job per point).
Reporting: comm_model (the analytical model and the ZeRO paper's formulas, pure functions), analysis, plots,
report (with report_options: each memory or communication option against the line without it).
benchmarks/README.md explains the figures.
Shared with benchmarks/parity.py: environment (versions, machine, yolods commit) and ultralytics_child (the
Ultralytics trainer in a child process).
"""
