"""A found architecture in the user's own training: timm builds it by name, and the paper's loss is one call
that equals the trainer's."""

import json

import timm
import torch
from timm.data import resolve_data_config

from nas.trainer import Loss
from search_spaces import VisionMoE
from search_spaces.timm_entry import mobile_vmoe_loss, router_loss

from archs import tiny_moe


def test_timm_creates_the_architecture_from_its_yaml(tmp_path):
    path = tmp_path / "arch.yaml"
    path.write_text(tiny_moe().to_yaml())
    model = timm.create_model("mobile_vmoe", arch=str(path), num_classes=7)
    assert isinstance(model, VisionMoE) and model.cfg.num_classes == 7 and model.cfg.moe == tiny_moe().moe
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 7)
    assert "mobile_vmoe" in timm.list_models("mobile_vmoe")


def test_timm_resolves_the_models_real_input(tmp_path):
    path = tmp_path / "arch.yaml"
    path.write_text(tiny_moe().to_yaml())
    model = timm.create_model("mobile_vmoe", arch=str(path), num_classes=7)
    config = resolve_data_config(model=model)
    assert config["input_size"] == (1, 8, 8) and config["mean"] == (0.5,)  # not 224 px ImageNet
    assert model.pretrained_cfg["num_classes"] == 7 and model.pretrained_cfg["classifier"] == "head"
    (tmp_path / "input.json").write_text(json.dumps({"mean": [0.3], "std": [0.2]}))  # as vmoe-nas export writes it
    config = resolve_data_config(model=timm.create_model("mobile_vmoe", arch=str(path)))
    assert (config["mean"], config["std"]) == ((0.3,), (0.2,))
    overlaid = timm.create_model("mobile_vmoe", arch=str(path), pretrained_cfg_overlay={"std": (0.1,)})
    assert resolve_data_config(model=overlaid)["std"] == (0.1,)
    assert timm.models.get_pretrained_cfg("mobile_vmoe").input_size == (3, 224, 224)  # vmoe-12x192, the default


def test_the_loss_helper_equals_the_trainers_loss():
    torch.manual_seed(0)
    model = timm.create_model("mobile_vmoe", arch=tiny_moe())
    out = model(torch.randn(6, 1, 8, 8), with_aux=True)
    labels, groups = torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([0, 0, 1, 2, 3])
    ours = mobile_vmoe_loss(out.logits, out.router_logits, labels, groups, router_weight=0.3, label_smoothing=0.1)
    trainers = Loss(label_smoothing=0.1, groups=groups, router_weight=0.3)(out, labels)
    torch.testing.assert_close(ours, trainers)
    assert router_loss(out.router_logits, labels, groups) > 0
    dense = mobile_vmoe_loss(out.logits, None, labels, None)
    torch.testing.assert_close(dense, torch.nn.functional.cross_entropy(out.logits, labels))
