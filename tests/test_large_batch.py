"""The large-batch rule (lr, weight decay, warmup per optimizer family) and `--sync_bn` (maths over 2 gloo ranks,
a 2-rank training run whose weights load in Ultralytics)."""

from __future__ import annotations

import copy
import importlib
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import assert_ok, free_port, run_train, small_run_args
from torch import nn

from yolods.build import build_optimizer_and_schedule
from yolods.config import ConfigError, RunConfig, parse_args, resolve_run, resumed_config
from yolods.large_batch import large_batch_factor, large_batch_recipe, recipe_for
from yolods.model import build_model
from yolods.sync_bn import RankSyncBatchNorm, convert_sync_batchnorm

NBS = 64
WEIGHT_DECAY = 0.0005  # Ultralytics' default
NUM_CLASSES = 3  # the shapes set
LR_FIT = round(0.002 * 5 / (4 + NUM_CLASSES), 6)  # Ultralytics' `auto` AdamW lr0


# ----------------------------------------------------------------------------------------------------------------
# The rule's arithmetic, through build_optimizer_and_schedule as yolods.train calls it


@pytest.fixture(scope="module")
def detector(shapes_data):
    plan = resolve_run(parse_args(["--data", str(shapes_data), "--device", "cpu"]), world_size=1)
    return build_model(
        "yolov8n.yaml", num_classes=NUM_CLASSES, class_names=plan.data["names"], hyp=plan.hyp, verbose=False
    )


def built(shapes_data, detector, *flags, num_train_images=2048, world_size=1, with_model=False):
    """(optimizer name, lr0, weight decay of the decayed weights, warmup batches) for a 1-rank run of `flags`,
    and with `with_model` the model after the recipe's BatchNorm momentum, as build_trainer sets it."""
    argv = ["--data", str(shapes_data), "--device", "cpu", "--epochs", "20", *flags]
    plan = resolve_run(parse_args(argv), world_size=world_size)
    batches_per_epoch = math.ceil(num_train_images / plan.batch.global_batch)
    optimizer, _, schedule = build_optimizer_and_schedule(
        plan,
        plan.hyp,
        detector,
        num_classes=NUM_CLASSES,
        num_train_images=num_train_images,
        batches_per_epoch=batches_per_epoch,
    )
    groups = optimizer.param_groups
    lr = min(group["lr"] for group in groups)  # MuSGD boosts the head's lr x 3
    weight_decay = max(group["weight_decay"] for group in groups)  # BatchNorm weights and biases have none
    result = (type(optimizer).__name__, lr, weight_decay, schedule.warmup_iterations)
    if not with_model:
        return result
    model = copy.deepcopy(detector)
    recipe_for(plan, optimizer).scale_batchnorm(model)
    return (*result, model)


def batchnorm_momenta(model: nn.Module) -> set[float]:
    return {round(m.momentum, 12) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


@pytest.mark.parametrize("k", [1, 4, 8])
def test_auto_adamw_lr_scales_by_k_and_decay_per_epoch_stays(shapes_data, detector, k):
    """auto picks AdamW (few iterations) at every k. yolods: lr x k (linear rule), the base weight decay
    (Ultralytics' x k, over k times fewer steps of k times the lr, would decay k times more per epoch), BatchNorm
    momentum per k images. Ultralytics: lr x 1, decay x k, momentum 0.03."""
    batch = ["--batch", str(NBS * k)]
    name, lr, weight_decay, warmup, model = built(shapes_data, detector, *batch, with_model=True)
    assert name == "AdamW"
    assert lr == pytest.approx(LR_FIT * k, rel=1e-12)
    assert weight_decay == pytest.approx(WEIGHT_DECAY, rel=1e-12)
    assert batchnorm_momenta(model) == {round(1 - 0.97**k, 12)}
    assert warmup == 3 * math.ceil(2048 / (NBS * k))  # warmup_epochs x batches per epoch: 3 epochs at any k
    *ultralytics, model = built(shapes_data, detector, *batch, "--large_batch_rule", "ultralytics", with_model=True)
    assert ultralytics == ["AdamW", LR_FIT, pytest.approx(WEIGHT_DECAY * k, rel=1e-12), warmup]
    assert batchnorm_momenta(model) == {0.03}  # Ultralytics' BatchNorm momentum


@pytest.mark.parametrize("k", [1, 4, 8])
def test_clipped_sgd_scales_by_sqrt_k(shapes_data, detector, k):
    """Clipping at norm 10 (yolods' and Ultralytics' default) fixes SGD's step size whatever the summed loss's
    scale: yolods lr x sqrt(k), decay x sqrt(k) (decay per epoch as at nbs); Ultralytics lr x 1, decay x k."""
    flags = ["--batch", str(NBS * k), "--optimizer", "SGD"]
    name, lr, weight_decay, _ = built(shapes_data, detector, *flags)
    assert (name, lr) == ("SGD", pytest.approx(0.01 * math.sqrt(k), rel=1e-12))
    assert weight_decay == pytest.approx(WEIGHT_DECAY * math.sqrt(k), rel=1e-12)
    _, lr, weight_decay, _ = built(shapes_data, detector, *flags, "--large_batch_rule", "ultralytics")
    assert (lr, weight_decay) == (0.01, pytest.approx(WEIGHT_DECAY * k, rel=1e-12))


def test_unclipped_sgd_keeps_ultralytics_lr(shapes_data, detector, tmp_path):
    """Without clipping the summed loss already scales SGD's step by k (the linear rule): only BatchNorm changes."""
    unclipped = tmp_path / "unclipped.json"
    unclipped.write_text('{"gradient_clipping": 0.0}')
    flags = ["--batch", "512", "--optimizer", "SGD", "--deepspeed_config", str(unclipped)]
    _, lr, weight_decay, _, model = built(shapes_data, detector, *flags, with_model=True)
    assert (lr, weight_decay) == (0.01, pytest.approx(WEIGHT_DECAY * 8, rel=1e-12))
    assert batchnorm_momenta(model) == {round(1 - 0.97**8, 12)}
    _, lr, weight_decay, _ = built(shapes_data, detector, "--batch", "512", "--deepspeed_config", str(unclipped))
    assert (lr, weight_decay) == (pytest.approx(LR_FIT * 8), pytest.approx(WEIGHT_DECAY))


def test_auto_on_long_runs_keeps_its_choice(shapes_data, detector):
    """Many iterations: auto picks MuSGD (SGD under ZeRO 1-3), clipped SGD steps: lr x sqrt(k)."""
    sqrt_k = math.sqrt(8)
    name, lr, weight_decay, _ = built(shapes_data, detector, "--batch", "512", num_train_images=300_000)
    assert (name, lr, weight_decay) == ("MuSGD", pytest.approx(0.01 * sqrt_k), pytest.approx(WEIGHT_DECAY * sqrt_k))
    name, lr, _, _ = built(shapes_data, detector, "--batch", "512", "--zero", "2", num_train_images=300_000)
    assert (name, lr) == ("SGD", pytest.approx(0.01 * sqrt_k))


@pytest.mark.parametrize("batch", [8, 16, 42, 48, 64])
def test_nothing_changes_at_or_below_nbs(shapes_data, detector, batch):
    """Ultralytics' accumulation to ~nbs (batch 42: 2 x 42 = 84 images per step) is Ultralytics' rule, not a large batch."""
    flags = ["--batch", str(batch)]
    *yolods, model = built(shapes_data, detector, *flags, with_model=True)
    assert yolods == list(built(shapes_data, detector, *flags, "--large_batch_rule", "ultralytics"))
    assert batchnorm_momenta(model) == {0.03}


def test_unclipped_adam_keeps_ultralytics_decay():
    """Unclipped, Adam's L2 term joins the summed gradient (x k) before normalisation: decay x k keeps its ratio."""
    adam = large_batch_recipe(rule="yolods", optimizer_name="Adam", images_per_step=256, nbs=NBS, clipped=False)
    assert (adam.lr_scale, adam.weight_decay_scale) == (4.0, 1.0)
    adamw = large_batch_recipe(rule="yolods", optimizer_name="AdamW", images_per_step=256, nbs=NBS, clipped=False)
    assert (adamw.lr_scale, adamw.weight_decay_scale) == (4.0, 0.25)
    off = large_batch_recipe(rule="ultralytics", optimizer_name="AdamW", images_per_step=256, nbs=NBS)
    assert not off.changes_anything


def test_an_ablation_applies_only_the_parts_it_names():
    """`--large_batch_rule lr+batchnorm` (benchmarks/large_batch.py's ablation rows): no decay part, so x k decay."""
    recipe = large_batch_recipe(rule="lr+batchnorm", optimizer_name="AdamW", images_per_step=512, nbs=NBS)
    assert (recipe.lr_scale, recipe.weight_decay_scale, recipe.batchnorm_steps) == (8.0, 1.0, 8.0)
    recipe = large_batch_recipe(rule="lr+decay", optimizer_name="SGD", images_per_step=512, nbs=NBS)
    assert (recipe.lr_scale, recipe.weight_decay_scale, recipe.batchnorm_steps) == (math.sqrt(8), 1 / math.sqrt(8), 1.0)
    recipe = large_batch_recipe(rule="decay+batchnorm", optimizer_name="AdamW", images_per_step=512, nbs=NBS)
    assert (recipe.lr_scale, recipe.weight_decay_scale, recipe.batchnorm_steps) == (1.0, 1.0, 8.0)
    with pytest.raises(ConfigError, match=r"--large_batch_rule: .*'lr\+momentum'"):  # one line, not argparse's usage
        parse_args(["--large_batch_rule", "lr+momentum"])


def test_accumulated_forwards_keep_batchnorm_momentum():
    """64 per forward x 8 accumulated: k = 8 for the optimizer, but each forward already holds nbs images."""
    recipe = large_batch_recipe(
        rule="yolods", optimizer_name="AdamW", images_per_step=512, nbs=NBS, forwards_per_step=8
    )
    assert (recipe.lr_scale, recipe.batchnorm_steps) == (8.0, 1.0)


def test_accumulation_from_a_deepspeed_json_is_a_large_batch():
    """64 per forward x 8 accumulated (DeepSpeed's gradient_accumulation_steps) steps on 512 images: k = 8."""
    assert large_batch_factor(global_batch=64, accumulate=8, nbs=NBS) == 8.0
    assert large_batch_factor(global_batch=16, accumulate=4, nbs=NBS) == 1.0  # Ultralytics' own accumulation
    assert large_batch_factor(global_batch=256, accumulate=1, nbs=NBS) == 4.0


def test_rule_and_sync_bn_cannot_change_on_resume():
    """The recipe is derived from the saved settings; changing either flag would change the run."""
    saved = RunConfig(device="cpu", resume="runs/train/exp")
    for argv in (["--resume", "x", "--large_batch_rule", "ultralytics"], ["--resume", "x", "--sync_bn"]):
        with pytest.raises(ConfigError, match="would change the run"):
            resumed_config(saved, parse_args(argv), given={"resume", argv[2].lstrip("-")})


def test_runs_saved_before_the_flag_resume_with_ultralytics_rule(tmp_path):
    import yaml

    from yolods.checkpoint import load_run_config

    settings = {k: v for k, v in vars(RunConfig(device="cpu")).items() if k != "large_batch_rule"}
    (tmp_path / "args.yaml").write_text(yaml.safe_dump(settings))
    assert load_run_config(tmp_path).large_batch_rule == "ultralytics"


# ----------------------------------------------------------------------------------------------------------------
# Sync BN


def test_sync_bn_is_a_no_op_on_one_rank():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert convert_sync_batchnorm(model) == 0
    assert type(model[1]) is nn.BatchNorm2d


SHARDS = (2, 5)  # uneven: the statistics must weigh each rank by its count


def _sync_bn_rank(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One rank of the equivalence test: BatchNorm over its shard of a fixed batch, synchronised over ranks."""
    import torch.distributed as torch_dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=world_size)
    batch, probe, norm = _equivalence_case()
    model = nn.Sequential(norm)
    plain_keys = list(model.state_dict())
    assert convert_sync_batchnorm(model) == 1 and isinstance(model[0], RankSyncBatchNorm)
    assert list(model.state_dict()) == plain_keys  # checkpoints load with or without --sync_bn
    start = sum(SHARDS[:rank])
    shard = batch[start : start + SHARDS[rank]].clone().requires_grad_()
    output = model(shard)
    (output * probe[start : start + SHARDS[rank]]).sum().backward()
    torch.save(
        {
            "output": output.detach(),
            "input_grad": shard.grad,
            "weight_grad": norm.weight.grad,
            "bias_grad": norm.bias.grad,
            "running": (norm.running_mean.clone(), norm.running_var.clone()),
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    torch_dist.destroy_process_group()


def _equivalence_case() -> tuple[torch.Tensor, torch.Tensor, nn.BatchNorm2d]:
    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(sum(SHARDS), 4, 5, 6, generator=generator) * 3 + 2
    probe = torch.randn(batch.shape, generator=generator)
    norm = nn.BatchNorm2d(4, momentum=0.03)  # Ultralytics' BatchNorm momentum
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=generator)
        norm.bias.uniform_(-1, 1, generator=generator)
    return batch, probe, norm


def test_two_synced_ranks_equal_one_batchnorm_over_the_whole_batch(tmp_path):
    """Outputs, input gradients, running statistics and the summed affine gradients of 2 gloo ranks (shards of
    2 and 5 images) equal one process's BatchNorm2d over the 7 images."""
    import torch.multiprocessing as mp

    mp.spawn(_sync_bn_rank, args=(len(SHARDS), free_port(), str(tmp_path)), nprocs=len(SHARDS))
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(len(SHARDS))]
    batch, probe, norm = _equivalence_case()
    reference = copy.deepcopy(norm)
    whole = batch.clone().requires_grad_()
    output = reference(whole)
    (output * probe).sum().backward()
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["output"] for r in ranks]), output.detach(), **close)
    torch.testing.assert_close(torch.cat([r["input_grad"] for r in ranks]), whole.grad, **close)
    torch.testing.assert_close(sum(r["weight_grad"] for r in ranks), reference.weight.grad, **close)
    torch.testing.assert_close(sum(r["bias_grad"] for r in ranks), reference.bias.grad, **close)
    for r in ranks:
        torch.testing.assert_close(r["running"], (reference.running_mean, reference.running_var), **close)


@pytest.mark.multirank
@pytest.mark.parametrize("zero_stage", [3])  # ZeRO-3 partitions the parameters the synced layers use (ZeRO-2: not)
def test_two_rank_sync_bn_run_saves_weights_ultralytics_loads(zero_stage, shapes_data, projects):
    """A 2-rank --sync_bn run trains to the end; best.pt holds plain BatchNorm2d and loads in ultralytics.YOLO."""
    name = f"sync_bn_zero{zero_stage}"
    # nbs 4 < batch 8: the large-batch recipe (k = 2) runs too, BatchNorm momentum included
    args = small_run_args(shapes_data, projects, name, "--zero", str(zero_stage), "--sync_bn", "--nbs", "4", epochs=1)
    result = run_train(args, nproc=2)
    assert_ok(result)
    log = result.stdout + result.stderr
    assert "sync BN: 57 BatchNorm layers normalise over all 2 ranks' images" in log
    assert "large batch: 8 images per optimizer step, nbs 4; rule yolods' at k = 2" in log
    from ultralytics import YOLO

    model = YOLO(str(projects / name / "weights" / "best.pt")).model
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(type(m) is nn.BatchNorm2d and m.momentum == 0.03 for m in norms)  # as Ultralytics saves


# ----------------------------------------------------------------------------------------------------------------
# benchmarks/large_batch.py's verdicts


def test_the_benchmarks_goal_is_checked_only_against_a_row_at_nbs(monkeypatch):
    """A sweep at batch 512 alone (a warmup or ablation sweep) has no batch-64 row to hold it to 0.95x of."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    bench = importlib.import_module("large_batch")

    def verdicts(batches: list[int], finals: dict[str, float]) -> list[str]:
        rows = bench.plan_rows(batches, nbs=NBS, rules=["ultralytics", "yolods"])
        records = {
            row["name"]: [
                {"seed": 0, "returncode": 0, "final_map": finals[row["name"]], "optimizer_steps": 1, "wall_s": 1.0}
                | {"epochs": [{"epoch": 1, "mAP50-95": finals[row["name"]], "time_s": 1.0}], "rule_line": ""}
                | {"git_commit": "abc1234", "dirty": False}
            ]
            for row in rows
        }
        summaries, reference, _ = bench.summarise(rows, records, target_fraction=0.9)
        return bench.verdicts(summaries, nbs=NBS, reference_batch=reference["batch"])

    alone = verdicts([512], {"b512-ultralytics": 0.1, "b512-yolods": 0.4})
    assert alone == ["- batch 512: yolods 0.4000 vs Ultralytics' rule 0.1000 (+0.3000): not below"]
    with_nbs = verdicts([64, 512], {"b64-both": 0.5, "b512-ultralytics": 0.1, "b512-yolods": 0.4})
    assert with_nbs[-1] == "- batch 512 (8 x nbs): 0.800 x the batch-64 mAP50-95 (goal 0.95): **not reached**"
