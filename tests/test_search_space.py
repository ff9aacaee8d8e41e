import optuna
import pytest

from nas.config import ConfigError
from search_spaces import load_arch
from search_spaces.mobile_vmoe import InvalidArchitecture, MobileVMoESpace, placement_layers


class FixedTrial:
    """Answers each suggestion from a dict and records which parameters were asked for."""

    def __init__(self, params):
        self.params = params
        self.asked = []

    def suggest_categorical(self, name, choices):
        assert self.params[name] in choices
        self.asked.append(name)
        return self.params[name]


SHAPE = dict(image_size=28, in_channels=1, num_classes=10)


@pytest.mark.parametrize(
    "placement, depth, layers",
    [("last1", 6, (5,)), ("last2", 6, (4, 5)), ("last3", 4, (1, 2, 3)), ("alternate", 8, (5, 7)),
     ("alternate", 6, (3, 5)), ("alternate", 4, (3,)), ("2,4", 6, (2, 4))],
)
def test_placements(placement, depth, layers):
    assert placement_layers(placement, depth) == layers


def test_dense_trial_samples_no_moe_parameters():
    space = MobileVMoESpace()
    trial = FixedTrial(dict(depth=6, width=64, patch_size=4, mlp_ratio=4.0, num_experts=0))
    cfg = space.sample(trial, **SHAPE)
    assert cfg.moe is None and cfg.num_heads == 4  # width // head_width
    assert set(trial.asked) == {"depth", "width", "patch_size", "mlp_ratio", "num_experts"}


def test_moe_trial_builds_the_sampled_architecture():
    space = MobileVMoESpace(routings=("per_image", "per_token"))
    params = dict(depth=8, width=48, patch_size=7, mlp_ratio=2.0, num_experts=8, top_k=2, moe_placement="alternate",
                  routing="per_token", router_loss_weight=0.3)
    cfg = space.sample(FixedTrial(params), **SHAPE)
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.layers, cfg.moe.routing) == (8, 2, (5, 7), "per_token")
    assert space.params_for(cfg) == params


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(num_experts=4, top_k=8), "moe.top_k"),
        (dict(depth=2, moe_placement="last3"), "dense block before"),  # per-image MoE would start at block 0
    ],
)
def test_invalid_combinations_are_rejected(params, message):
    space = MobileVMoESpace(depths=(2, 4), top_k=(1, 8))
    base = dict(depth=4, width=32, patch_size=4, mlp_ratio=2.0, num_experts=4, top_k=1, moe_placement="last2",
                routing="per_image", router_loss_weight=0.3)
    with pytest.raises(InvalidArchitecture, match=message):
        space.sample(FixedTrial({**base, **params}), **SHAPE)


def test_space_is_encoded_with_fixed_categorical_sets():
    """Every parameter keeps one distribution across trials, so samplers never see dynamic ranges."""
    space = MobileVMoESpace()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    distributions = {}
    for _ in range(40):
        trial = study.ask()
        try:
            space.sample(trial, **SHAPE)
        except InvalidArchitecture:
            pass
        for name, dist in trial.distributions.items():
            assert distributions.setdefault(name, dist) == dist
        study.tell(trial, 0.0)
    assert {"top_k", "moe_placement", "num_experts"} <= set(distributions)


def test_params_for_a_preset_and_out_of_space_error():
    space = MobileVMoESpace(widths=(32, 64), num_experts=(0, 4), depths=(6,), head_width=32)
    assert space.params_for(load_arch("fmnist-vmoe-6x64"))["moe_placement"] == "last2"
    with pytest.raises(ConfigError, match="width=192"):
        MobileVMoESpace(head_width=64, widths=(64,), depths=(12,), patch_sizes=(16,), num_experts=(0, 10)).params_for(
            load_arch("vmoe-12x192"))


@pytest.mark.parametrize(
    "change, field",
    [({"depths": []}, "space.depths"), ({"num_experts": [-1]}, "space.num_experts"),
     ({"routings": ["per_patch"]}, "space.routings"), ({"placements": ["first2"]}, "space.placements"),
     ({"mlp_ratios": [0]}, "space.mlp_ratios"), ({"head_width": None}, "space.head_width"),
     ({"colour": 1}, "space.colour"), ({"mlp_ratios": [float("inf")]}, "space.mlp_ratios"),
     ({"router_loss_weights": [float("nan")]}, "space.router_loss_weights"), ({"head_width": True}, "space.head_width"),
     ({"placements": ["last0"]}, "space"), ({"depths": [10**30]}, "space.depths"),
     ({"widths": [48], "head_width": 5}, "space")],
)
def test_bad_space_names_the_field(change, field):
    with pytest.raises(ConfigError) as error:
        MobileVMoESpace.from_dict(change)
    assert error.value.field == field


def test_smallest_dense_is_the_cheapest_dense_choice_that_fits_the_image():
    space = MobileVMoESpace(patch_sizes=(4, 7), depths=(6, 4), widths=(48, 32), mlp_ratios=(4.0, 2.0),
                            num_experts=(4, 8))  # a space without dense trials still has a dense anchor
    arch = space.smallest_dense(image_size=28, in_channels=1, num_classes=10)
    assert (arch.depth, arch.width, arch.num_heads, arch.patch_size, arch.mlp_ratio) == (4, 32, 2, 7, 2.0)
    assert arch.moe is None
    odd = MobileVMoESpace(patch_sizes=(5, 4), depths=(4,), widths=(32,))
    assert odd.smallest_dense(image_size=28, in_channels=1, num_classes=10).patch_size == 4  # 5 does not divide 28
