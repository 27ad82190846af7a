"""The Ultralytics glue: model building, shared-module untying, optimizer groups, EMA."""

from __future__ import annotations

import pickle

import pytest
import torch

import yolods  # noqa: F401  (offline environment before Ultralytics is imported)
from yolods.config import ConfigError, RunConfig, hyperparameters
from yolods.ema import build_ema
from yolods.model import build_model, build_optimizer, export_snapshot, place_model, untie_shared_modules

NAMES = {0: "rectangle", 1: "ellipse", 2: "triangle"}


@pytest.fixture(scope="module")
def hyp(shapes_data):
    return hyperparameters(RunConfig(data=str(shapes_data), device="cpu"))


@pytest.fixture
def model(hyp):
    return build_model("yolov8n.yaml", num_classes=3, class_names=NAMES, hyp=hyp, verbose=False)


def test_every_conv_has_its_own_activation(model):
    from ultralytics.nn.modules import Conv

    activations = [m.act for m in model.modules() if isinstance(m, Conv)]
    assert len({id(a) for a in activations}) == len(activations)
    assert all(a is not Conv.default_act for a in activations)
    assert untie_shared_modules(model) == 0  # idempotent


def test_untied_model_survives_hooks_on_the_class_activation(model):
    """A hook left on Conv.default_act (as ZeRO-3 leaves) must not reach our models or their pickles."""
    from ultralytics.nn.modules import Conv

    handle = Conv.default_act.register_forward_hook(lambda *args: None)
    try:
        pickle.dumps(export_snapshot(model))
    finally:
        handle.remove()


def test_placed_model_has_its_loss_on_the_device_and_weights_deepspeed_can_broadcast(model):
    """On a GPU, a loss built on the CPU failed every first step (its DFL projection stayed behind), and NHWC weights
    failed deepspeed.initialize, which views each parameter as bytes (`p.data.view(torch.uint8)`)."""
    built_on_the_host = model.criterion
    model = model.to(memory_format=torch.channels_last)  # as weights saved from a channels-last run would load
    placed = place_model(model, torch.device("cpu"))
    assert placed.criterion is not built_on_the_host  # rebuilt where the parameters now are
    assert placed.criterion.proj.device == next(placed.parameters()).device
    for parameter in placed.parameters():
        parameter.data.view(torch.uint8)  # what DeepSpeed's broadcast at initialize does


def test_unknown_model_and_missing_weights(hyp, tmp_path):
    with pytest.raises(ConfigError, match="unknown model"):
        build_model("yolov99z.yaml", num_classes=3, class_names=NAMES, hyp=hyp, verbose=False)
    with pytest.raises(ConfigError, match="never downloads"):
        build_model(str(tmp_path / "yolo11n.pt"), num_classes=3, class_names=NAMES, hyp=hyp, verbose=False)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"garbage")
    with pytest.raises(ConfigError, match=r"not a readable Ultralytics checkpoint .*; pass a \.pt saved") as caught:
        build_model(str(corrupt), num_classes=3, class_names=NAMES, hyp=hyp, verbose=False)
    assert "\n" not in str(caught.value) and "download" not in str(caught.value)  # Ultralytics' advice is cut


def test_ultralytics_parameter_groups(model, hyp):
    optimizer, chosen = build_optimizer(model, hyp=hyp, num_classes=3, iterations=100, weight_decay=5e-4, zero_stage=2)
    groups = {group["param_group"]: group for group in optimizer.param_groups}
    assert set(groups) == {"weight", "bn", "bias"}
    assert (
        groups["weight"]["weight_decay"] == 5e-4
        and groups["bn"]["weight_decay"] == 0
        and groups["bias"]["weight_decay"] == 0
    )
    assert type(optimizer).__name__ == "AdamW" and chosen.optimizer == "AdamW"  # `auto` on a short run
    assert chosen.lr0 == pytest.approx(round(0.002 * 5 / (4 + 3), 6))


def test_auto_optimizer_avoids_muon_under_zero(model, hyp):
    """Muon orthogonalises weight matrices, which ZeRO's flat partitions do not hold."""
    optimizer, chosen = build_optimizer(
        model, hyp=hyp, num_classes=3, iterations=100_000, weight_decay=5e-4, zero_stage=1
    )
    assert type(optimizer).__name__ == "SGD" and chosen.lr0 == 0.01
    optimizer, _ = build_optimizer(model, hyp=hyp, num_classes=3, iterations=100_000, weight_decay=5e-4, zero_stage=0)
    assert type(optimizer).__name__ == "MuSGD"


def test_ema_follows_parameters_in_other_dtypes_and_new_storage(model):
    ema = build_ema(model)
    first_ema = next(ema.ema.parameters())
    for shift in (1.0, 2.0):  # new storage before each update, as DeepSpeed's flattening and steps give
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.data = parameter.data + shift
        half = model.to(torch.bfloat16)
        ema.update(half)
        # decay ~0 over the first updates: the EMA sits at the current weights, not the ones of its first update
        assert torch.allclose(first_ema, next(half.parameters()).float(), atol=0.05)
    assert first_ema.dtype == torch.float32


def test_saved_weights_have_ultralytics_structure(model):
    """The per-Conv activation copies made for ZeRO-3 are shared again in saved weights: the layer count and the
    outputs equal those of the model Ultralytics builds from the same yaml."""
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils.torch_utils import init_seeds

    init_seeds(0)
    reference = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    model.load_state_dict(reference.state_dict())
    snapshot = export_snapshot(model)
    assert len(list(snapshot.modules())) == len(list(reference.modules()))
    assert len(list(model.modules())) > len(list(reference.modules()))  # training keeps its copies
    images = torch.rand(2, 3, 64, 64)
    reference.eval()
    expected = reference(images)[0]
    assert torch.allclose(snapshot.float().eval()(images)[0], expected, rtol=1e-4, atol=1e-3)


def test_activation_checkpointing_changes_no_number(hyp, shapes_data):
    """Same loss, gradients and BatchNorm statistics with and without recomputation, over two training steps."""
    from ultralytics.data.build import build_yolo_dataset

    from yolods.data import load_data_yaml
    from yolods.model import enable_activation_checkpointing

    data = load_data_yaml(str(shapes_data))
    dataset = build_yolo_dataset(hyp, data["train"], 4, data, mode="val", rect=False, stride=32)
    batches = [dataset.collate_fn([dataset[i] for i in range(first, first + 4)]) for first in (0, 4)]
    for batch in batches:
        batch["img"] = batch["img"].float() / 255

    def two_steps(checkpointed: bool):
        torch.manual_seed(0)
        model = build_model("yolov8n.yaml", num_classes=3, class_names=NAMES, hyp=hyp, verbose=False)
        if checkpointed:
            assert enable_activation_checkpointing(model) > 10
        model.train()
        losses = []
        for batch in batches:
            loss, _ = model(dict(batch))
            loss.sum().backward()
            losses.append(loss.detach())
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        return losses, grads, [b.clone() for b in model.buffers()]

    plain, recomputed = two_steps(False), two_steps(True)
    for expected, actual in zip(plain, recomputed):
        assert all(torch.allclose(x, y, rtol=1e-5, atol=1e-6) for x, y in zip(expected, actual))


def test_freeze_follows_ultralytics_rule(hyp):
    """`freeze=3` or `[0, 5]`: parameters under model.{i}. get no gradient, nor the DFL's fixed weights."""
    from types import SimpleNamespace

    for freeze, frozen_layers in ((3, {0, 1, 2}), ([0, 5], {0, 5}), (None, set())):
        settings = SimpleNamespace(**{**vars(hyp), "freeze": freeze})
        model = build_model("yolov8n.yaml", num_classes=3, class_names=NAMES, hyp=settings, verbose=False)
        for name, parameter in model.named_parameters():
            expected_frozen = int(name.split(".")[1]) in frozen_layers or ".dfl." in name
            assert parameter.requires_grad is not expected_frozen, name


@pytest.mark.parametrize(
    ("freeze", "pattern"),
    [
        (23, "freezes all 23 layers"),
        ("backbone", "a number of layers"),
        ([0, 30], "layer indices below 23"),
        (-1, "a number of layers"),
        (["a"], "a number of layers"),
    ],
)
def test_freeze_that_leaves_nothing_to_train_or_names_no_layer_is_refused(hyp, freeze, pattern):
    from types import SimpleNamespace

    settings = SimpleNamespace(**{**vars(hyp), "freeze": freeze})
    with pytest.raises(ConfigError, match=pattern):
        build_model("yolov8n.yaml", num_classes=3, class_names=NAMES, hyp=settings, verbose=False)
