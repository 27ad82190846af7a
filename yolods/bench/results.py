"""results.jsonl: one JSON line per measured configuration, with versions, hardware and machine load.

Lines are appended, so the same command run on 1, 2, 4, 8 nodes (or at 1 and 2 ranks) fills one file; the report
reads them all. Keys every line has are listed in REQUIRED_KEYS. Schema 2 adds `source`: the yolods commit, whether
the tree was dirty and what was uncommitted (provenance.py), which the report counts and flags.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path
from typing import Any

import torch

from yolods import dist
from yolods.bench import environment, provenance

RESULTS_FILE = "results.jsonl"
SCHEMA_VERSION = 2
REQUIRED_KEYS = (
    "engine",
    "zero_stage",
    "precision",
    "world_size",
    "num_nodes",
    "micro_batch",
    "imgsz",
    "model",
    "input",
    "imgs_per_s",
    "peak_mem_bytes",
)


def versions() -> dict[str, str | None]:
    """Library versions, and the yolods commit measured with '-dirty' when yolods/ differs from it (untracked
    files included)."""
    import yolods

    source = environment.source_state()
    return {
        **environment.library_versions("deepspeed", "ultralytics"),
        "yolods": yolods.__version__,  # the package this process runs, whichever distribution is installed
        "yolods_commit": source.label if source else None,
        **environment.torch_build(),
    }


def hardware(device: torch.device, *, hostnames: list[str]) -> dict[str, Any]:
    """This job's machines: CPU, GPU model and count, hosts."""
    info: dict[str, Any] = {
        **environment.machine(),
        "torch_threads_per_rank": torch.get_num_threads(),
        "hosts": sorted(set(hostnames)),
    }
    if device.type == "cuda":
        info.update(environment.gpu(device))
    return info


def interconnect(*, backend: str, label: str, link_probe: dict[str, Any] | None) -> dict[str, Any]:
    """What is known about the links: the backend, the user's label, and the measured all-reduce fit."""
    known: dict[str, Any] = {"backend": backend, "label": label or None}
    for variable in ("NCCL_IB_HCA", "NCCL_SOCKET_IFNAME", "NCCL_NET", "GLOO_SOCKET_IFNAME"):
        if os.environ.get(variable):
            known[variable] = os.environ[variable]
    if link_probe is not None:
        known["probe"] = link_probe
    return known


def run_context(device: torch.device, *, label: str, link_probe: dict[str, Any] | None) -> dict[str, Any]:
    """What every line of this run shares; call on every rank (it gathers hostnames)."""
    from yolods.bench.measure import all_gather_object

    hostnames = all_gather_object(socket.gethostname())
    import torch.distributed as torch_dist

    backend = torch_dist.get_backend() if torch_dist.is_initialized() else "none"
    return {
        "world_size": dist.get_world_size(),
        "num_nodes": max(dist.get_num_nodes(), len(set(hostnames))),
        "ranks_per_node": dist.get_local_world_size(),
        "versions": versions(),
        "source": provenance.source_record(),
        "hardware": hardware(device, hostnames=hostnames),
        "interconnect": interconnect(backend=backend, label=label, link_probe=link_probe),
    }


def make_line(measured: dict[str, Any], *, context: dict[str, Any]) -> dict[str, Any]:
    """A results line: the measurement, the run's context, a timestamp and the machine's load."""
    line = {
        "schema": SCHEMA_VERSION,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **measured,
        **context,
        # 1/5/15-minute load averages: on a shared machine they say how much else was running
        "load_avg": list(os.getloadavg()),
    }
    missing = [key for key in REQUIRED_KEYS if key not in line]
    assert not missing, f"results line lacks {missing}"  # internal invariant: the writer builds every key
    return line


def append_line(out_dir: Path, line: dict[str, Any]) -> Path:
    """Append one line to out_dir/results.jsonl (rank 0 only) and return the file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RESULTS_FILE
    with path.open("a") as file:
        file.write(json.dumps(line, sort_keys=True) + "\n")
    return path


# what every line the bench has ever written holds (later keys are newer: old committed lines lack them)
_ESSENTIAL_KEYS = ("engine", "model", "imgsz", "world_size", "imgs_per_s", "timestamp")


def read_lines(path: Path, *, skipped: list[str] | None = None) -> list[dict[str, Any]]:
    """Every results line of a results.jsonl. Blank lines are passed over; a line that is not one of the bench's
    (a bench killed mid-write leaves a truncated last line; a hand edit, anything) is left out, and where
    `skipped` is given, `path:N: why` is appended to it."""
    lines = []
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError as error:
            why = f"not JSON ({error.msg})"
        else:
            missing = [key for key in _ESSENTIAL_KEYS if not isinstance(line, dict) or key not in line]
            if not missing:
                lines.append(line)
                continue
            why = f"not a bench line (no {', '.join(missing)})"
        if skipped is not None:
            skipped.append(f"{path}:{number}: {why}")
    return lines
