"""A found architecture in the user's own training: timm builds it by name, and the paper's loss is one call
that equals the trainer's."""

import json

import pytest
import timm
import torch
from timm.data import resolve_data_config

from nas.config import ConfigError
from nas.trainer import Loss
from search_spaces import VisionMoE
from search_spaces.model import Routing
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


# --- issue 22, item 17: what timm users expect, and clear refusals --------------------------------------------


def test_num_classes_zero_gives_pooled_features():
    """timm's "no head": it was refused."""
    model = timm.create_model("mobile_vmoe", arch=tiny_moe(), num_classes=0)
    assert isinstance(model.head, torch.nn.Identity) and model.cfg.num_classes == 0
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, tiny_moe().width)
    assert sum(p.numel() for p in model.parameters()) == model.cfg.num_params


def test_global_pool_chooses_what_the_head_reads():
    torch.manual_seed(0)
    images = torch.randn(2, 1, 8, 8)
    pooled = {pool: timm.create_model("mobile_vmoe", arch=tiny_moe(), num_classes=0, global_pool=pool).eval()
              for pool in ("token", "avg", "max", "")}
    for model in pooled.values():
        model.load_state_dict(pooled["token"].state_dict())
    tokens = pooled["token"].forward_features(images, Routing())  # (B, N, C)
    torch.testing.assert_close(pooled["token"](images), tokens[:, 0])
    torch.testing.assert_close(pooled["avg"](images), tokens[:, 1:].mean(1))
    torch.testing.assert_close(pooled["max"](images), tokens[:, 1:].amax(1))
    assert pooled[""](images).shape == tokens.shape
    with pytest.raises(ConfigError, match="global_pool: must be one of"):
        timm.create_model("mobile_vmoe", arch=tiny_moe(), global_pool="map")


def test_drop_path_rate_is_stochastic_depth_in_training_only():
    """It was silently ignored."""
    model = timm.create_model("mobile_vmoe", arch=tiny_moe(), drop_path_rate=0.5)
    rates = [block.drop_path.p if hasattr(block.drop_path, "p") else 0.0 for block in model.blocks]
    assert rates[0] == 0.0 and rates[-1] == 0.5  # rising over the blocks, as in timm
    images = torch.randn(8, 1, 8, 8)
    model.eval()
    torch.testing.assert_close(model(images), model(images))
    model.train()
    torch.manual_seed(0)
    first = model(images)
    assert not torch.allclose(first, model(images))


@pytest.mark.parametrize("option, value", [("drop_rate", 0.1), ("features_only", True), ("out_indices", (1,))])
def test_options_not_implemented_are_refused_by_name(option, value):
    with pytest.raises(ConfigError, match=f"^{option}: mobile_vmoe does not implement it"):
        timm.create_model("mobile_vmoe", arch=tiny_moe(), **{option: value})


def test_arch_must_be_given_and_a_file_that_is_not_yaml_is_never_quoted(tmp_path):
    with pytest.raises(ConfigError, match="arch: mobile_vmoe needs arch="):
        timm.create_model("mobile_vmoe")  # arch=None: timm drops it; it built a 1000-class model
    with pytest.raises(ConfigError, match="arch: .*got 123"):
        timm.create_model("mobile_vmoe", arch=123)
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    as_yaml = tmp_path / "string.yaml"
    as_yaml.write_text(secret.read_text())  # valid YAML: one string, which an error quoted
    for path in (secret, as_yaml):
        with pytest.raises(ConfigError) as error:
            timm.create_model("mobile_vmoe", arch=str(path))
        assert "root:x" not in str(error.value) and str(path) in str(error.value)
