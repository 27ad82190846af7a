"""On paper: the collectives each engine issues per step, their ring cost, and the throughput that leaves.

Pure functions (no torch, no process group), so the projection and the ZeRO-paper check are unit-tested alone.

What each engine sends per optimizer step (Psi parameters, g bytes per gradient element, p per parameter element;
read off DeepSpeed 0.19.8's stage_1_and_2.py / stage3.py and torch DDP):

    torch DDP   all-reduce   Psi*g  in 25 MiB buckets, during backward (overlaps it, on GPU and on gloo)
    ZeRO-0      all-reduce   Psi*g  in 500M-element buffers, after backward (never overlapped)
    ZeRO-1/2    all-reduce   Psi*g  in reduce_bucket_size buckets, during backward (overlap_comm on GPU only);
                             with `use_multi_rank_bucket_allreduce` (the default) each bucket is all-reduced and
                             every rank keeps its own slice: 2 Psi of ring traffic, not the paper's 1 Psi
                all-gather   Psi*p  of updated parameters after the optimizer step (never overlapped)
                all-reduce   8 B    gradient norm for clipping
    ZeRO-3      all-gather   Psi*p  once per step, at most one call per fetch unit (yolods' leaf modules, one per
                             YOLO layer, and the other modules holding parameters; the prefetcher coalesces
                             them further: the comms logger counted 2 calls for yolov8n, 5 for yolov8s): fetched in forward,
                             kept for backward (a YOLO is far below stage3_max_live_parameters; prefetched,
                             overlaps forward). Parameters below stage3_param_persistence_threshold would be
                             re-gathered one call each after the step; yolods' threshold is 0
                reduce-scatter Psi*g in reduce_bucket_size buckets during backward
                all-reduce   8 B    gradient norm
                (yolods' EMA averages each rank's own slices: nothing per step; one all-gather per epoch)
    yolods      all-reduce   8 B    TrainStep's per-step stop agreement (StopRequest.agreed), every ZeRO stage

Compute: forward and backward are the same on every rank (weak scaling); ZeRO 1-3 update only their 1/N
partition of the optimizer states; the EMA update (Ultralytics' ModelEMA) runs in full on every rank at ZeRO 0-2
and on 1/N of the parameters at ZeRO-3 (yolods.ema).

Scaling efficiency is the step's compute over the step: 1 - exposed communication / step, never above 1. Against
N x one GPU's img/s instead, ZeRO 1-3 read above 100% on a fast link (their per-rank optimizer work shrinks with
N while one GPU does all of it): that is less work per rank, shown in img/s, not communication for free.

Ring costs per rank on N ranks, message M bytes, per-hop latency a, bandwidth B:
    all-reduce        2(N-1) a + 2(N-1)/N * M/B
    reduce-scatter    (N-1) a  +  (N-1)/N * M/B       (all-gather the same)
NCCL switches to trees at scale, which shrinks the latency term: the ring here is the pessimistic bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

ALL_REDUCE, REDUCE_SCATTER, ALL_GATHER = "all_reduce", "reduce_scatter", "all_gather"
GBIT_PER_S = 1e9 / 8  # bytes/s in one Gb/s
NETWORK_EFFICIENCY = 0.9  # ASSUMED: share of a NIC's line rate NCCL achieves (bus bandwidth)

DDP_BUCKET_BYTES = 25 * 2**20  # torch DDP's bucket_cap_mb default
ZERO0_ALLREDUCE_ELEMENTS = 500_000_000  # deepspeed.runtime.engine.MEMORY_OPT_ALLREDUCE_SIZE
GRAD_NORM_BYTES = 8
STOP_AGREEMENT_BYTES = 8  # yolods.dist.max_over_ranks: one int64


@dataclass(frozen=True)
class Collective:
    """One kind of collective in a step: `calls` calls moving `message_bytes` in all (unsharded tensor bytes)."""

    op: str
    message_bytes: float
    calls: int
    phase: str  # "forward", "backward", "after_backward" or "after_step": the compute it can hide behind
    overlappable: bool  # whether it runs concurrently with that phase's compute


@dataclass(frozen=True)
class Link:
    """Achievable per-rank bandwidth of the slowest ring hop, and its latency."""

    bandwidth_bytes_per_s: float
    latency_s: float

    @classmethod
    def from_gbps(cls, gbps: float, *, latency_s: float, efficiency: float = NETWORK_EFFICIENCY) -> Link:
        """A network link of `gbps` line rate, of which `efficiency` is achievable (NCCL bus bandwidth)."""
        return cls(bandwidth_bytes_per_s=gbps * GBIT_PER_S * efficiency, latency_s=latency_s)


@dataclass(frozen=True)
class Topology:
    """Nodes of `ranks_per_node` GPUs: a fast link inside a node, one network link per GPU between nodes.

    One NIC per GPU (rail-optimised, as in DGX H100 / HGX nodes): each rank's share of the network is a full link.
    """

    ranks_per_node: int
    intra_node: Link
    inter_node: Link

    def link_for(self, num_ranks: int) -> Link:
        """The ring's bottleneck: intra-node when the job fits one node, else the network."""
        if num_ranks <= self.ranks_per_node:
            return self.intra_node
        return Link(
            bandwidth_bytes_per_s=min(self.intra_node.bandwidth_bytes_per_s, self.inter_node.bandwidth_bytes_per_s),
            latency_s=max(self.intra_node.latency_s, self.inter_node.latency_s),
        )


# ASSUMED defaults for H100 nodes, none measured here (the report lists them as assumed): NVLink 4 reaches ~300 GB/s
# of NCCL bus bandwidth at ~1 us a hop; a network hop (InfiniBand/RoCE through NCCL) is taken as 5 us, on the
# pessimistic side. The report varies the network latency and line rate.
NVLINK_H100 = Link(bandwidth_bytes_per_s=300e9, latency_s=1e-6)
NETWORK_LATENCY_S = 5e-6


def h100_cluster(
    link_gbps: float, *, ranks_per_node: int = 8, network_latency_s: float = NETWORK_LATENCY_S
) -> Topology:
    """8-GPU H100 nodes with one `link_gbps` NIC per GPU."""
    return Topology(
        ranks_per_node=ranks_per_node,
        intra_node=NVLINK_H100,
        inter_node=Link.from_gbps(link_gbps, latency_s=network_latency_s),
    )


def bytes_sent_per_rank(op: str, message_bytes: float, num_ranks: int) -> float:
    """Bytes each rank sends for a ring collective over `message_bytes` (the whole, unsharded tensor)."""
    if num_ranks <= 1:
        return 0.0
    factor = 2 * (num_ranks - 1) / num_ranks if op == ALL_REDUCE else (num_ranks - 1) / num_ranks
    return factor * message_bytes


def collective_time_s(collective: Collective, *, num_ranks: int, link: Link) -> float:
    """Ring time of all calls of `collective`: latency per hop and call, plus bytes over bandwidth."""
    if num_ranks <= 1:
        return 0.0
    hops = 2 * (num_ranks - 1) if collective.op == ALL_REDUCE else num_ranks - 1
    latency = collective.calls * hops * link.latency_s
    return (
        latency + bytes_sent_per_rank(collective.op, collective.message_bytes, num_ranks) / link.bandwidth_bytes_per_s
    )


def exposed_time_s(*, compute_s: float, comm_s: float, calls: int, overlappable: bool) -> float:
    """Communication time left on the critical path after hiding behind `compute_s`.

    `calls` equal buckets become ready evenly through the compute and go out one at a time; the last one can
    only start when the compute ends. Without overlap all of it is exposed.
    """
    if not overlappable or calls <= 0 or comm_s <= 0:
        return max(comm_s, 0.0)
    per_call = comm_s / calls
    return max(per_call, comm_s - compute_s * (calls - 1) / calls)


@dataclass(frozen=True)
class CommSpec:
    """What decides a step's communication: engine, ZeRO stage, sizes and buckets.

    `zero_stage` None means torch DDP. Bucket sizes are in elements, as in DeepSpeed's config.
    """

    zero_stage: int | None
    num_params: int
    grad_bytes: int = 4  # torch_autocast keeps fp32 parameters, so fp32 gradients
    param_bytes: int = 4
    reduce_bucket_elements: int = 2_000_000
    overlap_comm: bool = True
    num_param_groups: int = 3  # Ultralytics' groups: decayed weights, norm weights, biases
    multi_rank_bucket_allreduce: bool = True
    stage3_gather_calls: int = 1  # ZeRO-3's fetch units (yolods.zero3_layers), an upper bound on its all-gathers
    stage3_regather_in_backward: bool = False  # only models above stage3_max_live_parameters
    stop_agreement: bool = False  # yolods' TrainStep: one tiny all-reduce after every step


def step_collectives(spec: CommSpec) -> list[Collective]:
    """The collectives one optimizer step issues (gradient accumulation 1), per the table in the module doc."""
    agreement = Collective(ALL_REDUCE, STOP_AGREEMENT_BYTES, 1, "after_step", False)
    return _engine_collectives(spec) + ([agreement] if spec.stop_agreement else [])


def _engine_collectives(spec: CommSpec) -> list[Collective]:
    """What DDP or DeepSpeed itself issues per step."""
    grads = spec.num_params * spec.grad_bytes
    params = spec.num_params * spec.param_bytes
    reduce_calls = max(1, math.ceil(spec.num_params / spec.reduce_bucket_elements))
    if spec.zero_stage is None:
        return [Collective(ALL_REDUCE, grads, max(1, math.ceil(grads / DDP_BUCKET_BYTES)), "backward", True)]
    if spec.zero_stage == 0:
        calls = max(1, math.ceil(spec.num_params / ZERO0_ALLREDUCE_ELEMENTS))
        return [Collective(ALL_REDUCE, grads, calls, "after_backward", False)]
    grad_norm = Collective(ALL_REDUCE, GRAD_NORM_BYTES, 1, "after_step", False)
    if spec.zero_stage in (1, 2):
        # all_gather_dp_groups gathers each parameter group whole, one all_gather_into_tensor each (its bucketed
        # path serves only torch builds without that op): Ultralytics' three groups (the comms logger: 3 calls).
        gather_calls = spec.num_param_groups
        # Without multi-rank bucket all-reduce, each bucket is reduced to each owner: a reduce-scatter's bytes
        # in N times the calls; the latency term below counts it as one reduce-scatter per bucket.
        reduce_op = ALL_REDUCE if spec.multi_rank_bucket_allreduce else REDUCE_SCATTER
        return [
            Collective(reduce_op, grads, reduce_calls, "backward", spec.overlap_comm),
            Collective(ALL_GATHER, params, gather_calls, "after_step", False),
            grad_norm,
        ]
    if spec.zero_stage == 3:
        gathers = max(spec.stage3_gather_calls, 1)
        collectives = [
            Collective(ALL_GATHER, params, gathers, "forward", True),
            Collective(REDUCE_SCATTER, grads, reduce_calls, "backward", spec.overlap_comm),
            grad_norm,
        ]
        if spec.stage3_regather_in_backward:
            collectives.append(Collective(ALL_GATHER, params, gathers, "backward", True))
        return collectives
    raise ValueError(f"zero_stage {spec.zero_stage} is not 0, 1, 2, 3 or None (DDP)")


def comm_bytes_per_rank(spec: CommSpec, *, num_ranks: int) -> float:
    """Bytes each rank sends per step."""
    return sum(bytes_sent_per_rank(c.op, c.message_bytes, num_ranks) for c in step_collectives(spec))


@dataclass(frozen=True)
class ComputeTimes:
    """Per-step compute of one rank alone (no communication): the model's calibration.

    `optimizer_s` is the update ZeRO 1-3 partition (gradient clipping and the optimizer step); `ema_s` the EMA
    update, which every rank repeats in full at stages 0-2 and on its own slices only at ZeRO-3 (yolods.ema).
    """

    forward_s: float
    backward_s: float
    optimizer_s: float
    data_s: float = 0.0
    ema_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.data_s + self.forward_s + self.backward_s + self.optimizer_s + self.ema_s

    def on_ranks(self, spec: CommSpec, num_ranks: int) -> float:
        """Seconds of compute per rank and step on `num_ranks` ranks (ZeRO 1-3 update 1/N of the states, ZeRO-3
        also 1/N of the EMA)."""
        optimizer_s = self.optimizer_s / num_ranks if spec.zero_stage else self.optimizer_s
        ema_s = self.ema_s / num_ranks if spec.zero_stage == 3 else self.ema_s
        return self.data_s + self.forward_s + self.backward_s + optimizer_s + ema_s


@dataclass(frozen=True)
class StepEstimate:
    """A projected step: its time, its compute, all communication time, and the part not hidden behind compute."""

    step_s: float
    compute_s: float
    comm_s: float
    exposed_comm_s: float


def estimate_step(
    compute: ComputeTimes,
    spec: CommSpec,
    *,
    num_ranks: int,
    link: Link,
    op_links: dict[str, Link] | None = None,
    can_overlap: bool = True,
) -> StepEstimate:
    """Step time on `num_ranks` ranks: one rank's compute plus the communication compute cannot hide.

    ZeRO 1-3 update only their 1/N partition, so the optimizer time (the EMA's only at ZeRO-3) shrinks with N. `op_links` gives a link per
    collective where they differ (gloo's all-gather is much slower per byte than its all-reduce). `can_overlap`
    False models a backend without side streams (DeepSpeed on CPU), where overlap_comm changes nothing.
    """
    phase_compute = {"forward": compute.forward_s, "backward": compute.backward_s}
    comm_s = exposed_s = 0.0
    by_phase: dict[tuple[str, bool], list[Collective]] = {}
    for collective in step_collectives(spec):
        by_phase.setdefault((collective.phase, collective.overlappable and can_overlap), []).append(collective)
    for (phase, overlappable), collectives in by_phase.items():
        phase_comm_s = sum(
            collective_time_s(c, num_ranks=num_ranks, link=(op_links or {}).get(c.op, link)) for c in collectives
        )
        calls = sum(c.calls for c in collectives)
        comm_s += phase_comm_s
        exposed_s += exposed_time_s(
            compute_s=phase_compute.get(phase, 0.0), comm_s=phase_comm_s, calls=calls, overlappable=overlappable
        )
    compute_s = compute.on_ranks(spec, num_ranks)
    return StepEstimate(step_s=compute_s + exposed_s, compute_s=compute_s, comm_s=comm_s, exposed_comm_s=exposed_s)


@dataclass(frozen=True)
class ScalingPoint:
    """Projected throughput at one node count (weak scaling: fixed micro batch per rank)."""

    num_nodes: int
    num_ranks: int
    step_s: float
    imgs_per_s: float
    ideal_imgs_per_s: float  # the same per-rank compute with free communication
    efficiency: float  # imgs_per_s / ideal_imgs_per_s = 1 - exposed / step: never above 1
    exposed_comm_s: float


def project_scaling(
    compute: ComputeTimes,
    spec: CommSpec,
    *,
    topology: Topology,
    micro_batch: int,
    node_counts: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128, 256),
) -> list[ScalingPoint]:
    """Throughput and scaling efficiency at each node count, calibrated by one rank's compute time.

    Efficiency is against the same per-rank compute with free communication (see the module doc), so it is at
    most 1 by construction: exposed communication is never negative.
    """
    points = []
    for nodes in node_counts:
        ranks = nodes * topology.ranks_per_node
        estimate = estimate_step(compute, spec, num_ranks=ranks, link=topology.link_for(ranks))
        efficiency = estimate.compute_s / estimate.step_s
        assert efficiency <= 1.0 + 1e-12, efficiency  # internal invariant: exposed_comm_s >= 0
        points.append(
            ScalingPoint(
                num_nodes=nodes,
                num_ranks=ranks,
                step_s=estimate.step_s,
                imgs_per_s=ranks * micro_batch / estimate.step_s,
                ideal_imgs_per_s=ranks * micro_batch / estimate.compute_s,
                efficiency=efficiency,
                exposed_comm_s=estimate.exposed_comm_s,
            )
        )
    return points


def fit_link(*, op: str, num_ranks: int, message_bytes: Sequence[float], seconds: Sequence[float]) -> Link:
    """Latency and bandwidth from timed collectives of several sizes (least squares on t = a + b*M).

    `message_bytes` is the whole tensor (an all-gather's output, a reduce-scatter's input). On a ring,
    t = hops * latency + factor * M / bandwidth, with hops and factor as in `collective_time_s`.
    """
    if num_ranks < 2 or len(message_bytes) < 2:
        raise ValueError("fitting a link needs at least 2 ranks and 2 message sizes")
    count = len(message_bytes)
    mean_m = sum(message_bytes) / count
    mean_t = sum(seconds) / count
    var_m = sum((m - mean_m) ** 2 for m in message_bytes)
    slope = sum((m - mean_m) * (t - mean_t) for m, t in zip(message_bytes, seconds)) / var_m
    intercept = mean_t - slope * mean_m
    slope = max(slope, 1e-15)  # a noisy fit on a loaded machine must not give infinite bandwidth
    hops = 2 * (num_ranks - 1) if op == ALL_REDUCE else num_ranks - 1
    return Link(
        bandwidth_bytes_per_s=bytes_sent_per_rank(op, 1.0, num_ranks) / slope,
        latency_s=max(intercept, 0.0) / hops,
    )


# ----------------------------------------------------------------------------------------------------------------
# Model-state memory per rank: the ZeRO paper (Rajbhandari et al. 2020, section 5) and DeepSpeed as implemented


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter of each model state: parameters, gradients, optimizer states (K in the paper)."""

    params: float
    grads: float
    optimizer: float


PAPER_MIXED_ADAM = StateBytes(params=2, grads=2, optimizer=12)  # fp16 params+grads; fp32 master, momentum, variance
PAPER_FP32_ADAM = StateBytes(params=4, grads=4, optimizer=8)  # the fp32 equivalent: no master copy needed


def zero_model_state_bytes(*, stage: int, num_params: int, num_ranks: int, state: StateBytes) -> float:
    """The paper's model-state bytes per rank (stage 1: 4P + 12P/N, stage 2: 2P + 14P/N, stage 3: 16P/N at
    mixed-precision Adam); stage 0 is plain data parallelism."""
    psi, n = num_params, num_ranks
    if stage == 0:
        return (state.params + state.grads + state.optimizer) * psi
    if stage == 1:
        return (state.params + state.grads) * psi + state.optimizer * psi / n
    if stage == 2:
        return state.params * psi + (state.grads + state.optimizer) * psi / n
    if stage == 3:
        return (state.params + state.grads + state.optimizer) * psi / n
    raise ValueError(f"ZeRO stage {stage} is not 0-3")


def optimizer_state_bytes(optimizer: str, *, param_bytes: int = 4) -> float:
    """Bytes per parameter the torch optimizer itself holds (moments at the parameters' dtype)."""
    name = optimizer.lower()
    if name in ("adam", "adamw", "nadam", "radam", "adamax"):
        return 2 * param_bytes
    if name in ("sgd", "rmsprop"):
        return param_bytes  # momentum buffer / square average
    raise ValueError(f"no state size known for optimizer {optimizer!r}")


def deepspeed_state_bytes(optimizer: str, *, zero_stage: int, param_bytes: int = 4) -> StateBytes:
    """Bytes per parameter as DeepSpeed 0.19.8 holds them under yolods' torch_autocast precision.

    Parameters and gradients stay fp32 (torch_autocast casts activations only). ZeRO 1-3 keep an fp32 master
    partition even when the parameters are fp32 already (stage_1_and_2.py clones them), so their optimizer
    term carries 4 more bytes than the paper's fp32 equivalent.
    """
    master = 4 if zero_stage > 0 else 0
    return StateBytes(
        params=param_bytes, grads=param_bytes, optimizer=optimizer_state_bytes(optimizer, param_bytes=4) + master
    )


def deepspeed_model_state_bytes(*, stage: int, num_params: int, num_ranks: int, optimizer: str) -> float:
    """Model-state bytes per rank DeepSpeed 0.19.8 holds between backward and step, under torch_autocast.

    As the paper's formula with `deepspeed_state_bytes`, except at stage 1: DeepSpeed reduces gradients into
    this rank's partition during (or right after) backward and frees the rest, so between backward and step
    stage 1 holds gradients like stage 2 (the full gradients exist only transiently, inside backward).
    """
    state = deepspeed_state_bytes(optimizer, zero_stage=stage)
    return zero_model_state_bytes(
        stage=2 if stage == 1 else stage, num_params=num_params, num_ranks=num_ranks, state=state
    )
