"""DeepSpeed's all-gathers on gloo go through one broadcast per rank and give what torch's all-gather gives."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import ranks_command, train_env

PROBE = Path(__file__).with_name("gloo_collectives_probe.py")


def test_broadcast_all_gather_equals_torchs_on_two_gloo_ranks():
    result = subprocess.run(
        [*ranks_command(2), str(PROBE)],
        env=train_env(),
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for case in ("separate input torch.float32", "separate input torch.bfloat16", "aliased input, subgroup, async"):
        assert f"{case}: ok" in result.stderr
    assert "2-d output: ok" in result.stderr and "non-contiguous output: ok" in result.stderr
