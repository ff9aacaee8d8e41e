import json

import numpy as np
import pytest
import torch

from nas.cli import main
from search_spaces import MoEConfig, build_model, count_params, describe, load_arch, preset_names
from search_spaces.model import Routing

from archs import tiny, tiny_moe


def expected_params(cfg):
    """Hand-derived parameter counts (total, active per image) of the ViT family."""
    C, H, P = cfg.width, cfg.mlp_hidden, cfg.patch_size
    embed = cfg.in_channels * P * P * C + C + C + cfg.num_tokens * C  # conv, cls token, positions
    attn = 2 * C + (3 * C * C + 3 * C) + (C * C + C) + 2 * C  # norm1, qkv, proj, norm2
    mlp = (C * H + H) + (H * C + C)
    head = 2 * C + C * cfg.num_classes + cfg.num_classes  # final norm, linear head
    shared = embed + cfg.depth * attn + head
    if not cfg.moe:
        total = shared + cfg.depth * mlp
        return total, total
    E, k, L = cfg.moe.num_experts, cfg.moe.top_k, len(cfg.moe.layers)
    dense_mlps = (cfg.depth - L) * mlp
    routers = C * E * (1 if cfg.moe.routing == "per_image" else L)
    total = shared + dense_mlps + L * E * mlp + routers
    active = shared + dense_mlps + L * k * mlp + routers
    return total, active


def test_vit_tiny_has_the_standard_parameter_count():
    assert count_params(build_model(load_arch("vit-12x192"))) == (5_717_416, 5_717_416)


@pytest.mark.parametrize(
    "cfg",
    [
        tiny(),
        tiny(depth=4, width=24, heads=3, mlp_ratio=3.0, num_classes=7),
        tiny_moe(experts=4, top_k=1),
        tiny_moe(experts=5, top_k=3, layers=(2,)),
        tiny_moe(experts=4, top_k=2, layers=(0, 2), routing="per_token"),
        load_arch("vmoe-12x192"),
    ],
    ids=lambda c: c.name,
)
def test_param_counts_match_formula(cfg):
    assert count_params(build_model(cfg)) == expected_params(cfg)


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_builds_and_runs(name):
    cfg = load_arch(name)
    model = build_model(cfg).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size))
    assert logits.shape == (2, cfg.num_classes)
    assert torch.isfinite(logits).all()


def images(cfg, batch):
    return torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size)


def test_unselected_experts_do_not_touch_an_image():
    cfg = tiny_moe(experts=4, top_k=2, layers=(1, 2))
    model = build_model(cfg).eval()
    x = images(cfg, 1)
    with torch.no_grad():
        before = model(x, with_aux=True)
        chosen = set(before.router_logits.topk(2).indices[0].tolist())
        for block in (1, 2):
            experts = model.blocks[block].mlp
            for e in set(range(4)) - chosen:
                experts.fc1_weight[e].normal_()
                experts.fc2_bias[e].fill_(100.0)
        after = model(x)
        assert torch.equal(before.logits, after)
        experts.fc1_weight[sorted(chosen)[0]].normal_()  # a chosen expert does change it
        assert not torch.allclose(before.logits, model(x))


def test_image_output_is_the_same_alone_or_in_a_batch():
    cfg = tiny_moe(experts=4, top_k=2)
    model = build_model(cfg).eval()
    x = images(cfg, 6)
    with torch.no_grad():
        batched = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)


def test_k_equal_e_is_the_gate_weighted_sum_of_all_experts():
    cfg = tiny_moe(experts=3, top_k=3, layers=(2,))
    model = build_model(cfg).eval()
    x = images(cfg, 4)
    with torch.no_grad():
        out = model(x, with_aux=True)
        gates = out.router_logits.softmax(-1)  # k = E: the renormalised gates are the full softmax
        # Recompute by hand: run blocks 0-1, then block 2 with an explicit sum over all experts.
        block = model.blocks[2]
        h = model.patch_embed(x).flatten(2).transpose(1, 2)
        h = torch.cat([model.cls_token.expand(4, -1, -1), h], 1) + model.pos_embed
        for b in model.blocks[:2]:
            h = b(h, None)
        h = h + block.attn(block.norm1(h))
        z = block.norm2(h)
        mixed = sum(gates[:, e, None, None] * block.mlp.expert_mlp(z, e) for e in range(3))
        logits = model.forward_head(model.norm(h + mixed))
    torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-5)


def test_per_image_router_reads_the_class_token_entering_the_first_moe_block():
    cfg = tiny_moe(experts=4, layers=(2,))
    model = build_model(cfg).eval()
    x = images(cfg, 3)
    with torch.no_grad():
        out = model(x, with_aux=True)
        h = model.patch_embed(x).flatten(2).transpose(1, 2)
        h = torch.cat([model.cls_token.expand(3, -1, -1), h], 1) + model.pos_embed
        for b in model.blocks[:2]:
            h = b(h, None)
        torch.testing.assert_close(out.router_logits, model.router.linear(h[:, 0]))
    assert out.aux_loss is None


def test_per_token_model_gives_load_balancing_loss_and_trains():
    cfg = tiny_moe(experts=4, top_k=2, layers=(0, 2), routing="per_token")
    model = build_model(cfg)
    out = model(images(cfg, 4), with_aux=True)
    assert out.router_logits is None
    assert out.aux_loss.ndim == 0 and out.aux_loss.item() >= 2 * 1.0 - 1e-4  # >= 1 per MoE block
    (out.logits.sum() + out.aux_loss).backward()
    assert model.blocks[0].mlp.router.weight.grad.abs().sum() > 0


def test_per_token_outputs_do_not_depend_on_the_batch():
    cfg = tiny_moe(experts=4, top_k=1, layers=(1,), routing="per_token")
    model = build_model(cfg).eval()
    x = images(cfg, 5)
    with torch.no_grad():
        torch.testing.assert_close(model(x), torch.cat([model(x[i : i + 1]) for i in range(5)]), atol=1e-5, rtol=0)


def test_per_token_layer_gives_each_token_the_gate_weighted_sum_of_its_top_k_experts():
    cfg = tiny_moe(experts=4, top_k=2, layers=(1,), routing="per_token")
    layer = build_model(cfg).blocks[1].mlp.eval()
    x = torch.randn(3, 5, cfg.width)
    with torch.no_grad():
        out = layer(x, Routing()).reshape(-1, cfg.width)
        tokens = x.reshape(-1, cfg.width)
        gates, experts = layer.router(tokens).softmax(-1).topk(2)
        expected = torch.stack([sum(g * layer.expert_mlp(token[None], e)[0] for g, e in zip(gs, es.tolist()))
                                for token, gs, es in zip(tokens, gates, experts)])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_dense_model_has_no_routing_outputs():
    out = build_model(tiny())(images(tiny(), 2), with_aux=True)
    assert out.router_logits is None and out.aux_loss is None


def test_describe_cli_json(capsys):
    assert main(["describe", "vmoe-6x64", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    cfg = load_arch("vmoe-6x64")
    assert (info["params_total"], info["params_active"]) == expected_params(cfg)
    assert [b["mlp"] for b in info["blocks"]] == ["dense"] * 4 + ["moe-per_image"] * 2
    assert info == json.loads(json.dumps(describe(cfg)))


def test_describe_cli_bad_file_is_one_clear_error(capsys, tmp_path):
    assert main(["describe", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert "no architecture file at" in err and "Traceback" not in err


def test_k1_router_gets_a_gradient_from_the_task_alone():
    """The one renormalised gate at k=1 is the constant 1 in value; its gradient must still reach the router,
    or a router without the super-class loss never learns."""
    cfg = tiny_moe(experts=4, top_k=1)
    model = build_model(cfg).train()
    x, labels = images(cfg, 8), torch.randint(0, cfg.num_classes, (8,))
    out = model(x, with_aux=True)
    torch.nn.functional.cross_entropy(out.logits, labels).backward()
    router = model.router.linear.weight.grad.norm()
    assert router > 1e-5 * model.blocks[0].mlp.fc1.weight.grad.norm()  # ~5e-4 of it; the old gate gave 1e-11
    with torch.no_grad():  # the forward pass is unchanged: training and inference paths agree
        torch.testing.assert_close(out.logits, model.eval()(x), rtol=0, atol=1e-5)


def test_end_to_end_router_balances_its_load_in_training_only():
    cfg = tiny(moe=MoEConfig(num_experts=4, top_k=1, layers=(1, 2), router_loss_weight=0))
    model = build_model(cfg)
    assert model(images(cfg, 8), with_aux=True).aux_loss.item() >= 1.0 - 1e-4  # Switch loss: 1 when uniform
    assert model.eval()(images(cfg, 8), with_aux=True).aux_loss is None
    assert build_model(tiny_moe()).train()(images(cfg, 8), with_aux=True).aux_loss is None  # super-class loss


@pytest.mark.slow
def test_end_to_end_router_learns_to_route_by_super_class():
    """router_loss_weight 0, a short training on synthetic data: the router leaves its initialisation (before,
    weight decay only scaled it), routes images elsewhere than its initial weights would on the same features,
    and its experts line up with the super-classes far better than chance."""
    from nas.data import load_dataset
    from nas.recipe import TrainRecipe
    from nas.stats import mutual_information
    from nas.trainer import train

    data = load_dataset("synthetic:train=2000,test=10")
    cfg = tiny(image_size=16, depth=4, width=32, num_classes=12,
               moe=MoEConfig(num_experts=4, top_k=1, layers=(2, 3), router_loss_weight=0))
    torch.manual_seed(0)  # the trainer builds the model after seeding with the recipe's seed
    initial = build_model(cfg).router.linear.weight.detach().clone()
    result = train(cfg, data, TrainRecipe(steps=200, batch_size=64, lr=3e-3, augment=False, eval_every=10**9,
                                          num_threads=1))
    model, tokens = result.model.eval(), []
    model.router.register_forward_hook(lambda module, args, out: tokens.append(args[0]))  # (B, C) class tokens
    with torch.no_grad():
        model(data.normalize(data.val.images))
    learned, kept = model.router.linear(tokens[0]).argmax(-1).numpy(), (tokens[0] @ initial.T).argmax(-1).numpy()
    weight = model.router.linear.weight.detach()
    assert torch.nn.functional.cosine_similarity(weight.flatten(), initial.flatten(), dim=0) < 0.99
    assert (learned != kept).mean() > 0.05  # 0 before: a scaled router picks as before
    groups = data.superclasses[data.val.labels.numpy()]
    shuffled = [mutual_information(learned, np.random.default_rng(i).permutation(groups)) for i in range(20)]
    assert mutual_information(learned, groups) > max(shuffled) + 0.2  # bits, of at most 2
