"""The Ultralytics trainer, `YOLO(model).train(...)`, in a child process: the one runner behind the bench's
Ultralytics baseline (ultralytics_baseline) and benchmarks/parity.py's reference rows.

The child is a fresh interpreter started with child_env(): without the launcher's variables, because Ultralytics
reads RANK/WORLD_SIZE at import and would otherwise believe it is a DDP worker of the caller's job; and apart from
the caller, so Ultralytics' global state (seeds, deterministic mode, callbacks, the functions patched here)
never touches it. The child stays off the network: YOLO_OFFLINE=1, the two checks that fetch files stubbed, and
with `block_network` every non-loopback connection or name lookup refused and marked in its log.

With `result`, the child also records the time of every batch end (on_train_batch_end, after a CUDA
synchronize) and peak memory, and writes them there as JSON; `stop_after_batches` ends training after that many
batch ends, before validation or a final checkpoint.

    python -m yolods.bench.ultralytics_child SPEC_JSON      # what child_command(spec) runs
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from yolods.dist import LAUNCHER_VARIABLES

# Printed (to stderr) on every refused connection or lookup: a caller counts these in the child's log.
NETWORK_MARKER = "yolods.bench.ultralytics_child: blocked network access"


@dataclass(frozen=True)
class ChildSpec:
    """What one child trains, and how; it crosses to the child as JSON, so every value must be JSON."""

    model: str  # a model yaml: built from scratch, never downloaded
    train: dict[str, Any] = field(default_factory=dict)  # keyword arguments of YOLO.train
    block_network: bool = False  # refuse every non-loopback connection and name lookup, printing NETWORK_MARKER
    # Train on the torch thread count the child starts with (OMP_NUM_THREADS from child_env), not on the
    # cpu_count - 1 that Ultralytics' select_device sets on CPU.
    keep_torch_threads: bool = False
    result: str | None = None  # where to write batch-end times and peak memory (JSON); None records nothing
    stop_after_batches: int | None = None  # end training after this many batch ends (with `result`)


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child that starts a job of its own: this one minus the launcher's variables (it
    must not believe it is a rank of the caller's job), offline Ultralytics, unbuffered output, then `extra`."""
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARIABLES}
    env.update(YOLO_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
    return env


def child_command(spec: ChildSpec) -> list[str]:
    """The command line of a child that trains `spec` (run it with env=child_env(...))."""
    return [sys.executable, "-m", "yolods.bench.ultralytics_child", json.dumps(asdict(spec))]


def block_network() -> None:
    """Refuse every non-loopback connection and name lookup in this process, loudly, so an attempt shows in the
    log: Ultralytics catches most network errors and would otherwise carry on silently."""
    loopback = {"localhost", "127.0.0.1", "::1", "", None}
    original_connect, original_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else None
        if self.family in (socket.AF_INET, socket.AF_INET6) and host not in loopback:
            print(f"{NETWORK_MARKER}: connect {address}", file=sys.stderr, flush=True)
            raise OSError(f"network disabled by yolods.bench.ultralytics_child ({address})")
        return original_connect(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if host not in loopback:
            print(f"{NETWORK_MARKER}: resolve {host}", file=sys.stderr, flush=True)
            raise socket.gaierror(f"network disabled by yolods.bench.ultralytics_child ({host})")
        return original_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = connect
    socket.getaddrinfo = getaddrinfo


def _prepare_ultralytics(*, keep_torch_threads: bool) -> None:
    """Stub the two checks that reach the network, and optionally keep this process's torch thread count.

    check_det_dataset asks for a plot font and, when it is missing, HEADs a URL even offline; check_amp
    downloads a model to compare outputs. On CPU select_device sets torch to cpu_count - 1 threads.
    """
    import torch
    import ultralytics.data.utils as data_utils
    import ultralytics.engine.trainer as trainer_module
    import ultralytics.utils.torch_utils as torch_utils

    data_utils.check_font = lambda *args, **kwargs: None  # fonts only matter for plots
    trainer_module.check_amp = lambda *args, **kwargs: True  # the check downloads a model to compare outputs
    if keep_torch_threads:
        torch_utils.NUM_THREADS = torch.get_num_threads()


class _StopTraining(Exception):
    """Raised from the batch-end callback once enough batches ran: no validation, no final checkpoint."""


def train(spec: ChildSpec) -> None:
    """Train `spec` in this process (a fresh one: see child_command); write its record to `spec.result`, if set."""
    if spec.block_network:
        block_network()
    os.environ["YOLO_OFFLINE"] = "1"  # as `import yolods` does; Ultralytics reads it once, at import
    import torch
    from ultralytics import YOLO

    from yolods.bench.memory import PeakMemory

    _prepare_ultralytics(keep_torch_threads=spec.keep_torch_threads)
    model = YOLO(spec.model)
    if spec.result is None:
        model.train(**spec.train)
        return
    # Ultralytics trains on its first listed device here; "cpu" or a CUDA index.
    device = torch.device("cpu") if str(spec.train.get("device", "cpu")) == "cpu" else torch.device("cuda", 0)
    batch_ends: list[float] = []

    def on_train_batch_end(trainer: Any) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the batch's kernels are done, not only queued
        batch_ends.append(time.perf_counter())
        if spec.stop_after_batches is not None and len(batch_ends) >= spec.stop_after_batches:
            raise _StopTraining

    model.add_callback("on_train_batch_end", on_train_batch_end)
    peak = PeakMemory(device)
    peak.reset()
    try:
        model.train(**spec.train)
    except _StopTraining:
        pass
    record = {
        "batch_end_s": batch_ends,
        "peak_mem_bytes": peak.peak_bytes(),
        "peak_mem_source": peak.source,
        "torch_threads": torch.get_num_threads(),
    }
    Path(spec.result).write_text(json.dumps(record))


def main(argv: list[str] | None = None) -> int:
    (spec_json,) = argv if argv is not None else sys.argv[1:]
    train(ChildSpec(**json.loads(spec_json)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
