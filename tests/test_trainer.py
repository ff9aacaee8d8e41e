"""The trainer: tiny models learn the synthetic set, MoE losses and metrics, budgets, callbacks, checkpoints;
and its pieces (schedule, batches, loss, evaluation, checkpoint) each on its own."""

import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch
import yaml

from nas import trainer
from nas.batches import Batches, augment
from nas.config import ConfigError
from nas.data import load_dataset
from nas.devices import available_cores
from nas.recipe import Schedule, TrainRecipe, param_groups
from nas.trainer import Checkpoint, Loss, RunState, TrainingError, evaluate, train
from search_spaces import build_model
from search_spaces.model import ModelOutput

from archs import tiny, tiny_moe

CLASSES = 8


@pytest.fixture(scope="module")
def data():
    return load_dataset(f"synthetic:size=8,classes={CLASSES},groups=4,train=3000,test=200")


def quick(**kw) -> TrainRecipe:
    # One thread: tiny models gain nothing from two, and two threads on cores shared with other jobs crawl.
    return TrainRecipe(**{"steps": 40, "batch_size": 64, "lr": 3e-3, "eval_every": 20, "num_threads": 1, **kw})


@pytest.mark.slow
def test_dense_and_per_image_moe_learn_well_above_chance(data):
    recipe = quick(steps=250, eval_every=250)
    dense = train(tiny(num_classes=CLASSES), data, recipe)
    moe = train(tiny_moe(num_classes=CLASSES), data, recipe)
    assert dense.val_accuracy > 0.6 and moe.val_accuracy > 0.5  # chance: 1/8
    assert moe.router_accuracy > 0.6  # chance: 1/4 super-classes
    assert dense.router_accuracy is None and dense.expert_load is None
    assert sum(moe.expert_load) == len(data.val) and len(moe.expert_load) == 4  # k=1: one expert per image
    assert moe.loss_curve[-1][1] < moe.loss_curve[0][1]
    assert (moe.steps, moe.epochs) == (250, round(250 / (len(data.train) // 64), 4))


@pytest.mark.slow
def test_per_token_moe_reports_token_shares_and_superclasses_override(data):
    result = train(tiny_moe(num_classes=CLASSES, routing="per_token", top_k=2), data, quick())
    assert len(result.expert_load) == 4 and abs(sum(result.expert_load) - 1) < 1e-5
    assert result.router_accuracy is None
    # Explicit super-classes replace the data set's: told that every class is in group 3, the router learns to
    # send (nearly) every image to expert 3 and is scored against that; the data set's groups route elsewhere.
    last = np.full(CLASSES, 3)
    moe = train(tiny_moe(num_classes=CLASSES), data, quick(), superclasses=last)
    own = train(tiny_moe(num_classes=CLASSES), data, quick())
    assert moe.router_accuracy > 0.8 and moe.expert_load[3] > 0.8 * len(data.val)
    assert own.expert_load[3] < 0.5 * len(data.val)


def test_router_loss_needs_superclasses_unless_its_weight_is_zero(data):
    blind = dataclasses.replace(data, superclasses=None)
    with pytest.raises(ConfigError, match="superclasses="):
        train(tiny_moe(num_classes=CLASSES), blind, quick())
    cfg = tiny_moe(num_classes=CLASSES)
    end_to_end = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, router_loss_weight=0))
    result = train(end_to_end, blind, quick(steps=5))
    assert result.router_accuracy is None and sum(result.expert_load) == len(data.val)
    with pytest.raises(ConfigError, match="superclasses"):
        train(cfg, data, quick(), superclasses=np.full(CLASSES, 7))  # group 7 >= 4 experts


def test_architecture_must_fit_the_data(data):
    with pytest.raises(ConfigError, match="num_classes"):
        train(tiny(num_classes=5), data, quick())


def test_on_eval_sees_each_evaluation(data):
    calls = []

    def on_eval(step, epoch, accuracy):
        calls.append((step, epoch, accuracy))
        return True  # a return value stops nothing: stopping early lives in the search (rungs)

    result = train(tiny(num_classes=CLASSES), data, quick(steps=30, eval_every=10), on_eval=on_eval)
    assert [c[0] for c in calls] == [10, 20, 30] and result.steps == 30
    assert calls[1][1] == pytest.approx(20 / (len(data.train) // 64))
    assert result.evals == [(s, a) for s, _, a in calls] and result.val_accuracy == calls[-1][2]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the one swallowed
def test_a_swallowed_sigterm_stops_training_after_its_step(data, sigterm_swallowed_at):
    """The trial trained on to its end after a SIGTERM its handler raised inside a weakref callback (7 of 8
    SIGTERMs on a search): `docker stop` would then kill it mid-trial, a dead worker's trial, retry used."""
    steps = sigterm_swallowed_at(trainer._Run, 3)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        train(tiny(num_classes=CLASSES), data, quick(steps=30, eval_every=10))
    assert len(steps) == 3


def test_epoch_and_time_budgets(data):
    per_epoch = len(data.train) // 64
    by_epochs = train(tiny(num_classes=CLASSES), data, quick(epochs=0.5, steps=10**6, eval_every="epoch"))
    assert by_epochs.steps == math.ceil(per_epoch / 2) and by_epochs.epochs == pytest.approx(0.5, abs=0.02)
    assert [step for step, _ in by_epochs.evals] == [by_epochs.steps]  # half an epoch: only the final evaluation
    by_time = train(tiny(num_classes=CLASSES), data, quick(seconds=0.5, steps=None))
    assert by_time.steps >= 1


def test_resumed_run_matches_an_uninterrupted_one(data, tmp_path):
    cfg, recipe = tiny_moe(num_classes=CLASSES), quick(steps=30, eval_every=10)
    straight = train(cfg, data, recipe)

    def crash(step, epoch, accuracy):
        if step == 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, data, recipe, on_eval=crash, checkpoint_dir=tmp_path)
    resumed = train(cfg, data, recipe, checkpoint_dir=tmp_path)
    assert resumed.steps == straight.steps == 30
    np.testing.assert_allclose(np.array(resumed.loss_curve), np.array(straight.loss_curve), rtol=1e-5)
    assert resumed.val_accuracy == pytest.approx(straight.val_accuracy, abs=1 / len(data.val))
    finished = train(cfg, data, recipe, checkpoint_dir=tmp_path)  # a finished run is returned, not retrained
    assert finished.steps == 30 and finished.loss_curve == resumed.loss_curve


def test_foreign_or_corrupt_checkpoints_are_refused(data, tmp_path):
    train(tiny(num_classes=CLASSES), data, quick(steps=5), checkpoint_dir=tmp_path)
    with pytest.raises(TrainingError, match="another run"):
        train(tiny(num_classes=CLASSES), data, quick(steps=6), checkpoint_dir=tmp_path)
    (tmp_path / trainer.CHECKPOINT_NAME).write_bytes(b"torn")
    with pytest.raises(TrainingError, match="cannot read checkpoint"):
        train(tiny(num_classes=CLASSES), data, quick(steps=5), checkpoint_dir=tmp_path)


def test_nan_loss_is_a_clear_error(data, monkeypatch):
    def broken(cfg):
        model = build_model(cfg)
        model.head.bias.data.fill_(float("nan"))
        return model

    monkeypatch.setattr(trainer, "build_model", broken)
    with pytest.raises(TrainingError, match="loss became nan at step 0"):
        train(tiny(num_classes=CLASSES), data, quick())


def test_result_is_json_ready_with_test_accuracy(data):
    before = torch.get_num_threads()  # train sets one thread, then restores this
    result = train(tiny(num_classes=CLASSES), data, quick(steps=5), evaluate_test=True)
    assert torch.get_num_threads() == before
    record = json.loads(json.dumps(result.to_dict()))
    assert 0 <= record["test_accuracy"] <= 1 and "model" not in record
    assert record["loss_curve"][-1][0] == 5 and record["images_per_s"] > 0


def test_recipe_round_trips_through_yaml_and_names_bad_fields():
    recipe = TrainRecipe(epochs=2, seconds=60.0, eval_every=100, augment=False)
    assert TrainRecipe.from_dict(yaml.safe_load(yaml.safe_dump(recipe.to_dict()))) == recipe
    bad_recipes = [
        ({}, "epochs"), ({"steps": 0}, "steps"), ({"steps": 1.5}, "steps"), ({"steps": 1, "lr": -1}, "lr"),
        ({"steps": 1, "warmup_fraction": 1}, "warmup_fraction"), ({"steps": 1, "eval_every": "x"}, "eval_every"),
        ({"steps": 1, "batch_size": True}, "batch_size"), ({"steps": 1, "typo": 1}, "typo"),
        ({"steps": 1, "data_seed": 0.5}, "data_seed"),
    ]
    for bad, field in bad_recipes:
        with pytest.raises(ConfigError) as error:
            TrainRecipe.from_dict(bad)
        assert error.value.field == field


def test_augment_crops_shifted_windows_and_flips_only_when_allowed():
    images = torch.randint(1, 256, (16, 2, 8, 8), dtype=torch.uint8)
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))

    def windows(i, flip):
        crops = [padded[i, :, y : y + 8, x : x + 8] for y in range(3) for x in range(3)]
        return crops + ([c.flip(-1) for c in crops] if flip else [])

    for flip in (False, True):
        out = augment(images, flip=flip, generator=torch.Generator().manual_seed(1))
        assert out.shape == images.shape and out.dtype == torch.uint8
        assert all(any(torch.equal(out[i], w) for w in windows(i, flip)) for i in range(16))
        mirrored = [not any(torch.equal(out[i], w) for w in windows(i, False)) for i in range(16)]
        assert any(mirrored) == flip


@pytest.mark.parametrize("top_k", [1, 2])
def test_per_image_experts_train_path_matches_inference_path(top_k):
    """Training groups images by expert, inference gathers weights per image: same outputs and gradients."""
    model = build_model(tiny_moe(experts=4, top_k=top_k))
    x = torch.randn(6, 1, 8, 8)
    results = []
    for mode in (True, False):
        model.train(mode)
        out = model(x)
        grads = torch.autograd.grad(out.square().sum(), list(model.parameters()), allow_unused=True)
        # unused: at k=1 the gate is 1 whatever the router says, so a path may skip it (zero gradient)
        results.append((out, [torch.zeros_like(p) if g is None else g for g, p in zip(grads, model.parameters())]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# --- the pieces, each on its own ----------------------------------------------------------------------------


def test_schedule_warms_up_then_decays_over_the_budget():
    schedule = Schedule(peak_lr=1.0, warmup_fraction=0.1, steps=100, seconds=None)
    lrs = [schedule.lr(schedule.progress(step)) for step in (0, 5, 10, 55, 100)]
    assert lrs == pytest.approx([0.01, 0.5, 1.0, 0.5, 0.0], abs=1e-12)  # step 0: the 1e-3 floor, not 0
    timed = Schedule(1.0, 0.1, steps=100, seconds=10.0)
    assert timed.progress(20, train_time=5.0) == 0.5  # the budget spent furthest wins
    assert Schedule(1.0, 0.1, steps=None, seconds=10.0).progress(10**6, train_time=2.5) == 0.25
    # Steps and epochs: the smaller budget is the schedule's length.
    assert Schedule.of(TrainRecipe(epochs=0.5, steps=10**6), steps_per_epoch=45).steps == 23
    assert Schedule.of(TrainRecipe(epochs=3, steps=50), steps_per_epoch=45).steps == 50


def test_batches_depend_on_seed_and_step_only(data):
    def batch(seed, step, visited=()):
        batches = Batches(data, 64, seed=seed, augment=True)
        for other in visited:  # another history: the cached epoch permutation must not matter
            batches.at(other)
        return batches.at(step)

    images, labels = batch(1, 57)
    for again in (batch(1, 57, visited=(3, 200, 56)), batch(1, 57, visited=(58,))):
        assert torch.equal(again[0], images) and torch.equal(again[1], labels)
    assert not torch.equal(batch(2, 57)[1], labels) and not torch.equal(batch(1, 58)[1], labels)
    assert images.dtype == torch.float32 and images.shape == (64, 1, 8, 8)
    plain = Batches(data, 64, seed=1, augment=False)
    assert plain.per_epoch == len(data.train) // 64  # full batches only
    epoch = torch.cat([plain.at(step)[0] for step in range(plain.per_epoch)]).flatten(1)
    assert len(epoch.unique(dim=0)) == plain.per_epoch * 64  # an epoch shows each image at most once
    torch.testing.assert_close(epoch.mean(), torch.tensor(0.0), atol=0.05, rtol=0)  # normalised


def test_data_seed_fixes_the_batches_whatever_the_model(data, monkeypatch):
    seen = {}
    real_at = Batches.at

    def spy(batches, step):
        images, labels = real_at(batches, step)
        seen.setdefault(key, []).append(labels)
        return images, labels

    monkeypatch.setattr(Batches, "at", spy)
    runs = {("dense", 0): (tiny(num_classes=CLASSES), {}),
            ("moe", 1): (tiny_moe(num_classes=CLASSES), {"data_seed": 0}),
            ("dense", 1): (tiny(num_classes=CLASSES), {})}
    models = {}
    for key, (cfg, seeds) in runs.items():
        models[key] = train(cfg, data, quick(steps=3, seed=key[1], **seeds)).model
    same_data = [torch.equal(a, b) for a, b in zip(seen["dense", 0], seen["moe", 1])]
    assert same_data == [True] * 3  # seed 1, data_seed 0: a different model, the same batches as seed 0
    assert not torch.equal(seen["dense", 0][0], seen["dense", 1][0])  # seed alone sets both
    assert not torch.equal(models["dense", 0].head.weight, models["dense", 1].head.weight)


def test_param_groups_loss_and_evaluate_work_alone(data):
    model = build_model(tiny_moe(num_classes=CLASSES))
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} >= {"cls_token", "pos_embed", "head.bias", "norm.weight"}
    assert all(p.ndim >= 2 for p in decay["params"]) and "head.weight" in {names[id(p)] for p in decay["params"]}

    logits, router, labels = torch.randn(4, CLASSES), torch.randn(4, 3), torch.tensor([0, 1, 2, 3])
    groups = torch.tensor([0, 1, 2, 0])
    F = torch.nn.functional
    loss = Loss(label_smoothing=0.1, groups=groups, router_weight=0.5, aux_weight=0.01)
    expected = F.cross_entropy(logits, labels, label_smoothing=0.1) + 0.5 * F.cross_entropy(router, groups[labels])
    torch.testing.assert_close(loss(ModelOutput(logits, router, None), labels), expected)
    torch.testing.assert_close(loss(ModelOutput(logits, None, torch.tensor(2.0)), labels),
                               F.cross_entropy(logits, labels, label_smoothing=0.1) + 0.02)

    metrics = evaluate(model, data.val, data.normalize, groups=torch.as_tensor(data.superclasses))
    assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["router_accuracy"] <= 1
    assert sum(metrics["expert_load"]) == len(data.val)  # k=1: one expert per image


def test_checkpoint_round_trips_model_optimizer_state_and_rng(tmp_path):
    cfg, recipe = tiny_moe(num_classes=CLASSES), quick()

    def model_and_optimizer(seed):
        torch.manual_seed(seed)
        model = build_model(cfg)
        return model, torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3)

    model, optimizer = model_and_optimizer(0)
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    optimizer.step()
    state = RunState(step=7, train_time=1.5, loss_curve=[(5, 2.0), (7, 1.5)], evals=[(7, 0.25)],
                     metrics={"accuracy": 0.25, "router_accuracy": None, "expert_load": [1, 2, 0, 3]})
    checkpoint = Checkpoint(tmp_path / "checkpoint.pt", cfg, recipe, "synthetic")
    assert checkpoint.restore(model, optimizer) is None  # nothing saved yet
    checkpoint.save(model, optimizer, state)
    next_draw = torch.rand(3)

    fresh, fresh_optimizer = model_and_optimizer(1)
    assert checkpoint.restore(fresh, fresh_optimizer) == state
    assert torch.equal(torch.rand(3), next_draw)  # the RNG is where it was at the save
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert len(fresh_optimizer.state) == len(optimizer.state) > 0
    for a, b in zip(optimizer.state.values(), fresh_optimizer.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["step"], b["step"])

    other = Checkpoint(tmp_path / "checkpoint.pt", cfg, quick(lr=1e-4), "synthetic")
    with pytest.raises(TrainingError, match="its recipe differs"):
        other.restore(fresh, fresh_optimizer)
    # A checkpoint written before a recipe field existed still belongs to the run with that field's default.
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del payload["recipe"]["data_seed"]
    torch.save(payload, tmp_path / "checkpoint.pt")
    assert checkpoint.restore(fresh, fresh_optimizer) == state


class _Planted:
    """Unpickling this calls open(marker, "w"): harmless, but it leaves a file behind if code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_planted_checkpoint_is_refused_without_running_it(data, tmp_path):
    cfg, recipe = tiny(num_classes=CLASSES), quick(steps=5)
    train(cfg, data, recipe, checkpoint_dir=tmp_path)
    path, marker = tmp_path / trainer.CHECKPOINT_NAME, tmp_path / "code-ran"
    payload = torch.load(path, weights_only=True)
    torch.save({**payload, "state": _Planted(marker)}, path)
    with pytest.raises(TrainingError, match=f"cannot read checkpoint {path}") as error:
        train(cfg, data, recipe, checkpoint_dir=tmp_path)
    assert "open" in str(error.value) and not marker.exists()
    torch.load(path, weights_only=False)  # the plant is live: an unsafe load runs it
    assert marker.exists()


def test_a_run_stopped_at_a_step_continues_to_the_same_end(data, tmp_path):
    """Multi-fidelity: train to a rung, checkpoint, later continue on the same schedule, as if never stopped."""
    cfg, recipe = tiny_moe(num_classes=CLASSES), quick(steps=40, eval_every=20)
    straight = train(cfg, data, recipe)
    rung = train(cfg, data, recipe, checkpoint_dir=tmp_path, stop_at_step=20)
    assert (rung.steps, rung.evals) == (20, straight.evals[:1])
    again = train(cfg, data, recipe, checkpoint_dir=tmp_path, stop_at_step=20)  # the rung's result, no training
    assert again.steps == 20 and again.loss_curve == rung.loss_curve
    resumed = train(cfg, data, recipe, checkpoint_dir=tmp_path, stop_at_step=40)
    assert (resumed.steps, resumed.val_accuracy, resumed.evals) == (40, straight.val_accuracy, straight.evals)
    assert resumed.loss_curve == straight.loss_curve
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ConfigError, match="must be > 0"):
        train(cfg, data, recipe, stop_at_step=0)


def test_available_cores_without_sched_getaffinity(data, monkeypatch):
    """macOS has no sched_getaffinity: all cores count, and training with the default threads still runs."""
    if hasattr(os, "sched_getaffinity"):
        assert available_cores() == len(os.sched_getaffinity(0))
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert available_cores() == 1
    assert train(tiny(num_classes=CLASSES), data, quick(steps=2, num_threads=None)).steps == 2


def test_a_run_resumes_on_another_device_and_thread_count(data, tmp_path):
    """Where a run goes (device, threads, compile) is not what it computes: its checkpoint resumes anywhere."""
    cfg = tiny(num_classes=CLASSES)
    train(cfg, data, quick(steps=10, device="cpu"), checkpoint_dir=tmp_path, stop_at_step=5)
    resumed = train(cfg, data, quick(steps=10, device="auto", num_threads=2), checkpoint_dir=tmp_path)
    assert resumed.steps == 10 and resumed.evals[0][0] == 5
    with pytest.raises(TrainingError, match="its recipe differs"):
        train(cfg, data, quick(steps=10, precision="bf16"), checkpoint_dir=tmp_path)


def test_mixup_and_cutmix_are_seeded_by_step(data):
    recipe = quick(steps=6, eval_every=6, mixup=0.8, cutmix=1.0)
    a, b = (train(tiny_moe(num_classes=CLASSES), data, recipe) for _ in range(2))
    assert a.loss_curve == b.loss_curve
    plain = train(tiny_moe(num_classes=CLASSES), data, quick(steps=6, eval_every=6))
    assert a.loss_curve != plain.loss_curve
    for field, value in (("mixup", -1.0), ("device", "tpu"), ("precision", "fp8"), ("compile", "yes")):
        with pytest.raises(ConfigError, match=field):
            TrainRecipe.from_dict({"steps": 5, field: value})


def test_a_checkpoint_holding_the_retired_stopped_early_field_resumes(data, tmp_path):
    """Checkpoints written before `stopped_early` was removed from RunState still resume."""
    cfg, recipe = tiny(num_classes=CLASSES), quick(steps=20, eval_every=10)
    train(cfg, data, recipe, checkpoint_dir=tmp_path, stop_at_step=10)
    path = tmp_path / trainer.CHECKPOINT_NAME
    payload = torch.load(path, weights_only=True)
    torch.save({**payload, "state": {**payload["state"], "stopped_early": False}}, path)
    assert train(cfg, data, recipe, checkpoint_dir=tmp_path).steps == 20
