"""One-shot evaluation: train a study's supernet once (`search_spaces.supernet`), then score any candidate
with its inherited weights in a fraction of a second.

Training (`train_supernet`, `vmoe-nas supernet --config STUDY`) follows BigNAS / AutoFormer's sandwich rule,
one trunk (patch size, `search_spaces.supernet`) a step in turn: each step runs the trunk's largest subnet, its
smallest and `random_subnets` random ones on one batch and sums their gradients; with `distill`, every subnet
but the largest learns the largest's (detached) soft predictions of that batch, in-place distillation (Yu et
al. 2020). `sandwich: false` drops the largest and the smallest: single-path one-shot (Guo et al. 2020) with
`random_subnets: 1`, whose subnets, at the same training images, come out about twice as accurate (the
largest 0.61-0.66 against 0.25-0.32) and rank no better (benchmarks/README.md). Each MoE subnet keeps its
super-class router loss, with the class grouping of its expert count. The trainer's pieces run it: `Batches`,
`Schedule`, `Loss`, `evaluate`, `Checkpoint`, devices and precision. Subnets of a step are drawn from
(seed, step), so a resumed run takes the same steps as one that never stopped.

Checkpoints live in results/<study>/supernet/<key>/, key = a hash of the space, data shape, recipe and
supernet options: another space's supernet is another folder, and a checkpoint file of another space is
refused naming what differs.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nas.batches import Batches, seeded_generator
from nas.config import ConfigError, json_digest
from nas.devices import autocast_dtype, available_cores, resolve_device
from nas.processes import deferred_interruptions, raise_if_interrupted
from nas.recipe import Schedule, SupernetSpec, TrainRecipe, param_groups, recipe_identity
from nas.trainer import Checkpoint, Loss, RunState, TrainingError, TrainingInterrupted, evaluate, progress_bar
from search_spaces import ArchConfig
from search_spaces.supernet import Supernet, check_space, extreme_arch, of_patch_size, random_arch

SUPERNET_DIR = "supernet"


def build_supernet(space, dataset) -> Supernet:
    return Supernet(space, image_size=dataset.image_size, in_channels=dataset.in_channels,
                    num_classes=dataset.num_classes)


def identity(net: Supernet, recipe: TrainRecipe, spec: SupernetSpec, dataset_name: str) -> dict[str, Any]:
    """What a supernet's weights mean: space, data shape, data set, recipe (less where and how fast it ran:
    the same supernet on another device) and the training options."""
    training = {k: v for k, v in dataclasses.asdict(spec).items() if k in ("random_subnets", "distill")}
    if not spec.sandwich:  # keyed only when off: the sandwich's checkpoints keep their folders
        training["sandwich"] = False
    return {**net.identity(), "recipe": recipe_identity(recipe.to_dict()), "supernet": training,
            "dataset": dataset_name}


def checkpoint_dir(study_dir: Path, ident: dict) -> Path:
    return Path(study_dir) / SUPERNET_DIR / json_digest(ident)


class SupernetCheckpoint(Checkpoint):
    """The trainer's checkpoint, identified by the supernet's space, data shape, recipe and options."""

    def __init__(self, path, ident: dict):
        self.path = Path(path)
        self.identity = ident


@dataclass
class Sandwich:
    """The subnets of each step, one trunk (patch size) a step in turn: that trunk's largest, its smallest and
    `random` of its subnets drawn from (seed, step); without `with_extremes`, the `random` alone. `largest` and
    `smallest` are the whole space's."""

    space: Any
    dims: dict  # image_size, in_channels, num_classes
    random: int
    seed: int
    with_extremes: bool = True

    def __post_init__(self):
        self.largest = extreme_arch(self.space, True, **self.dims)
        self.smallest = extreme_arch(self.space, False, **self.dims)
        self.trunks = [of_patch_size(self.space, p) for p in check_space(self.space, self.dims["image_size"])]
        self.extremes = [(extreme_arch(t, True, **self.dims), extreme_arch(t, False, **self.dims))
                         for t in self.trunks]

    def at(self, step: int) -> list[ArchConfig]:
        trunk = step % len(self.trunks)
        generator = seeded_generator(self.seed, step, 3)
        extremes = self.extremes[trunk] if self.with_extremes else ()
        return [*extremes, *(random_arch(self.trunks[trunk], generator, **self.dims) for _ in range(self.random))]


@dataclass
class SupernetResult:
    net: Supernet
    steps: int
    train_images: int  # images through a subnet's forward and backward: batch x subnets x steps
    largest_accuracy: float | None
    smallest_accuracy: float | None
    wall_time_s: float
    checkpoint: Path


def train_supernet(ctx, *, progress: bool = False, stop_at_step: int | None = None) -> SupernetResult:
    """Train (or resume, or load when finished) the supernet of the study in `ctx` (`nas.trial.StudyContext`)."""
    cfg, data, recipe = ctx.cfg, ctx.dataset, ctx.recipe
    spec = cfg.supernet
    device = resolve_device(recipe.device)
    previous = torch.get_num_threads()
    torch.set_num_threads(recipe.num_threads or available_cores())
    try:
        torch.manual_seed(recipe.seed)
        net = build_supernet(cfg.space, data)
        ident = identity(net, recipe, spec, data.name)
        folder = checkpoint_dir(cfg.study_dir, ident)
        run = _SupernetRun(net.to(device), ctx, spec, SupernetCheckpoint(folder / "checkpoint.pt", ident), device)
        return run.loop(math.inf if stop_at_step is None else stop_at_step, progress)
    finally:
        torch.set_num_threads(previous)


class _SupernetRun:
    def __init__(self, net: Supernet, ctx, spec: SupernetSpec, checkpoint: SupernetCheckpoint, device):
        recipe, data = ctx.recipe, ctx.dataset
        self.net, self.ctx, self.spec, self.recipe, self.device = net, ctx, spec, recipe, device
        self.checkpoint = checkpoint
        self.optimizer = torch.optim.AdamW(param_groups(net, recipe.weight_decay), lr=recipe.lr, foreach=True)
        self.amp = autocast_dtype(recipe.precision, device)
        self.scaler = torch.amp.GradScaler(device.type) if self.amp == torch.float16 else None
        seed = recipe.seed if recipe.data_seed is None else recipe.data_seed
        self.batches = Batches(data, recipe.batch_size, seed=seed, augment=recipe.augment, device=device)
        self.schedule = Schedule.of(recipe, self.batches.per_epoch)
        if self.schedule.steps is None:
            raise ConfigError("evaluator.steps", "a supernet trains for a number of steps or epochs, not seconds")
        dims = {"image_size": data.image_size, "in_channels": data.in_channels, "num_classes": data.num_classes}
        self.sandwich = Sandwich(ctx.cfg.space, dims, spec.random_subnets, recipe.seed, spec.sandwich)
        self.state = checkpoint.restore(net, self.optimizer, self.scaler) or RunState()

    def loss_of(self, arch: ArchConfig) -> Loss:
        groups = self.ctx.groups_for(arch)
        groups = None if groups is None else torch.as_tensor(np.asarray(groups), dtype=torch.int64, device=self.device)
        return Loss.of(arch, self.recipe, groups)

    def step(self) -> float:
        s = self.state
        lr = self.schedule.lr(self.schedule.progress(s.step))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        images, labels = self.batches.at(s.step)
        self.net.train()
        self.optimizer.zero_grad(set_to_none=True)
        teacher, total = None, 0.0
        archs = self.sandwich.at(s.step)
        for arch in archs:  # one backward per subnet: only one graph held at a time
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                out = self.net(images, arch, with_aux=True)
                loss = self.loss_of(arch)(out, labels, teacher)
            if not torch.isfinite(loss):
                raise TrainingError(f"supernet: loss of {arch.name} became {loss.item()} at step {s.step} "
                                    f"(lr {lr:.2e}); try a lower lr or a grad_clip")
            if self.spec.distill and teacher is None:  # the largest comes first: its predictions teach the rest
                teacher = F.softmax(out.logits.detach().float(), -1)
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.item()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.recipe.grad_clip:
            nn.utils.clip_grad_norm_(self.net.parameters(), self.recipe.grad_clip, foreach=True)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        s.step += 1
        return total / len(archs)

    def evaluate(self) -> dict[str, float]:
        """Val accuracy of the largest and the smallest subnet: the supernet's learning curve."""
        data = self.ctx.dataset
        return {name: evaluate(self.net.extract(arch).to(self.device), data.val, data.normalize)["accuracy"]
                for name, arch in (("largest", self.sandwich.largest), ("smallest", self.sandwich.smallest))}

    def loop(self, stop_at: float, progress: bool) -> SupernetResult:
        """Train to `stop_at` or the end: saved at each evaluation, every `checkpoint_every_s` and on SIGINT /
        SIGTERM / SIGHUP, which then stop it after the step under way (a second one at once), as the trainer."""
        s, steps = self.state, self.schedule.steps
        every = self.batches.per_epoch if self.recipe.eval_every == "epoch" else self.recipe.eval_every
        bar = progress_bar(progress, steps, s.step, "supernet")
        bar.set_description("supernet")
        start, losses = time.perf_counter(), []
        signals, saved_at = [], time.monotonic()
        try:
            with deferred_interruptions(signals.append):
                while not s.finished and s.step < stop_at and not signals:
                    tick = time.perf_counter()
                    losses.append(self.step())
                    s.train_time += time.perf_counter() - tick
                    raise_if_interrupted()  # a signal's KeyboardInterrupt swallowed mid-step (see nas.processes)
                    bar.update(1)
                    done = s.step >= steps
                    evaluating = done or s.step == stop_at or s.step % every == 0
                    if evaluating:
                        s.loss_curve.append((s.step, float(np.mean(losses))))
                        losses = []
                        s.metrics = self.evaluate()
                        s.evals.append((s.step, s.metrics["largest"]))
                        s.finished = done
                    if evaluating or time.monotonic() - saved_at >= self.recipe.checkpoint_every_s:
                        s.wall_time += time.perf_counter() - start
                        start = time.perf_counter()
                        self.checkpoint.save(self.net, self.optimizer, s, self.scaler)
                        saved_at = time.monotonic()
            if signals:  # saved at the step under way, also when the signal came as the last one ended
                s.wall_time += time.perf_counter() - start
                self.checkpoint.save(self.net, self.optimizer, s, self.scaler)
                raise TrainingInterrupted(signals[0], s.step, steps, self.checkpoint.path)
        finally:
            bar.close()
            self.batches.close()
        return SupernetResult(self.net.cpu().eval(), s.step, self.train_images(s.step),
                              s.metrics.get("largest"), s.metrics.get("smallest"), round(s.wall_time, 3),
                              self.checkpoint.path)

    def train_images(self, steps: int) -> int:
        return steps * self.batches.size * self.spec.subnets_per_step


# ---------------------------------------------------------------- scoring


def score(ctx, net: Supernet, arch: ArchConfig) -> dict[str, Any]:
    """Inherited-weight val accuracy of `arch` (after `finetune_steps` of training from them, when set):
    {accuracy, router_accuracy, finetune_steps}."""
    spec, data = ctx.cfg.supernet, ctx.dataset
    groups = ctx.groups_for(arch)
    model = net.extract(arch)
    if spec.finetune_steps:
        from nas.trainer import train

        recipe = dataclasses.replace(ctx.recipe, steps=spec.finetune_steps, epochs=None, seconds=None,
                                     eval_every=spec.finetune_steps)
        model = train(arch, data, recipe, superclasses=groups, init_from=model.state_dict()).model
    val = data.val if spec.val_images is None else _head(data.val, spec.val_images)
    groups = None if groups is None else torch.as_tensor(np.asarray(groups), dtype=torch.int64)
    metrics = evaluate(model.to(resolve_device(ctx.recipe.device)), val, data.normalize, groups=groups)
    return {"accuracy": metrics["accuracy"], "router_accuracy": metrics["router_accuracy"],
            "finetune_steps": spec.finetune_steps}


def _head(split, count: int):
    """The first `count` images of a split held in memory (a streamed split is scored whole)."""
    if split.stream is not None or count >= len(split):
        return split
    return dataclasses.replace(split, images=split.images[:count], labels=split.labels[:count])


_TRAINED: dict[Path, Supernet] = {}  # a process's trained supernets, by checkpoint: loaded once per worker


def trained_supernet(ctx, *, progress: bool = False) -> Supernet:
    """The study's trained supernet: trained here if it is not yet (resuming a checkpoint), else loaded."""
    net = build_supernet(ctx.cfg.space, ctx.dataset)
    folder = checkpoint_dir(ctx.cfg.study_dir, identity(net, ctx.recipe, ctx.cfg.supernet, ctx.dataset.name))
    if folder not in _TRAINED:
        _TRAINED[folder] = train_supernet(ctx, progress=progress).net
    return _TRAINED[folder]


def load_supernet(path, space, dataset, recipe: TrainRecipe, spec: SupernetSpec) -> Supernet:
    """A supernet from a checkpoint file, refused (naming what differs) when it holds another space, data
    shape, recipe or options."""
    net = build_supernet(space, dataset)
    checkpoint = SupernetCheckpoint(path, identity(net, recipe, spec, dataset.name))
    if not Path(path).is_file():
        raise ConfigError("supernet", f"no supernet checkpoint at {path}")
    optimizer = torch.optim.AdamW(param_groups(net, recipe.weight_decay))
    checkpoint.restore(net, optimizer)
    return net.eval()


def inherited_model(study_cfg, arch: ArchConfig, study_dir) -> nn.Module:
    """`arch` holding the weights it inherits from the trained supernet of the study (`vmoe-nas export`)."""
    from nas.data import load_dataset

    spec = study_cfg.data
    dataset = load_dataset(spec.name, data_dir=spec.data_dir, val_fraction=spec.val_fraction, seed=spec.seed,
                           limit=spec.limit, **spec.folder_options())
    recipe, options = study_cfg.recipe(), study_cfg.supernet
    net = build_supernet(study_cfg.space, dataset)
    folder = checkpoint_dir(study_dir, identity(net, recipe, options, dataset.name))
    return load_supernet(folder / "checkpoint.pt", study_cfg.space, dataset, recipe, options).extract(arch).eval()


__all__ = ["Sandwich", "SupernetCheckpoint", "SupernetResult",
           "build_supernet", "checkpoint_dir", "identity", "inherited_model", "load_supernet", "score",
           "train_supernet", "trained_supernet"]
