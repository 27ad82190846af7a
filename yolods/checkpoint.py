"""Run directories, and the Checkpointer: DeepSpeed checkpoints (every rank) and Ultralytics-format weights (rank 0).

A running job never loses a checkpoint. Weights are written to a temporary file and renamed into place. A
DeepSpeed tag counts as complete only once every rank's shard and per-rank state are on disk and rank 0 has
written the tag's marker file last; `latest` is updated after the marker, and an older tag is deleted only
after a newer one is complete. On resume the newest complete tag whose files open and pass their CRC checks is
taken; a damaged or unfinished one is skipped with a warning naming it and why, and one saved by another number
of ranks is re-split (yolods.reshard). Besides every epoch's end, a run checkpoints mid-epoch on a SavePeriod. A
run directory records the launcher job that made it, so that the job's restarted attempts continue it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from yolods import dist, env
from yolods.config import RunConfig, check_setting_types, check_setting_values, write_json
from yolods.errors import ConfigError
from yolods.reshard import load_resharded, merge_rank_states

CHECKPOINT_DIR = "checkpoints"
COMPLETE_MARKER = "yolods_complete.json"  # written by rank 0 once every rank's files of a tag are on disk
RUN_LOCK = ".yolods.lock"  # flocked by the job training in the run directory (see take_run_dir)
JOB_RECORD = "job.json"  # the launcher job that made a run directory (see continue_launcher_job)
KEEP_CHECKPOINTS = 2  # the newest complete tag, and the one before it in case the newest is damaged later


def new_run_dir(cfg: RunConfig) -> Path:
    """project/name, or the next free name (exp, exp2, ...) unless --exist_ok, with weights/ in it; taken by this job
    (`take_run_dir`) before anything is written into it."""
    run_dir = make_run_dir(project=cfg.project, name=cfg.name, exist_ok=cfg.exist_ok, subdir="weights")
    take_run_dir(run_dir)
    # --exist_ok into a run that holds checkpoints would mix two runs: a later --resume would load the old run's
    # newest checkpoint under the new run's settings. Rank 0 looks; the directory need not be shared.
    if dist.broadcast_object(dist.is_main_process() and bool(complete_tags(run_dir))):
        raise ConfigError(
            f"--name {cfg.name} --exist_ok: {run_dir} already holds a run with checkpoints; continue it with "
            f"--resume {run_dir}, or start this run under another --name (or delete {run_dir} first)"
        )
    if dist.is_main_process():
        _write_job_record(run_dir)  # so that a restarted attempt of this launcher job continues it
    return run_dir


_held_run_locks: dict[Path, Any] = {}  # open lock files: their flocks mark this process's run directories taken


def take_run_dir(run_dir: Path) -> None:
    """Refuse, on every rank, a run directory another live yolods job is training in; else mark it taken by this one.

    Two jobs in one directory (a scheduler's requeue while the first still runs, a command started twice, a second
    --resume) wrote the same results.csv, weights and checkpoint tags: QA found every epoch's row twice and one job
    dead on the other's weights/best.pt.tmp. Rank 0 holds an exclusive flock on RUN/.yolods.lock for the life of its
    process (the kernel releases it at any exit, SIGKILL included, so a dead job never blocks a resume). A collective.
    """
    holder = _lock_or_holder(run_dir / RUN_LOCK) if dist.is_main_process() else None
    holder = dist.broadcast_object(holder)
    if holder is not None:
        raise ConfigError(
            f"{run_dir} is in use by another yolods job ({holder}): two jobs in one run directory would mix their "
            "checkpoints and results; wait for that job to end (or stop it), or start this run under another --name"
        )


def _lock_or_holder(path: Path) -> str | None:
    """Take the run's lock: None when taken, else who holds it. A file system without locks is not refused."""
    import fcntl
    import socket

    if path in _held_run_locks:  # this process's own (main() called again in one process)
        return None
    try:
        lock_file = path.open("a+")  # "a+": the holder's note stays readable to the one refused
    except OSError:
        return None
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        holder = lock_file.read().strip() or "its process id unknown"
        lock_file.close()
        return holder
    except OSError:  # ENOLCK, EOPNOTSUPP: some network and FUSE mounts keep no locks
        lock_file.close()
        return None
    lock_file.truncate(0)
    lock_file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock_file.flush()
    _held_run_locks[path] = lock_file
    return None


def make_run_dir(*, project: str, name: str, exist_ok: bool, subdir: str = "") -> Path:
    """project/name, or the next free name (exp, exp2, ...) unless `exist_ok`; created by rank 0, named on all ranks.

    A collective. Raises ConfigError on every rank when the directory cannot be created.
    """
    run_dir, error = None, None
    if dist.is_main_process():
        base = Path(project) / name
        run_dir, suffix = base, 2
        while run_dir.exists() and not exist_ok:
            run_dir, suffix = base.with_name(f"{base.name}{suffix}"), suffix + 1
        try:
            (run_dir / subdir).mkdir(parents=True, exist_ok=True)
        except OSError as caught:  # a file where a directory should be, no permission, read-only file system
            error = f"--project {project} --name {name}: cannot create {run_dir} ({caught.strerror}); choose another --project"
        run_dir = str(run_dir.resolve())
    run_dir, error = dist.broadcast_object((run_dir, error))
    if error:
        raise ConfigError(error)
    return Path(run_dir)


def _write_job_record(run_dir: Path) -> None:
    """Note which launcher job made the run directory, so that the job's later attempts continue it."""
    job = env.launcher_job()
    if job is not None:
        write_json(run_dir / JOB_RECORD, {"job": job.key, "created_at": time.time()})


def _run_dir_of_job(project: Path, job_key: str) -> Path | None:
    """The newest run directory under `project` that an earlier attempt of the job made, if any."""
    records = sorted(project.glob(f"*/{JOB_RECORD}"), key=lambda record: record.stat().st_mtime, reverse=True)
    for record in records:
        try:
            if json.loads(record.read_text()).get("job") == job_key:
                return record.parent.resolve()
        except (OSError, ValueError):
            continue  # another run's unreadable record is none of this job's business
    return None


def continue_launcher_job(cfg: RunConfig) -> RunConfig:
    """The run config that continues this job's run directory, when a launcher started the job again.

    torchrun (--max-restarts), SLURM (--requeue) or a retry loop run the same command line again; its first
    attempt recorded the job in the run directory it made (see env.launcher_job). A later attempt resumes that
    directory from its newest complete checkpoint, or starts over in it when it has none yet. Unchanged `cfg`
    for a first attempt, an explicit --resume, or a launcher that cannot restart.
    """
    job = env.launcher_job()
    if cfg.resume is not None or job is None or not job.may_be_restart:
        return cfg
    run_dir = _run_dir_of_job(Path(cfg.project), job.key)
    if run_dir is None:
        return cfg
    if complete_tags(run_dir):
        dist.print_main(
            f"yolods: {run_dir} is this job's ({job.key}): continuing it from its newest complete checkpoint"
        )
        return replace(cfg, resume=str(run_dir))
    dist.print_main(f"yolods: {run_dir} is this job's ({job.key}) but holds no complete checkpoint: starting it over")
    return replace(cfg, project=str(run_dir.parent), name=run_dir.name, exist_ok=True)


def remove_unfinished_run_dir(run_dir: Path) -> None:
    """Delete a run directory whose start failed before it held any checkpoint or weights (rank 0)."""
    if dist.is_main_process() and not complete_tags(run_dir) and not any((run_dir / "weights").glob("*.pt")):
        shutil.rmtree(run_dir, ignore_errors=True)


def complete_tags(run_dir: Path) -> list[Path]:
    """The run's complete checkpoint tags, newest first.

    Ordered by the save time each marker holds, not by file times: `cp -r`, scp and object stores do not keep
    those, and a copied run directory resumed from whichever tag happened to be copied last.
    """
    markers = (run_dir / CHECKPOINT_DIR).glob(f"*/{COMPLETE_MARKER}")
    tags = [marker.parent for marker in markers if _marker_is_readable(marker.parent)]
    return sorted(tags, key=_saved_at, reverse=True)


def _marker_is_readable(tag_dir: Path) -> bool:
    """A marker cut off mid-write (a full disk, a crash) leaves its tag unfinished, as a missing marker does; read
    later for the tag's world size, it failed the resume with a bare JSONDecodeError."""
    try:
        return isinstance(_marker(tag_dir).get("world_size"), int)
    except (OSError, ValueError, AttributeError):
        return False


def _marker(tag_dir: Path) -> dict[str, Any]:
    """What rank 0 wrote into a complete tag's marker (tag, world_size, saved_at, finished)."""
    return json.loads((tag_dir / COMPLETE_MARKER).read_text())


def _saved_at(tag_dir: Path) -> float:
    """When rank 0 marked a tag complete, from its marker's contents (which a copy keeps), else the file's time."""
    try:
        return float(_marker(tag_dir)["saved_at"])
    except (OSError, ValueError, KeyError, TypeError):
        return (tag_dir / COMPLETE_MARKER).stat().st_mtime


def run_finished(tag_dir: Path, *, epochs: int) -> bool:
    """Whether a complete tag ends its run: the last epoch's, or one saved after patience ended the run early."""
    try:
        marker = _marker(tag_dir)
    except (OSError, ValueError):
        return False
    return bool(marker.get("finished", tag_dir.name == f"epoch{epochs}"))


def find_resume_dir(cfg: RunConfig) -> Path:
    """The run to resume: --resume DIR, or the newest run under --project that has a complete checkpoint."""
    if cfg.resume:
        run_dir = Path(cfg.resume)
        if not (run_dir / "args.yaml").is_file():
            # Ultralytics resumes from weights/last.pt; yolods from the run directory that holds it
            enclosing = next((parent for parent in run_dir.parents[:2] if (parent / "args.yaml").is_file()), None)
            fix = f": pass the run directory, --resume {enclosing}" if enclosing else " (no args.yaml there)"
            raise ConfigError(f"--resume {cfg.resume}: not a yolods run directory{fix}")
        if not complete_tags(run_dir):
            raise ConfigError(
                f"--resume {cfg.resume}: no complete checkpoint in {run_dir / CHECKPOINT_DIR}; the run stopped before its first one, start it again"
            )
        return run_dir.resolve()
    candidates = [run for run in Path(cfg.project).glob("*") if (run / "args.yaml").is_file() and complete_tags(run)]
    if not candidates:
        raise ConfigError(f"--resume: no run with a complete checkpoint under {cfg.project}; pass the run directory")
    return max(candidates, key=lambda run: _saved_at(complete_tags(run)[0])).resolve()


def saved_world_size(tag_dir: Path) -> int:
    """How many ranks saved a complete checkpoint tag."""
    return _marker(tag_dir)["world_size"]


def check_resume_world_size(run_dir: Path, *, world_size: int, zero_stage: int) -> None:
    """Refuse, in one line, the one checkpoint yolods cannot re-split for a new number of ranks.

    DeepSpeed's bf16 optimizer (a "bf16" config section at ZeRO-0) partitions its state in a format of its own;
    every other checkpoint resumes on any number of ranks (see yolods.reshard).
    """
    newest = complete_tags(run_dir)[0]
    saved = saved_world_size(newest)
    if saved != world_size and zero_stage == 0 and any(newest.glob("bf16_zero_pp_rank_*")):
        raise ConfigError(
            f"--resume {run_dir}: checkpoint {newest.name} holds DeepSpeed's bf16 optimizer (a bf16 section at ZeRO-0), "
            f"which only the {saved} ranks that saved it can load, not {world_size}; resume with {saved} ranks"
        )


def save_run_config(run_dir: Path, cfg: RunConfig) -> None:
    if dist.is_main_process():
        _atomic_write(run_dir / "args.yaml", yaml.safe_dump(asdict(cfg), sort_keys=False).encode())


def load_run_config(run_dir: Path) -> RunConfig:
    """The configuration a run started with; resuming continues it unchanged.

    Raises:
        ConfigError: args.yaml is empty, not YAML, or not a yolods run's settings.
    """
    args_yaml = run_dir / "args.yaml"
    fix = "restore it from a copy, or start a new run (--model a checkpoint's weights/last.pt to keep its weights)"
    try:
        saved = yaml.safe_load(args_yaml.read_text())
        if not isinstance(saved, dict):
            raise ValueError("empty" if saved is None else f"a {type(saved).__name__}, not settings")
        saved.setdefault("large_batch_rule", "ultralytics")  # runs saved before the flag existed had Ultralytics' rule
        cfg = RunConfig(**{**saved, "resume": str(run_dir)})
        check_setting_types(cfg)
    except (OSError, ValueError, TypeError, yaml.YAMLError) as caught:
        reason = " ".join(str(caught).split())[:200]
        raise ConfigError(f"--resume {run_dir}: {args_yaml} is not a yolods run's settings ({reason}); {fix}") from None
    try:
        check_setting_values(cfg)
    except ConfigError as error:
        raise ConfigError(f"--resume {run_dir}: {args_yaml} holds a value no run can take ({error}); {fix}") from None
    return cfg


def check_deepspeed_config_unchanged(run_dir: Path, cfg: RunConfig) -> None:
    """A resumed run keeps its DeepSpeed settings, as it keeps its flags: every setting in the --deepspeed_config
    file must still read as in the run's resolved ds_config.json (an edited stage resumed silently as another
    ZeRO stage, or failed inside DeepSpeed's checkpoint loader with a bare AssertionError).

    Raises:
        ConfigError: the settings that changed, each with the run's value.
    """
    from yolods.config import load_deepspeed_json

    resolved = run_dir / "ds_config.json"
    if cfg.deepspeed_config is None or not resolved.is_file():
        return
    run_had = _flat_settings(json.loads(resolved.read_text()))
    changed = [
        f"{key}={value} (run has {run_had.get(key, 'none')})"
        for key, value in _flat_settings(load_deepspeed_json(cfg.deepspeed_config)).items()
        if run_had.get(key) != value
    ]
    if changed:
        raise ConfigError(
            f"--resume {run_dir}: {cfg.deepspeed_config} changed since the run started ({', '.join(changed)}); a "
            "resumed run keeps its settings: restore the file, or start a new run"
        )


def _flat_settings(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'zero_optimization': {'stage': 2}} -> {'zero_optimization.stage': 2}"""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _atomic_write(path: Path, payload: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _watch_deepspeed_writes(engine, writing: Callable[[], contextlib.AbstractContextManager]) -> None:
    """Run each file write of DeepSpeed's checkpoint engine inside `writing()`; its barriers stay outside."""
    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    if checkpoint_engine is None or writing is contextlib.nullcontext:
        return
    save = checkpoint_engine.save

    def watched_save(*args, **kwargs):
        with writing():
            return save(*args, **kwargs)

    checkpoint_engine.save = watched_save  # this engine's instance only


def _load_rank_state(tag_dir: Path, rank: int) -> dict[str, Any]:
    # the run's own file; on the CPU, as DeepSpeed loads its own: a rank's CUDA tensors were saved on its GPU
    # (cuda:5, say), which need not exist here (fewer GPUs, another node layout, a CPU machine)
    return torch.load(tag_dir / f"yolods_rank{rank}.pt", map_location="cpu", weights_only=False)


@dataclass
class LoadedCheckpoint:
    """What `Checkpointer.load` restored into the engine, and what the Trainer restores itself."""

    client_state: dict[str, Any]
    rank_state: dict[str, Any]
    tag: str
    saved_world_size: int


def missing_file(tag_dir: Path, *, zero_stage: int) -> str | None:
    """The first file a complete tag should hold and does not (deleted or lost since), or None.

    Every saved rank's yolods_rankN.pt; DeepSpeed's model states; at ZeRO 1-3 each rank's optimizer partition
    (and at ZeRO-3 each rank's model partition), named as DeepSpeed names them (a dtype prefix such as bf16_).
    """
    ranks = saved_world_size(tag_dir)
    names = {path.name for path in tag_dir.glob("*.pt")}
    expected = [f"yolods_rank{rank}.pt" for rank in range(ranks)]
    if not any(name.endswith("model_states.pt") for name in names):
        return "its DeepSpeed model states (*model_states.pt) are missing"
    for suffix in ("_model_states.pt", "_optim_states.pt"):
        per_rank = sorted(name for name in names if name.endswith(suffix) and "zero_pp_rank_" in name)
        if per_rank:
            prefix = per_rank[0].split("zero_pp_rank_")[0]
            expected += [f"{prefix}zero_pp_rank_{rank}_mp_rank_00{suffix}" for rank in range(ranks)]
        elif suffix == "_optim_states.pt" and zero_stage > 0:
            return "its ZeRO optimizer partitions (*_optim_states.pt) are missing"
    missing = [name for name in expected if name not in names]
    return f"{missing[0]} is missing" if missing else None


def damaged_file(tag_dir: Path, *, rank: int = 0, world_size: int = 1) -> str | None:
    """The first file of a tag that does not open as a torch checkpoint, or whose bytes changed since they were
    written, with the reason; None if all are sound.

    torch.save writes zip archives whose directory sits at the end, so a file cut off mid-write fails to open
    (only the directory is read: every rank checks every file). torch.load does not check the CRC-32 each member
    carries, so a flipped bit loads silently into a weight or a moment; the CRCs are checked here, each rank over
    its own share of the files (`rank` of `world_size`), so that together the ranks read each byte once.
    """
    for index, path in enumerate(sorted(tag_dir.glob("*.pt"))):
        try:
            with zipfile.ZipFile(path) as archive:  # reads the directory
                corrupt_member = archive.testzip() if index % world_size == rank else None
        except (zipfile.BadZipFile, OSError, ValueError) as error:  # ValueError: a member's header damaged
            return f"{path.name}: {error}"
        if corrupt_member is not None:
            return f"{path.name}: its bytes changed since it was written ({corrupt_member} fails its CRC-32 check)"
    return None


class SavePeriod:
    """How often a run checkpoints mid-epoch, bounding the work a SIGKILL can lose: every `steps` optimizer steps
    and every `minutes` of wall time, whichever comes first (0 turns either off).

    Steps are counted alike on every rank. Clocks are not, so rank 0's decides and one 8-byte all-reduce per
    optimizer step tells the others (negligible beside a step of a YOLO model).
    """

    def __init__(self, *, steps: int = 0, minutes: float = 0.0):
        self.steps = steps
        self.minutes = minutes
        self.restart(0)

    def restart(self, optimizer_step: int) -> None:
        """Count from now: a checkpoint was just saved (or the run started) at `optimizer_step`."""
        self.last_step = optimizer_step
        self.last_s = time.monotonic()

    def due(self, optimizer_step: int) -> bool:
        by_steps = self.steps > 0 and optimizer_step - self.last_step >= self.steps
        if self.minutes <= 0:
            return by_steps
        clock_says = dist.is_main_process() and time.monotonic() - self.last_s >= 60 * self.minutes
        return dist.any_rank(clock_says) or by_steps  # the collective first: every rank must reach it


class Checkpointer:
    """Saves, prunes, finds and restores a run's state; every rank calls save/load, rank 0 alone writes shared files.

    Examples:
        >>> checkpointer = Checkpointer(run_dir, engine, train_args=vars(train_hyp))
        >>> checkpointer.save("epoch3", client_state=trainer.state_dict(), rank_state=trainer.rank_state_dict())
        >>> loaded = checkpointer.load()  # loaded.client_state, loaded.rank_state, loaded.tag
        >>> if checkpointer.mid_epoch_save_due(engine.global_steps): ...  # a collective with a time period
    """

    def __init__(
        self,
        run_dir: Path,
        engine,
        *,
        train_args: dict[str, Any],
        period: SavePeriod | None = None,
        writing: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ):
        self.run_dir = run_dir
        self.checkpoint_dir = run_dir / CHECKPOINT_DIR
        self.engine = engine
        self.train_args = {**train_args, "save_dir": str(run_dir)}
        self.period = period or SavePeriod()
        self.writing = writing  # around each file write (the fault watchdog's, which ends a job whose write hangs)
        _watch_deepspeed_writes(engine, writing)

    def save_run_files(self, cfg: RunConfig, ds_config: dict[str, Any]) -> None:
        """args.yaml (what --resume continues: this start's settings, which a resume keeps but for the flags it may
        change) and the resolved DeepSpeed config."""
        if dist.is_main_process():
            save_run_config(self.run_dir, cfg)
            write_json(self.run_dir / "ds_config.json", ds_config)

    def save(
        self, tag: str, *, client_state: dict[str, Any], rank_state: dict[str, Any], finished: bool = False
    ) -> None:
        """DeepSpeed checkpoint of model, optimizer and ZeRO partitions, plus this rank's own state. A collective.

        `finished`: the run ends with this tag (its marker says so, and a later --resume exits at once)."""
        tag_dir = self.checkpoint_dir / tag
        tag_dir.mkdir(parents=True, exist_ok=True)
        self._write(tag_dir / f"yolods_rank{dist.get_rank()}.pt", _torch_bytes(rank_state))
        self.engine.save_checkpoint(str(self.checkpoint_dir), tag=tag, client_state=client_state, save_latest=False)
        dist.barrier()  # every rank's files are on disk
        if dist.is_main_process():
            marker = {"tag": tag, "world_size": dist.get_world_size(), "saved_at": time.time(), "finished": finished}
            write_json(tag_dir / COMPLETE_MARKER, marker)
            _atomic_write(self.checkpoint_dir / "latest", tag.encode())  # for DeepSpeed's tools (zero_to_fp32)
            self._prune()
        self.period.restart(self.engine.global_steps)

    def mid_epoch_save_due(self, optimizer_step: int) -> bool:
        """Whether the run should checkpoint now, after optimizer step `optimizer_step`; the same on every rank.

        A collective when a time period is set (rank 0's clock decides), so every rank must call it at the same step.
        """
        return self.period.due(optimizer_step)

    def _prune(self) -> None:
        """Keep the newest complete tags; drop older ones and any unfinished tag a killed save left behind."""
        self._remove_tags_but(complete_tags(self.run_dir)[:KEEP_CHECKPOINTS])

    def _remove_unfinished_tags(self) -> None:
        """Drop what saves that never completed left behind (a job killed mid-save, a write that found the disk
        full): on a full disk that is the space the resume needs (QA: a 43 MB unfinished tag kept it full)."""
        self._remove_tags_but(complete_tags(self.run_dir))

    def _remove_tags_but(self, keep: list[Path]) -> None:
        for tag_dir in self.checkpoint_dir.iterdir():
            if tag_dir.is_dir() and tag_dir not in keep:
                shutil.rmtree(tag_dir, ignore_errors=True)

    def load(self) -> LoadedCheckpoint:
        """Load the newest complete, readable tag into the engine (every rank), on any number of ranks.

        A tag saved by as many ranks as this job has loads through DeepSpeed as saved; one saved by another number
        is re-split (yolods.reshard) and the saved ranks' own states merged.
        """
        if dist.is_main_process():
            self._remove_unfinished_tags()
        for tag_dir in complete_tags(self.run_dir):
            damage = missing_file(tag_dir, zero_stage=self.engine.zero_optimization_stage()) or damaged_file(
                tag_dir, rank=dist.get_rank(), world_size=dist.get_world_size()
            )
            damages = [found for found in dist.all_gather_objects(damage) if found is not None]
            if damages:  # all ranks move on together
                dist.print_main(f"WARNING: skipping checkpoint {tag_dir.name}: {damages[0]}")
                continue
            saved_ranks = saved_world_size(tag_dir)
            with self._model_must_fit(tag_dir):
                if saved_ranks == dist.get_world_size():
                    client_state = self._load_as_saved(tag_dir)
                    rank_state = _load_rank_state(tag_dir, dist.get_rank())
                else:
                    client_state = self._load_resharded(tag_dir, saved_world_size=saved_ranks)
                    rank_state = merge_rank_states([_load_rank_state(tag_dir, rank) for rank in range(saved_ranks)])
            self.period.restart(self.engine.global_steps)
            return LoadedCheckpoint(client_state, rank_state, tag=tag_dir.name, saved_world_size=saved_ranks)
        raise ConfigError(f"--resume {self.run_dir}: no complete, readable checkpoint in {self.checkpoint_dir}")

    @contextlib.contextmanager
    def _model_must_fit(self, tag_dir: Path):
        """A checkpoint whose tensors no longer fit the model built now: one line instead of torch's list of
        mismatched shapes (a data.yaml given more or fewer classes since the run started changes the head)."""
        try:
            yield
        except RuntimeError as error:
            if "size mismatch" not in str(error):  # load_state_dict's word for it; any other error stays as it is
                raise
            raise ConfigError(
                f"--resume {self.run_dir}: checkpoint {tag_dir.name} does not fit the model built now (a tensor's "
                "shape differs): the data.yaml's classes (nc, names) or the model changed since the run started; "
                f"put them back, or start a new run from {self.run_dir / 'weights' / 'last.pt'} (--model)"
            ) from error

    def _load_as_saved(self, tag_dir: Path) -> dict[str, Any]:
        load_path, client_state = self.engine.load_checkpoint(str(self.checkpoint_dir), tag=tag_dir.name)
        if load_path is None:
            raise ConfigError(f"--resume {self.run_dir}: DeepSpeed could not load checkpoint {tag_dir.name}")
        return client_state

    def _load_resharded(self, tag_dir: Path, *, saved_world_size: int) -> dict[str, Any]:
        if self.engine.zero_optimization_stage() == 0:
            return self._load_as_saved(tag_dir)  # rank 0 saved the whole model and optimizer: any number of ranks
        return load_resharded(self.engine, tag_dir, saved_world_size=saved_world_size)

    def export_weights(self, weights: dict[str, Any], *, is_best: bool) -> None:
        """weights/last.pt (and best.pt when `is_best`) from an Ultralytics checkpoint dict (rank 0 writes)."""
        if not dist.is_main_process():
            return
        payload = _torch_bytes({**weights, "train_args": self.train_args})
        weights_dir = self.run_dir / "weights"
        weights_dir.mkdir(parents=True, exist_ok=True)
        for name in ["last.pt"] + (["best.pt"] if is_best else []):
            self._write(weights_dir / name, payload)

    def _write(self, path: Path, payload: bytes) -> None:
        """One checkpoint file, atomically, watched for a hang (the payload is serialized before: no bytes move then)."""
        with self.writing():
            _atomic_write(path, payload)
