"""Resume a run on this job's number of ranks and save what was loaded as a new tag, for the reshard tests.

    python -m torch.distributed.run --nproc_per_node M tests/reshard_probe.py RUN_DIR TAG

The run was saved by some other number of ranks; the test compares the new tag, written in this job's layout,
with the one it was loaded from.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yolods  # noqa: F401  (offline environment first)
from yolods import dist
from yolods.build import build_trainer
from yolods.preemption import StopRequest
from yolods.train import plan_run


def main(run_dir: str, tag: str) -> None:
    plan, resume_dir = plan_run(["--resume", run_dir])
    dist.init_distributed(plan.cfg.device, verbose=False)
    trainer = build_trainer(plan, Path(resume_dir), stop_request=StopRequest())
    rank_state = trainer.rank_state_dict(trainer.resumed_loss_sums, data_state=trainer.train_data.state_dict())
    trainer.checkpointer.save(tag, client_state=trainer.state_dict(), rank_state=rank_state)
    trainer.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
