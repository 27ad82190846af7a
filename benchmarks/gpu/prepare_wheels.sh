#!/usr/bin/env bash
# Fill .whl/ (ignored by git) with the Python packages the GPU machine lacks, for benchmarks/gpu/run.sh to
# install there (`pip install --no-index --no-deps --target /tmp/site .whl/*.whl`): nothing can be fetched there.
#
#   bash benchmarks/gpu/prepare_wheels.sh          # run here, in the checkout the device tool sends, with pip online
#
# The machine (/work/.library/device/KINDS.md, read 2026-11-17) has Python 3.12, torch 2.11 + CUDA 13,
# torchvision, numpy, opencv-python-headless, matplotlib, pillow, pyyaml, requests, psutil, tqdm, packaging,
# einops, msgpack, ninja, py-cpuinfo, nvidia-ml-py, tensorboard, typing-extensions; it lacks deepspeed,
# ultralytics and what they need beyond that: hjson, pydantic (+ pydantic-core, annotated-types,
# typing-inspection), ultralytics-thop. The check at the end reads every wheel's Requires-Dist and fails on one
# that is neither carried, nor on the machine, nor left out on purpose (LEFT_OUT below says why).
# Versions: what this environment runs (the tested set: constraints.txt), else the fallbacks below.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
DEST=.whl
LIMIT_MIB=60  # the device tool carries 64 MiB a call, the working tree (~3 MiB) included

version_of() {  # DISTRIBUTION FALLBACK: the version installed here, else FALLBACK
    "$PY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: print(sys.argv[2])" "$1" "$2"
}

# deepspeed is built from its source distribution with no ops compiled (DS_BUILD_OPS=0): a pure-python wheel.
# DeepSpeed JIT-builds an op on first use only; yolods' path (torch optimizers, NCCL) uses none on CUDA.
DEEPSPEED="deepspeed==$(version_of deepspeed 0.19.8)"
PACKAGES=(
    "ultralytics==$(version_of ultralytics 8.4.190)"
    "ultralytics-thop==$(version_of ultralytics-thop 2.2.3)"
    "hjson==$(version_of hjson 3.1.0)"
    "pydantic==$(version_of pydantic 2.14.4)"
    "pydantic-core==$(version_of pydantic-core 2.50.5)"
    "annotated-types==$(version_of annotated-types 0.8.0)"
    "typing-inspection==$(version_of typing-inspection 0.4.5)"
    # the machine has typing-extensions, of a version not recorded; pydantic needs a recent one
    "typing-extensions==$(version_of typing-extensions 4.16.0)"
)

rm -rf "$DEST.tmp"
mkdir -p "$DEST.tmp"
echo "building ${DEEPSPEED} (pure python, DS_BUILD_OPS=0) ..."
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-cache-dir --no-binary deepspeed \
    -w "$DEST.tmp" "$DEEPSPEED"
echo "downloading ${PACKAGES[*]} for CPython 3.12, manylinux x86_64 ..."
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST.tmp" "${PACKAGES[@]}"

"$PY" - "$DEST.tmp" "$LIMIT_MIB" <<'PYTHON'
"""Every Requires-Dist of every wheel: carried, on the machine, or left out on purpose; one wheel per name;
the total under the limit."""
import re
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement

# /work/.library/device/KINDS.md, "Python packages already there" on nvidia-h200 (read 2026-11-17), abridged to
# the names any of these wheels could ask for.
MACHINE = set(
    "certifi charset-normalizer contourpy cycler einops filelock fonttools fsspec idna jinja2 kiwisolver "
    "markupsafe matplotlib msgpack networkx ninja numpy nvidia-ml-py opencv-python-headless packaging pandas "
    "pillow psutil py-cpuinfo pyparsing python-dateutil pyyaml requests scipy six sympy tensorboard torch "
    "torchvision tqdm triton typing-extensions urllib3".split()
)
LEFT_OUT = {
    "opencv-python": "the machine has opencv-python-headless, which provides the same cv2",
    "polars": "Ultralytics imports it lazily, for results export and plots only: not on the bench's path "
    "(plots=False, no results.csv before the timed batches end)",
    "polars-runtime-32": "polars' runtime (see polars)",
    "ultralytics-platform": "Ultralytics imports it lazily, for its Platform API only",
}
MARKERS = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "extra": "",
}


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


folder, limit_mib = Path(sys.argv[1]), float(sys.argv[2])
wheels = sorted(folder.glob("*.whl"))
carried: dict[str, Path] = {}
for wheel in wheels:
    name = normal(wheel.name.split("-")[0])
    if name in carried:
        sys.exit(f"two wheels of {name}: {carried[name].name} and {wheel.name} (two versions stop the install)")
    carried[name] = wheel
problems, notes = [], []
for name, wheel in carried.items():
    with zipfile.ZipFile(wheel) as archive:
        metadata_name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(metadata_name).decode())
    for text in metadata.get_all("Requires-Dist") or []:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate(MARKERS):
            continue  # an extra, another platform or Python
        needed = normal(requirement.name)
        if needed in carried or needed in MACHINE:
            continue
        if needed in LEFT_OUT:
            notes.append(f"  {name} -> {needed}: left out: {LEFT_OUT[needed]}")
            continue
        problems.append(f"  {name} needs {text}: neither carried nor on the machine")
total = sum(wheel.stat().st_size for wheel in wheels)
for wheel in wheels:
    print(f"  {wheel.stat().st_size / 2**20:6.2f} MiB  {wheel.name}")
print(f"  {total / 2**20:6.2f} MiB  total, {len(wheels)} wheels (limit {limit_mib:g} MiB)")
print("\n".join(notes))
if problems:
    sys.exit("unmet requirements:\n" + "\n".join(problems))
if total > limit_mib * 2**20:
    sys.exit(f"{total / 2**20:.1f} MiB of wheels: over {limit_mib:g} MiB")
PYTHON

rm -rf "$DEST"
mv "$DEST.tmp" "$DEST"
echo "$DEST/ is ready. git ignores it (.gitignore: /.whl/); carry it: device run with carry [\".whl\"]."
