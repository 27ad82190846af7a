"""`python -m yolods.train`: parse -> resolve -> join the process group -> build -> train -> close.

    python -m yolods.train                                   # synthetic shapes, yolov8n, a few minutes on a CPU
    python -m yolods.train --data data.yaml --model yolov8s.yaml --epochs 100 --imgsz 640 --batch 64
    deepspeed --num_gpus 8 --module yolods.train --data coco.yaml --model yolo11m.yaml --batch 256 \\
        --deepspeed_config ds_configs/zero2_bf16.json
    deepspeed --hostfile hosts --num_nodes 4 --num_gpus 8 --module yolods.train ...
    torchrun --nproc_per_node 8 -m yolods.train ...          # srun under SLURM works the same
    torchrun --nproc_per_node 8 --max-restarts 3 -m yolods.train ...   # a dead rank: the group restarts and continues
    python -m yolods.train --resume runs/train/exp           # continue from its last checkpoint, on any number of ranks

Exit codes: 0 done; 2 a user mistake (one line, before heavy work); 143 or 130 stopped by SIGTERM/SIGUSR1 or
Ctrl-C with a checkpoint saved; 1 an error on some rank, which ended every rank (see yolods.faults).
"""

from __future__ import annotations

from pathlib import Path

from yolods import dist, heap
from yolods.config import (
    ConfigError,
    RunPlan,
    check_batch_resplit,
    given_flags,
    parse_args,
    resolve_run,
    resumed_config,
)
from yolods.errors import TrainingDiverged
from yolods.preemption import StopRequest, TrainingInterrupted


def plan_run(argv: list[str] | None) -> tuple[RunPlan | None, Path | None]:
    """Flags (or a resumed run's saved settings) -> RunPlan, checked on every rank before any process group exists.

    A run resumes on any number of ranks that keeps its global batch. Returns the plan and the run directory to
    resume (None for a new run); no plan for a run that had finished, on whatever number of ranks finds it.
    """
    from yolods import checkpoint

    world_size = dist.get_world_size()
    cfg = checkpoint.continue_launcher_job(parse_args(argv))  # a restarted torchrun/SLURM job goes on where it was
    if cfg.resume is None:
        return resolve_run(cfg, world_size=world_size), None
    resume_dir = checkpoint.find_resume_dir(cfg)
    cfg = resumed_config(checkpoint.load_run_config(resume_dir), cfg, given=given_flags(argv))
    newest = checkpoint.complete_tags(resume_dir)[0]
    if checkpoint.run_finished(newest, epochs=cfg.epochs):
        dist.print_main(f"{resume_dir} already finished ({newest.name} of {cfg.epochs} epochs); nothing to resume.")
        return None, resume_dir
    check_batch_resplit(cfg, saved_world_size=checkpoint.saved_world_size(newest), world_size=world_size)
    checkpoint.check_deepspeed_config_unchanged(resume_dir, cfg)  # first: its message says what changed
    plan = resolve_run(cfg, world_size=world_size)
    checkpoint.check_resume_world_size(resume_dir, world_size=world_size, zero_stage=plan.zero_stage)
    return plan, resume_dir


def main(argv: list[str] | None = None) -> int:
    """Train; returns the process exit code (see the module docstring). An error on any rank ends the job."""
    from yolods import faults

    stop_request = StopRequest().install()  # first: a stop that arrives during start-up is honoured too
    run_dir = resume_dir = watchdog = None
    try:
        with heap.collector_paused():
            dist.check_launcher_env()
            plan, resume_dir = plan_run(argv)
            if plan is None:  # a job started again after its run had finished
                return 0
            dist.init_distributed(plan.cfg.device, verbose=plan.cfg.verbose)
            if plan.cfg.verbose:
                dist.show_deepspeed_info_messages()
            watchdog = faults.JobWatchdog(stop_request).start()
            from yolods import checkpoint
            from yolods.build import build_trainer

            if resume_dir is not None:
                checkpoint.take_run_dir(resume_dir)  # a new run's is taken as it is made
            run_dir = resume_dir or checkpoint.new_run_dir(plan.cfg)
            trainer = build_trainer(
                plan,
                run_dir,
                stop_request=stop_request,
                on_step_phase=watchdog.progressed,
                checkpoint_writing=watchdog.writing,
            )
    except ConfigError as error:
        if watchdog is not None:
            watchdog.stop()  # every rank leaves with this error; rank 0 leaving first is no fault
        dist.print_main(f"yolods: error: {error}", every_rank=error.every_rank)
        if run_dir is not None and resume_dir is None:
            checkpoint.remove_unfinished_run_dir(run_dir)
        return 2
    except Exception as error:
        faults.abort_job(error, run_dir=run_dir)
    stopped = diverged = None
    try:
        trainer.train()
        exit_code = 0
    except TrainingInterrupted as interrupted:
        exit_code, stopped = interrupted.exit_code, str(interrupted)  # saved; the scheduler may requeue
    except TrainingDiverged as error:  # every rank, together: the job can shut down as after a normal end
        exit_code, diverged = 1, error
    except Exception as error:
        faults.abort_job(error, run_dir=run_dir)
    trainer.summarize(stopped=stopped)
    if diverged is not None:
        dist.print_main(f"yolods: error: {diverged}")  # last, where a user looks
    watchdog.stop()  # before the shutdown barrier, after which rank 0 may close the store
    trainer.close()
    return exit_code


if __name__ == "__main__":
    heap.finish_process(main())
