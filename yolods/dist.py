"""Rank and world helpers that work with or without a process group.

Before `init_distributed` (or in a plain single process) they read the launcher's environment, so code that
runs on one CPU needs no special case: `get_world_size()` is 1 and `is_main_process()` is True.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as torch_dist

# What launchers set for a process of a job; a child that must start a job of its own drops them.
LAUNCHER_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "GROUP_RANK",
)


# How long a collective may wait for a slow peer. The longest legitimate wait is the other ranks at a barrier
# while rank 0 builds the label cache of a large data set (COCO: a minute or two on local disk, more on a network
# file system). Faults never wait for it (yolods.faults ends the job in seconds); only a silently hung rank does.
COLLECTIVE_TIMEOUT_MIN = float(os.environ.get("YOLODS_COLLECTIVE_TIMEOUT_MIN", 30))


def ranks_phrase(count: int) -> str:
    """'1 rank', '8 ranks': for messages."""
    return f"{count} rank{'s' * (count != 1)}"


def _initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def get_rank() -> int:
    """Global rank of this process (0 without a process group)."""
    return torch_dist.get_rank() if _initialized() else int(os.environ.get("RANK", 0))


def get_world_size() -> int:
    """Number of processes in the job (1 without a process group)."""
    return torch_dist.get_world_size() if _initialized() else int(os.environ.get("WORLD_SIZE", 1))


def get_local_rank() -> int:
    """Rank of this process on its node; selects the GPU."""
    return int(os.environ.get("LOCAL_RANK", 0))


def get_local_world_size() -> int:
    """Processes on this node: LOCAL_WORLD_SIZE (torchrun, srun via yolods.env), LOCAL_SIZE (the deepspeed
    launcher), else one node."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", get_world_size())))


def get_num_nodes() -> int:
    """Nodes in the job, from world and local world sizes."""
    return max(1, get_world_size() // max(1, get_local_world_size()))


def is_main_process() -> bool:
    """True on the one rank that prints and writes shared files."""
    return get_rank() == 0


def is_local_main_process() -> bool:
    """True on the first rank of each node (LOCAL_RANK 0), which writes the node's own files."""
    return get_local_rank() == 0


def print_main(message: str, *, every_rank: bool = False) -> None:
    """Print once for the whole job (rank 0), or on `every_rank`, to stderr."""
    if every_rank or is_main_process():
        print(message, file=sys.stderr, flush=True)


def threads_per_rank() -> int:
    """torch threads for this rank: OMP_NUM_THREADS as the user set it before launching, else this process's
    cores shared among the node's ranks.

    Launchers disagree (torchrun sets OMP_NUM_THREADS=1, the deepspeed launcher leaves it unset), and
    `import ultralytics` sets it to 1 after torch has sized its pool, so the variable cannot be trusted by now.
    Oversubscribing, each rank a thread per core, cost 30% here (45 vs 65 img/s at 2 ranks on 2 cores).
    """
    from yolods import env

    if env.USER_OMP_NUM_THREADS and env.USER_OMP_NUM_THREADS.isdigit() and int(env.USER_OMP_NUM_THREADS) > 0:
        return int(env.USER_OMP_NUM_THREADS)
    cores = len(os.sched_getaffinity(0))  # what taskset, cgroups or SLURM's --cpus-per-task leave this process
    return max(1, cores // max(1, get_local_world_size()))


RENDEZVOUS_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")  # besides RANK and WORLD_SIZE, what DeepSpeed
# needs to join a group from the environment; without one it falls back to MPI discovery ("No module named mpi4py")


def check_launcher_env() -> None:
    """Refuse, in one line on every rank, launcher variables no launcher would leave: torch and DeepSpeed would
    otherwise plan for ranks that never come, wait for them, or look for MPI.

    Raises:
        ConfigError: RANK without WORLD_SIZE or the reverse, values that are not counts, a rank beyond the world,
            or several ranks with nowhere to meet (no MASTER_ADDR).
    """
    from yolods.errors import ConfigError

    rank, world_size = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if rank is None and world_size is None:
        return
    if rank is None or world_size is None:
        problem = (
            f"RANK={rank} is set but WORLD_SIZE is not"
            if world_size is None
            else f"WORLD_SIZE={world_size} is set but RANK is not"
        )
    elif not (rank.isdigit() and world_size.isdigit()):
        problem = f"RANK={rank} and WORLD_SIZE={world_size} are not counts"
    elif int(rank) >= int(world_size):
        problem = f"RANK={rank} is not a rank of WORLD_SIZE={world_size}"
    elif int(world_size) > 1 and (missing := [name for name in RENDEZVOUS_VARIABLES if not os.environ.get(name)]):
        problem = f"WORLD_SIZE={world_size} without {' and '.join(missing)} (the ranks would not meet)"
    else:
        return
    fix = "unset RANK and WORLD_SIZE to run one process, or start the job with torchrun, deepspeed or srun"
    raise ConfigError(f"{problem}: {fix}", every_rank=True)


def init_distributed(device_type: str, *, verbose: bool = True, for_deepspeed: bool = True) -> None:
    """Join the process group the launcher prepared (a group of one for a plain `python -m ...`).

    Gloo on CPU, NCCL on CUDA: chosen by DeepSpeed's accelerator for training; for inference jobs
    (`for_deepspeed=False`, no DeepSpeed engine) a plain torch.distributed group, which spares the DeepSpeed
    import. See COLLECTIVE_TIMEOUT_MIN for the timeout.
    """
    torch.set_num_threads(threads_per_rank())
    if _initialized():
        return
    if "RANK" not in os.environ:  # plain `python -m yolods.train`: a group of one, which DeepSpeed still needs
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    if get_world_size() == 1:  # alone (RANK=0 WORLD_SIZE=1 by hand too): the group meets here, on any free port
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("LOCAL_RANK", "0")
    # DeepSpeed's CPU accelerator counts its devices (ranks per node) from LOCAL_SIZE, which only the deepspeed
    # launcher sets; otherwise it runs `numactl --hardware` in a subprocess, at ZeRO-3 on every gradient bucket
    # (3.4 ms a call where numactl is installed, measured here with a stand-in), and counts NUMA nodes, not ranks
    os.environ.setdefault("LOCAL_SIZE", str(get_local_world_size()))
    if device_type == "cuda":
        bind_local_gpu()
    from yolods.preemption import signals_end_the_process  # preemption imports this module

    with signals_end_the_process():  # the wait for every rank can take minutes, in C++ where Python's handlers wait
        try:
            _join_group(device_type, verbose=verbose, for_deepspeed=for_deepspeed)
        except torch_dist.DistNetworkError as error:
            if "EADDRINUSE" not in str(error):
                raise
            import socket

            from yolods.errors import ConfigError

            raise ConfigError(  # torch's message is 30 lines of C++ frames
                f"MASTER_PORT {os.environ.get('MASTER_PORT')} is already in use on {socket.gethostname()} (another job "
                f"on this node?): set MASTER_PORT to a free port, e.g. MASTER_PORT={_free_port()}"
            ) from None


def _join_group(device_type: str, *, verbose: bool, for_deepspeed: bool) -> None:
    timeout = datetime.timedelta(minutes=COLLECTIVE_TIMEOUT_MIN)
    if not for_deepspeed:
        torch_dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", timeout=timeout)
        return
    import contextlib
    import io

    import deepspeed

    _join_torchrun_attempt(timeout)
    _skip_shared_memory_inference_op()
    # Whatever DeepSpeed prints while its backend starts stays hidden unless --verbose (0.19 printed "... built
    # successfully" on every rank for the op left out above; nothing else here).
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        deepspeed.init_distributed(timeout=timeout)  # adopts a process group that already exists


def show_deepspeed_info_messages() -> None:
    """--verbose: let DeepSpeed's INFO lines through (its version, the resolved config, the engine's set-up). Its
    logger and that logger's handler both start at WARNING (deepspeed/utils/logging.py), so both are lowered."""
    import logging

    from deepspeed.utils import logger

    logger.setLevel(logging.INFO)
    for handler in logger.handlers:
        handler.setLevel(logging.INFO)


def bind_local_gpu() -> int:
    """Make this rank's GPU (LOCAL_RANK) the current device, before any collective; returns its index.

    torch's object collectives (broadcast_object, gather_objects) put their tensors on the current device, GPU 0
    unless set, and NCCL refuses a tensor on another GPU than the one its group was bound to: every multi-GPU run
    would fail at its first one (yolods.train's run directory) and open a stray context on GPU 0.

    Raises:
        ConfigError: LOCAL_RANK names a GPU this process cannot see (a launcher that binds one GPU per task).
    """
    from yolods.errors import ConfigError

    local_rank, visible = get_local_rank(), torch.cuda.device_count()
    if local_rank >= visible:
        raise ConfigError(
            f"rank {get_rank()} has local rank {local_rank} but sees {visible} GPU(s): the launcher gave each task "
            "fewer GPUs than ranks per node (srun --gpus-per-task=1?); give each task the node's GPUs "
            "(srun --gpus-per-node=N --gpu-bind=none) or set CUDA_VISIBLE_DEVICES to all of them"
        )
    torch.cuda.set_device(local_rank)
    return local_rank


def local_device(device_type: str) -> torch.device:
    """This rank's device: its local GPU on CUDA (which init_distributed made current), else the CPU."""
    return torch.device("cuda", get_local_rank()) if device_type == "cuda" else torch.device("cpu")


def _skip_shared_memory_inference_op() -> None:
    """Mark DeepSpeed's shared-memory CPU comm op unavailable, so its comm backend neither builds nor loads it.

    DeepSpeed (0.19) loads the op every time its backend starts: a C++ JIT build of half a minute or more the first
    time on a machine (and again for every new virtual environment), 0.2 s per rank after, and a 66 MB /dev/shm
    buffer per rank that it never unlinks. The op serves only `inference_all_reduce` (its tensor-parallel inference layers);
    ZeRO and yolods reduce through torch.distributed, so training never calls it.
    """
    import deepspeed.ops

    compatible = deepspeed.ops.__compatible_ops__  # probed once per process; DeepSpeed keeps edits to the dict
    if "deepspeed_shm_comm" in compatible:
        compatible["deepspeed_shm_comm"] = False


def _join_torchrun_attempt(timeout: datetime.timedelta) -> None:
    """Under torchrun, join the process group through the agent's store, namespaced by restart attempt.

    torchrun's default (static) rendezvous keeps one store in its agent for every worker group it restarts, and
    torch 2.14 no longer prefixes the process group's keys by attempt: a restarted rank then read a dead peer's
    address and failed ("Gloo connectFullMesh failed ... Connection refused") whenever that peer was slower to
    start. A no-op outside torchrun, where DeepSpeed joins the group from the environment as before.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or get_world_size() < 2:
        return
    from deepspeed.accelerator import get_accelerator

    agent_store = torch_dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    accelerator = get_accelerator()
    # DeepSpeed binds the rank's GPU when it creates the group (its init_process_group); so do we
    options = {"device_id": accelerator.device(get_local_rank())} if accelerator.device_name() == "cuda" else {}
    torch_dist.init_process_group(
        accelerator.communication_backend_name(),
        store=torch_dist.PrefixStore(f"yolods/attempt{attempt}", agent_store),
        rank=get_rank(),
        world_size=get_world_size(),
        timeout=timeout,
        **options,
    )


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def barrier() -> None:
    """Wait for every rank; a no-op without a process group."""
    if _initialized() and get_world_size() > 1:
        torch_dist.barrier()


def all_reduce_sum_(tensor: torch.Tensor) -> None:
    """Sum a tensor over ranks in place; a no-op without a process group."""
    if _initialized() and get_world_size() > 1:
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average tensors over ranks in place (BatchNorm statistics)."""
    if not (_initialized() and get_world_size() > 1) or not tensors:
        return
    for tensor in tensors:
        all_reduce_sum_(tensor)
        tensor.div_(get_world_size())


def broadcast_object(obj, *, src: int = 0):
    """Return rank `src`'s object on every rank."""
    if not (_initialized() and get_world_size() > 1):
        return obj
    holder = [obj]
    torch_dist.broadcast_object_list(holder, src=src)
    return holder[0]


def gather_objects(obj) -> list | None:
    """Every rank's `obj`, in rank order, on rank 0; None on the other ranks. A collective."""
    if not (_initialized() and get_world_size() > 1):
        return [obj]
    gathered = [None] * get_world_size() if is_main_process() else None
    torch_dist.gather_object(obj, gathered, dst=0)
    return gathered


def all_gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank. A collective."""
    if not (_initialized() and get_world_size() > 1):
        return [obj]
    gathered = [None] * get_world_size()
    torch_dist.all_gather_object(gathered, obj)
    return gathered


def max_over_ranks(value: int) -> int:
    """The largest of every rank's `value`, on every rank (a stop request seen by one rank stops all)."""
    if not (_initialized() and get_world_size() > 1):
        return value
    device = "cuda" if torch_dist.get_backend() == "nccl" else "cpu"
    reduced = torch.tensor([value], dtype=torch.int64, device=device)
    torch_dist.all_reduce(reduced, op=torch_dist.ReduceOp.MAX)
    return int(reduced.item())  # .item() syncs


def any_rank(flag: bool) -> bool:
    """True on every rank if any rank passes True."""
    return bool(max_over_ranks(int(flag)))


def shutdown(engine=None) -> None:
    """Leave the process group cleanly.

    barrier -> engine.destroy() -> destroy_process_group() in this order: without it about 1 in 20 two-rank
    runs aborted at interpreter exit with `terminate called without an active exception`.
    """
    barrier()
    if engine is not None and hasattr(engine, "destroy"):
        engine.destroy()
    if _initialized():
        torch_dist.destroy_process_group()


__all__ = [
    "LAUNCHER_VARIABLES",
    "all_gather_objects",
    "all_reduce_mean_",
    "all_reduce_sum_",
    "any_rank",
    "barrier",
    "bind_local_gpu",
    "broadcast_object",
    "check_launcher_env",
    "gather_objects",
    "get_local_rank",
    "get_local_world_size",
    "get_num_nodes",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_local_main_process",
    "is_main_process",
    "local_device",
    "max_over_ranks",
    "print_main",
    "shutdown",
    "threads_per_rank",
]
