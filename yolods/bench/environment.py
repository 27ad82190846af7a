"""What a measurement ran on: library versions, the machine, and the yolods source (commit, uncommitted files).

The one environment capture of the bench (results.jsonl's `versions` and `hardware`) and of
benchmarks/parity.py (parity.json's `environment` and `yolods_code`). Each caller shapes these pieces into its
own record; nothing here imports deepspeed or ultralytics, so a parent that only launches them stays light.
"""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

# The yolods package this process imported: its source is what a measurement measures.
PACKAGE_DIR = Path(__file__).resolve().parents[1]


def library_versions(*packages: str) -> dict[str, str | None]:
    """Installed versions of `packages`, in the order given (None for one not installed), then Python's.

    Read from the distributions' metadata, so nothing is imported; torch's local build tag (e.g. `+cu130`) is
    not in its metadata: torch_build() has it.
    """
    versions: dict[str, str | None] = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    versions["python"] = platform.python_version()
    return versions


def torch_build() -> dict[str, str | None]:
    """torch as built: its full version string, the CUDA it was built for, and NCCL's version when CUDA is usable."""
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
    }


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or what `platform` knows where that file is missing."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """This host: operating system, CPU model, logical CPU count."""
    return {"platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count()}


def gpu(device: torch.device) -> dict[str, Any]:
    """A CUDA device's model and memory, and how many CUDA devices this host has."""
    properties = torch.cuda.get_device_properties(device)
    return {
        "gpu": properties.name,
        "gpu_memory_bytes": properties.total_memory,
        "gpus_per_node": torch.cuda.device_count(),
    }


@dataclass(frozen=True)
class SourceState:
    """Where a source tree stands in git."""

    commit: str  # HEAD of the repository that holds the tree
    changes: tuple[str, ...]  # `git status --porcelain` lines under the tree: modified, staged, untracked

    @property
    def label(self) -> str:
        """The commit, with '-dirty' when the tree differs from it."""
        return self.commit + ("-dirty" if self.changes else "")


def source_state(path: Path = PACKAGE_DIR, *, short: bool = False) -> SourceState | None:
    """The git commit and uncommitted changes of `path` (a directory); None without git or outside a repository.

    git runs in `path` itself, so the answer is about the repository holding that source, whatever the caller's
    working directory. `short` abbreviates the commit as `git rev-parse --short` does.
    """
    path = Path(path).resolve()

    def git(*args: str, check: bool) -> str:
        return subprocess.run(
            ["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10, check=check
        ).stdout

    try:
        commit = git("rev-parse", *(["--short"] if short else []), "HEAD", check=True).strip()
        # Unchecked: a status that cannot be read counts as clean rather than losing the commit. Lines are kept
        # whole, as their leading column says whether a change is staged.
        changes = git("status", "--porcelain", "--", str(path), check=False).splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    return SourceState(commit=commit, changes=tuple(changes))
