"""Benchmark suite: throughput, step-time breakdown, communication and memory per rank, against world size.

    python -m yolods.bench [--zero 0,1,2,3] [--model n,s] [--input synthetic,real] --out DIR   # measure, append
    python -m yolods.bench.report DIR                                                         # report.md + PNGs

Measuring: sweep (flags -> configurations), engines (built through yolods.build: TrainStep and the DDP
baseline), inputs, measure (timed steps, link probe, comms log), memory (peak and model-state bytes),
ultralytics_baseline, runner (one configuration on every rank), results (JSON lines), cli. Reporting: comm_model (the analytical model
and the ZeRO paper's formulas, pure functions), analysis, plots, report. benchmarks/README.md explains the figures.
Shared with benchmarks/parity.py: environment (versions, machine, yolods commit) and ultralytics_child (the
Ultralytics trainer in a child process).
"""
