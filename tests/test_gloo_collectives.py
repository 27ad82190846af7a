"""DeepSpeed's all-gathers and reduce-scatters on gloo go through one broadcast or reduce per rank and give what
torch's own collectives give."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import ranks_command, train_env

PROBE = Path(__file__).with_name("gloo_collectives_probe.py")


def test_routed_collectives_equal_torchs_on_two_gloo_ranks():
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
    for case in ("in place torch.float32", "in place torch.bfloat16", "above the group size", "subgroup, async"):
        assert f"reduce-scatter {case}: ok" in result.stderr
    assert "reduce-scatter separate output: ok" in result.stderr
