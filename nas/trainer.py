"""Proxy training: one `ArchConfig` on one data set for a fixed budget, the accuracy signal of a trial.

AdamW with warm-up plus cosine decay, label smoothing, batched crop/flip augmentation on uint8 tensors (or,
for a data set streamed from disk, the standard ImageNet transforms in its loader's workers), optional
mixup/cutmix. MoE models add their routing losses: per-image routing the super-class router loss (Mobile
V-MoE), per-token routing the load-balancing loss (V-MoE). Every random choice of the data derives from (data
seed, step), so a run resumed from a checkpoint takes the same steps as one that never stopped, and two models
trained with one data seed see the same batches.

It runs on the recipe's `device` (auto: CUDA, then MPS, then the CPU) in its `precision` (auto: bf16 autocast
on CUDA where supported, fp16 with a gradient scaler on other accelerators, fp32 on the CPU). A data set held
in memory moves to the device once, as uint8, and is augmented there.

A run is small pieces wired by `_Run`, each usable alone: `param_groups`, `Schedule`, `Batches`, `Loss`,
`evaluate` and `Checkpoint`.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from nas.batches import Batches
from nas.config import ConfigError, check_number, first_line
from nas.datasets import Dataset, Split
from nas.devices import autocast_dtype, default_threads, resolve_device
from nas.processes import TrainingInterrupted, deferred_interruptions, raise_if_interrupted
from nas.recipe import Schedule, TrainRecipe, param_groups, recipe_identity
from search_spaces import ArchConfig, build_model
from search_spaces.model import ModelOutput, PerTokenExperts

CHECKPOINT_NAME = "checkpoint.pt"
LOG_EVERY = 10  # steps per loss-curve point: the curve stays small enough to store on every trial
EVAL_BATCH = 256  # images per evaluation forward: at 1,024 a 28 px model's activations spill a CPU's cache


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message says when and what to try."""


class CheckpointError(TrainingError):
    """A checkpoint that cannot be resumed: unreadable, or another run's."""


@dataclass
class TrainResult:
    val_accuracy: float  # top-1 of the final model on the val split
    router_accuracy: float | None  # super-class accuracy of the per-image router on val
    expert_load: list[float] | None  # per-image: images per expert on val; per-token: share of token slots
    loss_curve: list[tuple[int, float]]  # (step, mean train loss since the previous point: LOG_EVERY steps)
    steps: int
    epochs: float
    wall_time_s: float  # training and validation, summed over resumed runs
    images_per_s: float  # training images per second of training-step time
    test_accuracy: float | None = None
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, val accuracy) at each evaluation
    model: nn.Module | None = field(default=None, repr=False, compare=False)  # the trained model (on the CPU)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}
        data["loss_curve"] = [list(point) for point in self.loss_curve]
        data["evals"] = [list(point) for point in self.evals]
        return data


@dataclass
class RunState:
    """Everything a resumed run needs besides model, optimizer and RNG."""

    step: int = 0
    train_time: float = 0.0  # seconds spent in training steps
    wall_time: float = 0.0
    loss_curve: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    finished: bool = False
    metrics: dict = field(default_factory=dict)  # of the latest evaluation on val


# --- the pieces of a run: each usable, and tested, alone ---------------------------------------------------


@dataclass(frozen=True)
class Loss:
    """Label-smoothed cross-entropy plus the routing losses: the per-image router's super-class cross-entropy
    (Mobile V-MoE), the per-token load-balancing loss (V-MoE)."""

    label_smoothing: float = 0.0
    groups: torch.Tensor | None = None  # class -> super-class: the per-image router's targets
    router_weight: float = 0.0
    aux_weight: float = 0.0

    @classmethod
    def of(cls, cfg: ArchConfig, recipe: TrainRecipe, groups: torch.Tensor | None) -> Loss:
        return cls(recipe.label_smoothing, groups, cfg.moe.router_loss_weight if cfg.is_moe else 0.0,
                   recipe.aux_loss_weight)

    def __call__(self, out: ModelOutput, labels: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """`targets`: mixed soft targets (mixup/cutmix, already smoothed); the router learns `labels`' groups."""
        if targets is None:
            loss = F.cross_entropy(out.logits, labels, label_smoothing=self.label_smoothing)
        else:
            loss = F.cross_entropy(out.logits, targets)
        if out.router_logits is not None and self.groups is not None and self.router_weight:
            loss = loss + self.router_weight * F.cross_entropy(out.router_logits, self.groups[labels])
        if out.aux_loss is not None:
            loss = loss + self.aux_weight * out.aux_loss
        return loss


@torch.inference_mode()
def evaluate(model: nn.Module, split: Split, normalize: Callable[[torch.Tensor], torch.Tensor], *,
             groups: torch.Tensor | None = None) -> dict[str, Any]:
    """Top-1 accuracy on `split`, the per-image router's super-class accuracy (against `groups`) and the
    expert load (per-image: images per expert; per-token: share of token slots)."""
    model.eval()
    device = next(model.parameters()).device
    groups = None if groups is None else groups.to(device)
    moe = model.cfg.moe if model.cfg.is_moe else None
    per_image = moe is not None and moe.routing == "per_image"
    correct, router_correct, seen = 0, 0, 0
    image_load = torch.zeros(moe.num_experts if per_image else 0, dtype=torch.int64, device=device)
    hooks = _token_load_hooks(model)
    for images, labels in split.chunks(EVAL_BATCH):
        images, labels = normalize(images.to(device, non_blocking=True)), labels.to(device, non_blocking=True)
        seen += len(labels)
        out = model(images, with_aux=True)
        correct += (out.logits.argmax(-1) == labels).sum().item()
        if out.router_logits is not None:
            chosen = out.router_logits.topk(moe.top_k, dim=-1).indices  # (B, k)
            image_load += torch.bincount(chosen.flatten(), minlength=moe.num_experts)
            if groups is not None:
                router_correct += (out.router_logits.argmax(-1) == groups[labels]).sum().item()
    for hook in hooks:
        hook.handle.remove()
    n = max(seen, 1)  # a streamed split may have skipped unreadable images
    if hooks:
        token_load = sum(hook.counts for hook in hooks)
        load = (token_load / token_load.sum()).cpu().tolist()
    else:
        load = image_load.cpu().tolist() if per_image else None
    return {"accuracy": correct / n, "router_accuracy": router_correct / n if groups is not None else None,
            "expert_load": load}


class Checkpoint:
    """A run's progress in one file: model, optimizer, RunState and torch RNG, beside what identifies the run
    (architecture, recipe, data set) so that another run's checkpoint is refused, not resumed. Written
    atomically; it holds only tensors and plain data, and is read with weights_only=True: a planted file
    cannot run code."""

    def __init__(self, path, cfg: ArchConfig, recipe: TrainRecipe, dataset_name: str):
        self.path = Path(path)
        self.identity = {"arch": cfg.to_dict(), "recipe": recipe_identity(recipe.to_dict()), "dataset": dataset_name}

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: RunState, scaler=None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {**self.identity, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "state": asdict(state), "rng": torch.get_rng_state(),
                   "scaler": scaler.state_dict() if scaler is not None else {}}
        descriptor, partial = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(descriptor)  # a name of its own: two writers never move each other's file
        try:
            torch.save(payload, partial)
            os.replace(partial, self.path)  # atomic: a crash mid-save leaves the previous checkpoint
        finally:
            Path(partial).unlink(missing_ok=True)

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler=None) -> RunState | None:
        """Load the checkpoint into model and optimizer (on whatever device they are: a run started on a GPU
        resumes on the CPU) and return its state; None when there is none."""
        if not self.path.is_file():
            return None
        try:
            payload = torch.load(self.path, weights_only=True, map_location="cpu")
        except Exception as error:  # torn, foreign or planted: say which file, not a pickle traceback
            # a planted file's GLOBAL line says what it pickles
            why = next((line for line in str(error).splitlines() if "GLOBAL" in line), first_line(error))
            raise CheckpointError(f"cannot read checkpoint {self.path} ({why}); only tensors and plain data are "
                                f"loaded; delete it to restart") from None
        for key, value in self.identity.items():
            stored = payload.get(key) if isinstance(payload, dict) else None
            if (recipe_identity(stored) if key == "recipe" else stored) != value:
                raise CheckpointError(f"checkpoint {self.path} is from another run (its {key} differs); "
                                    f"use another checkpoint_dir or delete it")
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        if scaler is not None and payload.get("scaler"):
            scaler.load_state_dict(payload["scaler"])
        torch.set_rng_state(payload["rng"])
        known = {f.name for f in fields(RunState)}  # a checkpoint of an older version may hold retired fields
        return RunState(**{k: v for k, v in payload["state"].items() if k in known})


# --- the run -----------------------------------------------------------------------------------------------


def train(cfg: ArchConfig, dataset: Dataset, recipe: TrainRecipe, *, superclasses: np.ndarray | None = None,
          on_eval: Callable[[int, float, float], None] | None = None, checkpoint_dir=None, progress: bool = False,
          evaluate_test: bool = False, stop_at_step: int | None = None, init_from: dict | None = None,
          label: str = "train") -> TrainResult:
    """Train `cfg` on `dataset.train` for the recipe's budget; validate on `dataset.val`.

    `on_eval(step, epoch, val_accuracy)` runs at each evaluation (to show progress). With `checkpoint_dir`,
    progress is saved at each evaluation and at the end, and resumed from there. `superclasses` (class ->
    group) trains a per-image router; the data set's own are used otherwise.
    `stop_at_step` pauses the run at that step (evaluated and checkpointed) without shortening its schedule:
    a later call with a larger `stop_at_step` (or none) continues it to where an unpaused run would be.
    `init_from` (a state dict): its entries that match a parameter by name and shape replace the seeded initial
    weights, so two models of one comparison start alike in what they share (a resumed run keeps its checkpoint).
    `label` names the progress bar, which shows the latest validation accuracy.
    """
    _check_fits(cfg, dataset)
    if stop_at_step is not None:
        check_number("stop_at_step", stop_at_step, positive=True, integer=True)
    groups = _router_targets(cfg, dataset, superclasses)
    device = resolve_device(recipe.device)
    previous = torch.get_num_threads(), torch.get_float32_matmul_precision()
    torch.set_num_threads(recipe.num_threads or default_threads())
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls: what fp32 parts of a step run in on CUDA
    try:
        run = _Run(cfg, dataset, recipe, groups, checkpoint_dir, device, init_from)
        return run.loop(on_eval, math.inf if stop_at_step is None else stop_at_step, progress, evaluate_test, label)
    finally:
        torch.set_num_threads(previous[0])
        torch.set_float32_matmul_precision(previous[1])


def _check_fits(cfg: ArchConfig, dataset: Dataset) -> None:
    for name in ("image_size", "in_channels", "num_classes"):
        if getattr(cfg, name) != getattr(dataset, name):
            raise ConfigError(name, f"architecture has {getattr(cfg, name)}, data set {dataset.name!r} has "
                                    f"{getattr(dataset, name)}")


def _router_targets(cfg: ArchConfig, dataset: Dataset, superclasses) -> torch.Tensor | None:
    """class -> group as a tensor when a per-image router has targets (needed when its loss weight > 0)."""
    if not (cfg.is_moe and cfg.moe.routing == "per_image"):
        return None
    if superclasses is None and dataset.superclasses is not None and dataset.superclasses.max() < cfg.moe.num_experts:
        superclasses = dataset.superclasses
    if superclasses is None:
        if cfg.moe.router_loss_weight > 0:
            raise ConfigError("moe.router_loss_weight", f"is {cfg.moe.router_loss_weight} but no super-classes "
                              f"were given for {dataset.name!r}; pass superclasses= "
                              "(see nas.superclasses.superclasses_for) or set it to 0")
        return None
    groups = torch.as_tensor(np.asarray(superclasses), dtype=torch.int64)
    if groups.shape != (dataset.num_classes,) or groups.min() < 0 or groups.max() >= cfg.moe.num_experts:
        raise ConfigError("superclasses", f"must map each of {dataset.num_classes} classes to a group in "
                                          f"[0, num_experts={cfg.moe.num_experts}), got {groups.tolist()}")
    return groups


class _Run:
    """One training run: the pieces above, wired together, and the loop over them."""

    def __init__(self, cfg: ArchConfig, dataset: Dataset, recipe: TrainRecipe, groups, checkpoint_dir,
                 device: torch.device, init_from: dict | None = None):
        self.cfg, self.data, self.groups, self.device = cfg, dataset, groups, device
        torch.manual_seed(recipe.seed)
        self.model = build_model(cfg)  # initialised on the CPU: the same weights on every device
        if init_from:  # shared weights from another model (a pair's common random numbers): name and shape match
            own = self.model.state_dict()
            self.model.load_state_dict({k: v for k, v in init_from.items() if k in own and own[k].shape == v.shape},
                                       strict=False)
        self.model.to(device)
        self.forward = torch.compile(self.model) if recipe.compile else self.model
        self.optimizer = torch.optim.AdamW(param_groups(self.model, recipe.weight_decay), lr=recipe.lr,
                                           foreach=True)  # one kernel per op, not per tensor: small models
        self.amp = autocast_dtype(recipe.precision, device)
        self.scaler = torch.amp.GradScaler(device.type) if self.amp == torch.float16 else None  # fp16 underflows
        self.data_seed = recipe.seed if recipe.data_seed is None else recipe.data_seed
        self.batches = Batches(dataset, recipe.batch_size, seed=self.data_seed, augment=recipe.augment, device=device)
        self.mix = _mixer(recipe, dataset.num_classes)
        self.schedule = Schedule.of(recipe, self.batches.per_epoch)
        self.loss = Loss.of(cfg, recipe, None if groups is None else groups.to(device))
        self.grad_clip = recipe.grad_clip
        self.eval_every = self.batches.per_epoch if recipe.eval_every == "epoch" else recipe.eval_every
        self.checkpoint_every_s = recipe.checkpoint_every_s
        self.checkpoint = None
        self.state = RunState()
        if checkpoint_dir:
            self.checkpoint = Checkpoint(Path(checkpoint_dir) / CHECKPOINT_NAME, cfg, recipe, dataset.name)
            self.state = self.checkpoint.restore(self.model, self.optimizer, self.scaler) or self.state

    def step(self) -> float:
        """One optimizer step on the current step's batch; returns its loss."""
        lr = self.schedule.lr(self.schedule.progress(self.state.step, self.state.train_time))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        images, labels = self.batches.at(self.state.step)
        targets = None
        if self.mix is not None and len(labels) % 2 == 0:  # timm's Mixup pairs each image with its mirror
            with _numpy_seeded(self.data_seed, self.state.step, 2):
                images, targets = self.mix(images, labels)
        self.model.train()
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            loss = self.loss(self.forward(images, with_aux=True), labels, targets)
        if not torch.isfinite(loss):
            raise TrainingError(f"{self.cfg.name}: loss became {loss.item()} at step {self.state.step} "
                                f"(lr {lr:.2e}); try a lower lr or a grad_clip")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)  # clip the true gradients
        else:
            loss.backward()
        if self.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, foreach=True)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.state.step += 1
        return loss.item()

    def loop(self, on_eval, stop_at: float, progress: bool, evaluate_test: bool, label: str) -> TrainResult:
        try:
            return self._loop(on_eval, stop_at, progress, evaluate_test, label)
        finally:
            self.batches.close()

    def _loop(self, on_eval, stop_at: float, progress: bool, evaluate_test: bool, label: str) -> TrainResult:
        """Train to `stop_at` or the end. With a checkpoint: saved at each evaluation, every `checkpoint_every_s`
        and on SIGINT/SIGTERM/SIGHUP, which then stop the run after the step under way (a second one at once)."""
        s = self.state
        bar = progress_bar(progress, self.schedule.steps, s.step, label)
        start, losses = time.perf_counter(), []
        signals, saved_at = [], time.monotonic()
        with deferred_interruptions(signals.append) if self.checkpoint else nullcontext():
            while not s.finished and s.step < stop_at and not signals:
                tick = time.perf_counter()
                losses.append(self.step())
                s.train_time += time.perf_counter() - tick
                raise_if_interrupted()  # a signal's KeyboardInterrupt swallowed mid-step (see nas.processes)
                bar.update(1)
                done = self.schedule.progress(s.step, s.train_time) >= 1
                evaluating = done or s.step == stop_at or s.step % self.eval_every == 0
                saving = self.checkpoint and (evaluating or time.monotonic() - saved_at >= self.checkpoint_every_s)
                if len(losses) == LOG_EVERY or evaluating:  # not at timed saves: curves stay deterministic
                    s.loss_curve.append((s.step, float(np.mean(losses))))
                    losses = []
                if evaluating:
                    s.metrics = evaluate(self.model, self.data.val, self.data.normalize, groups=self.groups)
                    s.evals.append((s.step, s.metrics["accuracy"]))
                    bar.set_postfix(epoch=f"{self.epochs():.3g}", val_accuracy=f"{s.metrics['accuracy']:.4f}")
                    if on_eval:
                        on_eval(s.step, self.epochs(), s.metrics["accuracy"])
                    s.finished = done
                if evaluating or saving:
                    s.wall_time += time.perf_counter() - start
                    start = time.perf_counter()
                if saving:
                    self.checkpoint.save(self.model, self.optimizer, s, self.scaler)
                    saved_at = time.monotonic()
        bar.close()
        if signals:  # saved at the step under way, also when the signal came as the last one ended
            s.wall_time += time.perf_counter() - start
            self.checkpoint.save(self.model, self.optimizer, s, self.scaler)
            raise TrainingInterrupted(signals[0], s.step, self.schedule.steps, self.checkpoint.path)
        return self.result(evaluate_test)

    def epochs(self) -> float:
        return self.state.step / self.batches.per_epoch

    def result(self, evaluate_test: bool) -> TrainResult:
        test = None
        if evaluate_test:
            if not len(self.data.test):
                raise ConfigError("evaluate_test", f"data set {self.data.name!r} has no test split")
            test = evaluate(self.model, self.data.test, self.data.normalize, groups=self.groups)["accuracy"]
        s = self.state
        return TrainResult(
            val_accuracy=s.metrics["accuracy"], router_accuracy=s.metrics["router_accuracy"],
            expert_load=s.metrics["expert_load"], loss_curve=s.loss_curve, steps=s.step,
            epochs=round(self.epochs(), 4), wall_time_s=round(s.wall_time, 3),
            images_per_s=round(s.step * self.batches.size / max(s.train_time, 1e-9), 1),
            test_accuracy=test, evals=s.evals, model=self.model.cpu(),
        )


def _mixer(recipe: TrainRecipe, num_classes: int):
    """timm's Mixup (mixup and/or cutmix, one mix per batch, labels smoothed) when the recipe asks for it."""
    if not (recipe.mixup or recipe.cutmix):
        return None
    from timm.data import Mixup  # deferred: timm takes seconds to import, and most recipes mix nothing

    return Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, label_smoothing=recipe.label_smoothing,
                 num_classes=num_classes)


@contextmanager
def _numpy_seeded(seed: int, *key: int):
    """numpy's global RNG (which timm's Mixup draws from) seeded from (seed, *key), restored afterwards."""
    state = np.random.get_state()
    np.random.seed(np.random.SeedSequence([seed, *key]).generate_state(1)[0])
    try:
        yield
    finally:
        np.random.set_state(state)


class _TokenLoadHook:
    """Counts, on a per-token MoE block, how many token slots its router sends to each expert."""

    def __init__(self, module: PerTokenExperts):
        self.counts = torch.zeros(module.fc1_weight.shape[0], device=module.fc1_weight.device)
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module: PerTokenExperts, inputs) -> None:
        tokens = inputs[0].reshape(-1, inputs[0].shape[-1])
        chosen = module.router(tokens).topk(module.top_k, dim=-1).indices
        self.counts += torch.bincount(chosen.flatten(), minlength=len(self.counts))


def _token_load_hooks(model: nn.Module) -> list[_TokenLoadHook]:
    return [_TokenLoadHook(m) for m in model.modules() if isinstance(m, PerTokenExperts)]


def progress_bar(enabled: bool, total: int | None, initial: int, label: str):
    return tqdm(total=total, initial=initial, disable=not enabled, desc=label, unit="step", dynamic_ncols=True)


__all__ = [
    "CHECKPOINT_NAME", "Checkpoint", "CheckpointError", "Loss", "RunState", "TrainResult", "TrainingError",
    "TrainingInterrupted", "evaluate", "progress_bar", "train",
]
