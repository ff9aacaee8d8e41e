"""The weight-sharing supernet: subnets equal their extracted models, slices are the leading ones, a space it
cannot hold is one error naming the field, and its training resumes and refuses another space's checkpoint."""

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from nas.config import ConfigError
from nas.study import StudyConfig, load_study_config
from search_spaces import ArchConfig, MoEConfig
from search_spaces.mobile_vmoe import MobileVMoESpace
from search_spaces.supernet import Supernet, SupernetError, extreme_arch, random_arch

SPACE = MobileVMoESpace(patch_sizes=(4, 7), depths=(2, 3), widths=(16, 32), head_width=8, mlp_ratios=(2.0, 4.0),
                        num_experts=(0, 2, 4), top_k=(1, 2), placements=("last1", "last2"))
DIMS = {"image_size": 28, "in_channels": 1, "num_classes": 10}


def arch(depth=3, width=32, patch=4, ratio=4.0, experts=0, k=1, layers=(2,)) -> ArchConfig:
    moe = MoEConfig(experts, k, layers) if experts else None
    return ArchConfig(**DIMS, patch_size=patch, depth=depth, width=width, num_heads=width // 8, mlp_ratio=ratio,
                      moe=moe)


@pytest.fixture(scope="module")
def net() -> Supernet:
    torch.manual_seed(0)
    return Supernet(SPACE, **DIMS)


@pytest.mark.parametrize("cfg", [arch(), arch(depth=2, width=16, patch=7, ratio=2.0),
                                 arch(experts=4, k=1), arch(experts=4, k=2, layers=(1, 2)),
                                 arch(depth=2, width=16, experts=2, k=2, layers=(1,))],
                         ids=["dense-largest", "dense-small", "moe-k1", "moe-k2", "moe-small-k2"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_extract_equals_subnet_forward(net, cfg, training):
    images = torch.randn(6, 1, 28, 28)
    net.train(training)
    extracted = net.extract(cfg)
    assert type(extracted).__name__ == "VisionMoE" and extracted.cfg == cfg
    with torch.no_grad():
        assert torch.equal(net(images, cfg), extracted(images))
        if cfg.is_moe:  # the routing itself, not only the logits
            assert torch.equal(net(images, cfg, with_aux=True).router_logits,
                               extracted(images, with_aux=True).router_logits)


def test_subnets_are_leading_slices_and_share_them(net):
    small, large = arch(width=16, ratio=2.0, experts=2, layers=(2,)), arch(experts=4, layers=(2,))
    a, b = net.extract(small).state_dict(), net.extract(large).state_dict()
    assert torch.equal(a["blocks.0.mlp.fc1.weight"], b["blocks.0.mlp.fc1.weight"][:32, :16])
    assert torch.equal(a["blocks.2.mlp.fc1_weight"], b["blocks.2.mlp.fc1_weight"][:2, :16, :32])  # first E experts
    q, k = a["blocks.1.attn.qkv.weight"], b["blocks.1.attn.qkv.weight"]
    assert torch.equal(q[16:32], k[32:48, :16])  # k's rows: the leading 16 of the largest's k block
    assert torch.equal(a["pos_embed"], b["pos_embed"][..., :16])
    assert a["router.linear.weight"].shape == (2, 16) and b["router.linear.weight"].shape == (4, 32)
    patch7 = net.extract(arch(patch=7)).state_dict()
    assert patch7["patch_embed.weight"].shape == (32, 1, 7, 7) and patch7["pos_embed"].shape == (1, 17, 32)


def test_gradients_reach_only_the_subnets_slices(net):
    net.zero_grad(set_to_none=True)
    net.train()
    cfg = arch(depth=2, width=16, ratio=2.0, experts=2, layers=(1,))
    net(torch.randn(4, 1, 28, 28), cfg, with_aux=True).logits.sum().backward()
    trunk = net.trunks["4"]
    grad = trunk.blocks[1].experts.fc1_weight.grad
    assert grad[:2, :16, :32].abs().sum() > 0 and grad[2:].abs().sum() == 0 and grad[:, 16:].abs().sum() == 0
    assert trunk.blocks[2].norm1.weight.grad is None and trunk.routers["4"].weight.grad is None
    assert all(p.grad is None for p in net.trunks["7"].parameters())  # another patch size: another trunk


def test_each_patch_size_has_a_trunk_of_its_own(net):
    patch4, patch7 = (net.extract(arch(patch=p)).state_dict() for p in (4, 7))
    assert patch4["blocks.0.attn.qkv.weight"].shape == patch7["blocks.0.attn.qkv.weight"].shape
    assert not torch.equal(patch4["blocks.0.attn.qkv.weight"], patch7["blocks.0.attn.qkv.weight"])


def test_the_sandwich_takes_one_trunk_a_step_in_turn():
    from nas.supernet import Sandwich

    sandwich = Sandwich(SPACE, DIMS, random=2, seed=0)
    for step, patch in ((0, 4), (1, 7), (2, 4), (7, 7)):
        largest, smallest, *drawn = sandwich.at(step)
        assert {a.patch_size for a in (largest, smallest, *drawn)} == {patch} and len(drawn) == 2
        assert (largest.depth, largest.width, largest.moe.num_experts) == (3, 32, 4)
        assert (smallest.depth, smallest.width, smallest.moe) == (2, 16, None)
    assert sandwich.largest.patch_size == 4 and sandwich.smallest.patch_size == 7  # the space's, for its curve


def test_without_the_sandwich_a_step_trains_its_random_draws_alone():
    from nas.supernet import Sandwich

    sandwich, single = (Sandwich(SPACE, DIMS, random=1, seed=0, with_extremes=on) for on in (True, False))
    for step in range(6):
        drawn = single.at(step)
        assert len(drawn) == 1 and drawn[0].patch_size == (4, 7)[step % 2]
        assert drawn == sandwich.at(step)[2:]  # the same draws, the extremes left out


def test_extremes_and_random_draws_are_subnets(net):
    largest, smallest = (extreme_arch(SPACE, big, **DIMS) for big in (True, False))
    assert (largest.depth, largest.width, largest.patch_size, largest.mlp_ratio) == (3, 32, 4, 4.0)
    assert largest.moe.num_experts == 4 and largest.moe.top_k == 2 and len(largest.moe.layers) == 2
    assert (smallest.depth, smallest.width, smallest.patch_size, smallest.moe) == (2, 16, 7, None)
    generator = torch.Generator().manual_seed(0)
    draws = [random_arch(SPACE, generator, **DIMS) for _ in range(30)]
    assert len({d.config_hash() for d in draws}) > 10
    for d in draws:
        net.check_arch(d)


@pytest.mark.parametrize("change, field", [({"routings": ("per_token",)}, "space.routings"),
                                           ({"patch_sizes": (5,)}, "space.patch_sizes")])
def test_a_space_the_supernet_cannot_hold_is_one_error(change, field):
    with pytest.raises(SupernetError) as error:
        Supernet(dataclasses.replace(SPACE, **change), **DIMS)
    assert error.value.field == field


def test_an_arch_outside_the_supernet_is_refused_by_field(net):
    with pytest.raises(ConfigError) as error:
        net.subnet_state(arch(depth=4, layers=(3,)))
    assert error.value.field == "depth"
    with pytest.raises(ConfigError) as error:
        net.subnet_state(arch(experts=8, layers=(2,)))
    assert error.value.field == "moe.num_experts"


# ---------------------------------------------------------------- study config and training

TINY = {"study_name": "tiny-oneshot", "data": {"name": "synthetic", "limit": 300},
        "space": {"patch_sizes": [4], "depths": [2], "widths": [8, 16], "head_width": 8, "mlp_ratios": [2.0],
                  "num_experts": [0, 4], "top_k": [1], "placements": ["last1"]},
        "objectives": ["accuracy", "flops"], "n_trials": 4,
        "evaluator": {"kind": "supernet", "steps": 8, "batch_size": 16, "eval_every": 2, "random_subnets": 1},
        "confirm": {"enabled": False}}


def tiny(tmp_path, **changes) -> StudyConfig:
    data = {**TINY, "results_dir": str(tmp_path), **changes}
    return StudyConfig.from_dict(data)


@pytest.mark.parametrize("evaluator, field", [
    ({"kind": "oneshot", "steps": 5}, "evaluator.kind"),
    ({"kind": "supernet", "min_steps": 5, "max_steps": 10}, "evaluator.min_steps"),
    ({"kind": "supernet", "steps": 5, "random_subnets": -1}, "evaluator.random_subnets"),
    ({"steps": 5, "random_subnets": 2}, "evaluator.random_subnets"),  # a supernet option, for kind: train
    ({"kind": "supernet", "steps": 5, "sandwich": False}, "evaluator.distill"),  # no largest to learn from
    ({"kind": "supernet", "steps": 5, "sandwich": False, "distill": False, "random_subnets": 0},
     "evaluator.random_subnets"),  # a step that trains nothing
    ({"kind": "supernet", "steps": 5, "sandwich": "no"}, "evaluator.sandwich"),
])
def test_evaluator_kind_and_options_are_checked(tmp_path, evaluator, field):
    with pytest.raises(ConfigError) as error:
        tiny(tmp_path, evaluator=evaluator)
    assert error.value.field == field


def test_a_supernet_study_confirming_needs_its_standalone_steps(tmp_path):
    with pytest.raises(ConfigError) as error:
        tiny(tmp_path, confirm={"enabled": True})
    assert error.value.field == "confirm.steps"


@pytest.mark.slow
def test_supernet_checkpoint_of_another_space_is_refused_by_name(tmp_path):
    from nas.supernet import checkpoint_dir, identity, load_supernet, train_supernet
    from nas.trainer import TrainingError
    from nas.trial import build_context

    cfg = tiny(tmp_path)
    ctx = build_context(cfg)
    result = train_supernet(ctx)
    assert result.steps == 8 and result.train_images == 8 * 16 * 3
    assert result.checkpoint.parent == checkpoint_dir(cfg.study_dir, identity(result.net, ctx.recipe, cfg.supernet,
                                                                              ctx.dataset.name))
    other = dataclasses.replace(cfg.space, widths=(8, 16, 24))
    with pytest.raises(TrainingError, match="its space differs") as error:
        load_supernet(result.checkpoint, other, ctx.dataset, ctx.recipe, cfg.supernet)
    assert str(result.checkpoint) in str(error.value)
    again = train_supernet(ctx)  # finished: loaded, not trained again
    assert all(torch.equal(a, b) for a, b in zip(again.net.state_dict().values(), result.net.state_dict().values()))


@pytest.mark.slow
def test_a_single_path_supernet_counts_its_images_and_has_a_folder_of_its_own(tmp_path):
    from nas.supernet import train_supernet
    from nas.trial import build_context

    results = {on: train_supernet(build_context(tiny(tmp_path, evaluator={**TINY["evaluator"], "sandwich": on,
                                                                           "distill": False})))
               for on in (True, False)}
    assert results[True].train_images == 8 * 16 * 3 and results[False].train_images == 8 * 16 * 1
    assert results[False].checkpoint.parent != results[True].checkpoint.parent
    state = torch.load(results[False].checkpoint, weights_only=False)
    assert state["state"]["loss_curve"][0][1] > 1.5  # a step's mean over its subnets: near ln 12 at first, not a third


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the one swallowed
def test_a_swallowed_sigterm_stops_supernet_training_after_its_step(tmp_path, sigterm_swallowed_at):
    """As a trial's training (tests/test_trainer.py): a SIGTERM whose KeyboardInterrupt a weakref callback
    swallowed stops the supernet at the next step, not at its end."""
    from nas import supernet
    from nas.trial import build_context

    steps = sigterm_swallowed_at(supernet._SupernetRun, 3)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        supernet.train_supernet(build_context(tiny(tmp_path)))
    assert len(steps) == 3


@pytest.mark.slow
def test_sigterm_saves_the_supernet_at_its_step_and_the_rerun_resumes_there(tmp_path, monkeypatch):
    """Between evaluations (every 5 steps), a SIGTERM saves the step under way and stops; the rerun resumes
    there and ends with the weights of a run that never stopped."""
    from nas import supernet
    from nas.processes import interruptible
    from nas.trainer import TrainingInterrupted
    from nas.trial import build_context

    evaluator = {**TINY["evaluator"], "eval_every": 5}
    straight = supernet.train_supernet(build_context(tiny(tmp_path / "straight", evaluator=evaluator))).net
    step = supernet._SupernetRun.step

    def signalled_at_step_7(run):
        if run.state.step == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(run)

    monkeypatch.setattr(supernet._SupernetRun, "step", signalled_at_step_7)
    ctx = build_context(tiny(tmp_path / "stopped", evaluator=evaluator))
    with pytest.raises(KeyboardInterrupt, match="SIGTERM") as stopped, interruptible():  # as the CLI runs it
        supernet.train_supernet(ctx)
    assert stopped.type is TrainingInterrupted and stopped.value.step == 7
    assert torch.load(stopped.value.path, weights_only=True)["state"]["step"] == 7
    monkeypatch.setattr(supernet._SupernetRun, "step", step)
    resumed = supernet.train_supernet(ctx)
    assert resumed.steps == 8
    assert all(torch.equal(a, b) for a, b in zip(resumed.net.state_dict().values(), straight.state_dict().values()))


@pytest.mark.slow
def test_killed_supernet_training_resumes_where_it_stopped(tmp_path):
    """kill -9 after its first checkpoint; the rerun resumes there and ends with the weights of a run that
    never stopped."""
    from nas.supernet import train_supernet
    from nas.trial import build_context

    evaluator = {**TINY["evaluator"], "steps": 20, "eval_every": 5}
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({**TINY, "evaluator": evaluator, "results_dir": str(tmp_path / "killed")}))
    command = [sys.executable, "-m", "nas.cli", "supernet", "--config", str(config), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    checkpoints = tmp_path / "killed" / "tiny-oneshot" / "supernet"
    deadline = time.monotonic() + 600  # imports and data on a loaded machine
    while not list(checkpoints.glob("*/checkpoint.pt")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()[0].decode()[-2000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
    (checkpoint,) = checkpoints.glob("*/checkpoint.pt")
    stopped_at = torch.load(checkpoint, weights_only=True)["state"]["step"]
    assert 0 < stopped_at < 20
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr
    assert "20 steps" in resumed.stdout
    cfg = load_study_config(str(config), results_dir=str(tmp_path / "straight"))
    straight = train_supernet(build_context(cfg)).net.state_dict()
    killed = torch.load(checkpoint, weights_only=True)["model"]
    assert all(torch.equal(killed[name], straight[name]) for name in straight)


def test_supernet_command_refuses_a_training_study(tmp_path, capsys):
    from nas.cli import main

    assert main(["supernet", "--config", "smoke", "--results-dir", str(tmp_path), "--no-progress"]) == 2
    assert "evaluator.kind" in capsys.readouterr().err


@pytest.mark.slow
def test_one_shot_search_from_an_empty_folder_reports_and_exports_inherited_weights(tmp_path, monkeypatch, capsys):
    """`vmoe-nas search --config smoke-oneshot` (cut to 8 trials): every trial scored by the supernet, the
    confirmation standalone, the report labels both, and export writes the inherited weights."""
    import onnxruntime as ort

    from nas import record as records
    from nas.cli import main
    from nas.storage import load_study

    monkeypatch.chdir(tmp_path)
    small = tmp_path / "smoke-oneshot.yaml"
    data = yaml.safe_load((Path(__file__).parents[1] / "nas/studies/smoke-oneshot.yaml").read_text())
    data.update(n_trials=8, evaluator={**data["evaluator"], "steps": 10, "eval_every": 5},
                confirm={**data["confirm"], "seeds": 2, "steps": 10}, data={"name": "synthetic", "limit": 400})
    small.write_text(yaml.safe_dump(data))
    assert main(["search", "--config", str(small), "--no-progress"]) == 0
    study = load_study("smoke-oneshot", results_dir="results")
    scored = [r for r in records.read_all(study) if r.arch is not None and r.metrics.accuracy is not None]
    assert scored and {r.evaluator for r in scored} == {"supernet"}
    assert all(r.train["finetune_steps"] == 0 and r.rung is None for r in scored)
    report = Path("results/smoke-oneshot/report.md").read_text()
    assert "inherited accuracy (supernet weights" in report and "inherited_accuracy" in report
    assert "moe_inherited" in report and "moe_standalone" in report
    assert main(["export", "--study", "smoke-oneshot", "--pick", "best-moe", "--out", "best", "--no-coreml"]) == 0
    best = Path("best")
    assert {"arch.yaml", "model.onnx", "inherited.pt", "train.yaml"} <= {p.name for p in best.iterdir()}
    weights = torch.load(best / "inherited.pt", weights_only=True)
    assert yaml.safe_load((best / "train.yaml").read_text().split("\n", 1)[1])["init"] == "inherited.pt"
    arch = ArchConfig.load(best / "arch.yaml")
    from nas.study import StudyConfig as Study
    from nas.supernet import inherited_model

    cfg = Study.from_dict(records.read_study(study).config)
    model = inherited_model(cfg, arch, Path("results/smoke-oneshot"))
    assert all(torch.equal(weights["model"][k], v) for k, v in model.state_dict().items())
    images = torch.randn(2, 1, arch.image_size, arch.image_size)
    (onnx_logits,) = ort.InferenceSession(str(best / "model.onnx")).run(None, {"images": images.numpy()})
    assert torch.allclose(torch.from_numpy(onnx_logits), model(images), atol=1e-4)  # the ONNX holds them too
