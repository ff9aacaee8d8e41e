import pytest
import yaml

from nas.config import ConfigError
from search_spaces import ArchConfig, MoEConfig, build_model, count_params, load_arch, preset_names

from archs import tiny, tiny_moe


def test_yaml_round_trip_keeps_every_field(tmp_path):
    cfg = tiny_moe(experts=6, top_k=2, layers=(2, 1), routing="per_token")
    path = cfg.save(tmp_path / "arch.yaml")
    loaded = ArchConfig.load(path)
    assert loaded == cfg
    assert loaded.to_dict() == cfg.to_dict()
    assert loaded.config_hash() == cfg.config_hash()
    assert yaml.safe_load(path.read_text())["moe"]["layers"] == [1, 2]  # stored sorted


def test_hash_ignores_layer_order_but_not_fields():
    a = tiny_moe(layers=(1, 2))
    assert a.config_hash() == tiny_moe(layers=(2, 1)).config_hash()
    assert a.config_hash() != tiny_moe(layers=(2,)).config_hash()
    assert a.config_hash() != a.dense().config_hash()


def test_zero_experts_means_dense():
    cfg = ArchConfig.from_dict({**tiny().to_dict(), "moe": {"num_experts": 0}})
    assert cfg.moe is None and not cfg.is_moe
    assert cfg == tiny()


def test_names_say_what_the_model_is():
    assert tiny().name == "vit-3x16h2-p4-8-r2"
    assert tiny_moe(experts=4, top_k=2, layers=(1, 2)).name == "vmoe-3x16h2-p4-8-r2-e4k2-pi-L1.2"
    assert load_arch("vit-12x192").name == "vit-12x192h3-p16-224"


def test_presets_cover_the_paper_grid():
    names = set(preset_names())
    for shape in ("12x384", "12x192", "9x192", "6x192", "9x96", "6x64"):
        assert {f"vit-{shape}", f"vmoe-{shape}"} <= names
        moe = load_arch(f"vmoe-{shape}")
        assert moe.moe.num_experts == 10
        assert moe.moe_layers == (moe.depth - 2, moe.depth - 1)
        assert moe.dense() == load_arch(f"vit-{shape}")
    assert any(n.startswith("fmnist-") for n in names)


BAD_CONFIGS = [
    ({"width": 190, "num_heads": 3}, "num_heads", "not divisible"),
    ({"image_size": 30, "patch_size": 4}, "patch_size", "not divisible"),
    ({"depth": 0}, "depth", ">= 1"),
    ({"depth": 10**6, "width": 1, "num_heads": 1}, "depth", "<= MAX_DEPTH=1000"),
    ({"width": -8}, "width", ">= 1"),
    ({"num_classes": 2.5}, "num_classes", "integer"),
    ({"mlp_ratio": 0}, "mlp_ratio", "positive"),
    ({"mlp_ratio": float("inf")}, "mlp_ratio", "positive"),
    ({"mlp_ratio": float("nan")}, "mlp_ratio", "positive"),
    ({"mlp_ratio": 0.01}, "mlp_ratio", "zero-width MLP"),
    ({1: 2, "colour": "red"}, "1", "unknown field"),
    ({"colour": "red"}, "colour", "unknown field"),
    ({"moe": {"num_experts": 4, "top_k": 5, "layers": [1]}}, "moe.top_k", "num_experts=4"),
    ({"moe": {"num_experts": 4, "top_k": 0, "layers": [1]}}, "moe.top_k", ">= 1"),
    ({"moe": {"num_experts": 4, "layers": [1, 1]}}, "moe.layers", "unique"),
    ({"moe": {"num_experts": 4, "layers": [3]}}, "moe.layers", "outside [0, depth=3)"),
    ({"moe": {"num_experts": 4, "layers": [-1]}}, "moe.layers", "outside"),
    ({"moe": {"num_experts": 4, "layers": []}}, "moe.layers", "non-empty"),
    ({"moe": {"num_experts": 4, "layers": [0, 1]}}, "moe.layers", "dense block before the first MoE"),
    ({"moe": {"num_experts": 4, "layers": [1], "routing": "per_patch"}}, "moe.routing", "per_image"),
    ({"moe": {"num_experts": 4, "layers": [1], "router_loss_weight": -1}}, "moe.router_loss_weight", ">= 0"),
    ({"moe": {"num_experts": 4, "layers": [1], "router_loss_weight": float("nan")}}, "moe.router_loss_weight", ">= 0"),
    ({"moe": {"num_experts": 4, "layers": [1], "capacity": 2}}, "moe.capacity", "unknown field"),
]


@pytest.mark.parametrize("change, field, message", BAD_CONFIGS, ids=[c[1] + ":" + c[2] for c in BAD_CONFIGS])
def test_bad_config_names_the_field(change, field, message):
    data = {**tiny().to_dict(), **change}
    with pytest.raises(ConfigError) as error:
        ArchConfig.from_dict(data)
    assert error.value.field == field
    assert str(error.value).startswith(f"{field}: ")
    assert message in str(error.value)


def test_per_token_may_start_at_block_zero():
    assert tiny_moe(layers=(0, 1), routing="per_token").moe_layers == (0, 1)


def test_bad_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "arch.yaml"
    path.write_text("depth: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        ArchConfig.load(path)
    path.write_text(yaml.safe_dump({**tiny().to_dict(), "depth": -1}))
    with pytest.raises(ConfigError, match=f"depth: must be >= 1, got -1 \\(in {path}\\)"):
        ArchConfig.load(path)
    with pytest.raises(ConfigError, match="neither a file nor a preset"):
        load_arch("no-such-preset")


@pytest.mark.parametrize(
    "cfg", [tiny(), tiny(mlp_ratio=3.0, num_classes=7), tiny_moe(experts=5, top_k=3, layers=(2,)),
            tiny_moe(layers=(0, 2), routing="per_token"), load_arch("vmoe-6x64")], ids=lambda c: c.name)
def test_num_params_is_what_the_model_allocates(cfg):
    assert cfg.num_params == count_params(build_model(cfg))[0]


def test_a_model_past_max_params_is_refused_before_it_is_built():
    for change in ({"mlp_ratio": 1e9}, {"width": 10**6, "num_heads": 1}, {"image_size": 10**6, "patch_size": 1}):
        with pytest.raises(ConfigError, match="width: this model would have .* parameters, more than MAX_PARAMS"):
            ArchConfig.from_dict({**tiny().to_dict(), **change})


def test_yaml_aliases_expand_within_a_bound():
    text = tiny().to_yaml().replace("in_channels: 1", "in_channels: &c 1").replace("num_classes: 5", "num_classes: *c")
    assert ArchConfig.from_yaml(text).num_classes == 1  # PyYAML writes aliases for shared objects
    bomb = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"{x}: &{x} [{', '.join([f'*{y}'] * 10)}]\n" for y, x in zip("abcd", "bcde"))  # 10**5 values, 150 bytes
    with pytest.raises(ConfigError, match="more than 100,000 values once its aliases"):
        ArchConfig.from_yaml(bomb)
    with pytest.raises(ConfigError, match="alias .* inside its own anchor .* at line 1"):
        ArchConfig.from_yaml("width: &w [1, *w]")
    assert ArchConfig.from_yaml(tiny().to_yaml().encode()) == tiny()  # bytes are read as UTF-8


def test_moe_config_defaults_follow_the_paper():
    moe = MoEConfig(layers=(10, 11))
    assert (moe.num_experts, moe.top_k, moe.routing, moe.router_loss_weight) == (10, 1, "per_image", 0.3)
