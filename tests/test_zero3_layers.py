"""ZeRO-3's leaf modules: each YOLO layer fetched as one unit, except where DeepSpeed's leaf hook would misfire."""

from __future__ import annotations

import pytest
import torch

import yolods  # noqa: F401  (offline environment before Ultralytics is imported)
from yolods.zero3_layers import mark_layers_as_zero3_leaves, zero3_fetch_units, zero3_leaves


def detection_model(name: str):
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    return DetectionModel(name, nc=3, verbose=False)


def test_every_layer_fed_a_gradient_is_one_leaf_and_the_image_layer_and_list_fed_head_are_not():
    model = detection_model("yolov8n.yaml")
    layers = list(model.model)
    head = layers[-1]
    leaves = zero3_leaves(model, stride=32)
    # the first layer's input (the images) needs no gradient, the head's is a list: DeepSpeed's full backward hook
    # would fire before their parameters' gradients exist
    assert layers[0] not in leaves and head not in leaves
    assert all(layer in leaves for layer in layers[1:-1] if any(True for _ in layer.parameters()))
    assert all(branch in leaves for branch in [*head.cv2, *head.cv3])
    assert head.dfl not in leaves  # frozen (requires_grad False): nothing to reduce
    assert not {id(child) for leaf in leaves for child in leaf.modules() if child is not leaf} & set(map(id, leaves))
    # yolov8n: 21 leaves, plus the first layer's Conv2d and BatchNorm and the DFL's frozen Conv2d
    assert (len(leaves), zero3_fetch_units(model, stride=32)) == (21, 24)


def test_a_head_branch_fed_detached_features_is_no_leaf():
    """YOLO26's one-to-one head trains on `x.detach()`; its branches keep DeepSpeed's per-module hooks."""
    model = detection_model("yolo26n.yaml")
    head = model.model[-1]
    leaves = zero3_leaves(model, stride=32)
    assert all(branch not in leaves for branch in [*head.one2one_cv2, *head.one2one_cv3])
    assert all(branch in leaves for branch in [*head.cv2, *head.cv3])


def test_the_probe_forward_changes_no_parameter_or_running_statistic():
    model = detection_model("yolov8n.yaml")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    assert mark_layers_as_zero3_leaves(model, stride=32) == 21
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert model.training


@pytest.mark.parametrize("name", ["yolov8n.yaml", "yolo11n.yaml"])
def test_marked_leaves_are_what_deepspeed_sees(name):
    from deepspeed.utils import z3_leaf_module

    model = detection_model(name)
    count = mark_layers_as_zero3_leaves(model, stride=32)
    assert count == sum(1 for module in model.modules() if z3_leaf_module(module))
    assert not z3_leaf_module(model.model[0])


def test_a_one_channel_model_is_probed_with_its_own_input_channels():
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolov8n.yaml", ch=1, nc=3, verbose=False)
    assert len(zero3_leaves(model, stride=32)) == 21
