"""Proxy training: one `ArchConfig` on one data set for a fixed budget, the accuracy signal of a trial.

AdamW with warm-up plus cosine decay, label smoothing, batched crop/flip augmentation on uint8 tensors. MoE
models add their routing losses: per-image routing the super-class router loss (Mobile V-MoE), per-token
routing the load-balancing loss (V-MoE). Every random choice derives from (seed, step), so a run resumed
from a checkpoint takes the same steps as one that never stopped.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nas.data import Dataset, Split
from search_spaces import ArchConfig, ConfigError, build_model
from search_spaces.config import from_mapping
from search_spaces.model import PerTokenExperts

CHECKPOINT_NAME = "checkpoint.pt"
LOG_EVERY = 10  # steps per loss-curve point: the curve stays small enough to store on every trial
EVAL_BATCH = 1024


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message says when and what to try."""


@dataclass(frozen=True)
class TrainRecipe:
    # Budget: any of the three; training stops at the first one reached.
    epochs: float | None = None
    steps: int | None = None
    seconds: float | None = None
    batch_size: int = 128
    lr: float = 1e-3  # AdamW peak learning rate; small ViTs from scratch like ~1e-3
    weight_decay: float = 0.05  # DeiT's value
    warmup_fraction: float = 0.1  # of the budget, linear from 0
    label_smoothing: float = 0.1
    augment: bool = True  # random crop with padding; flips only where the data set allows them
    grad_clip: float | None = 1.0  # global norm; keeps early ViT training from diverging
    aux_loss_weight: float = 0.01  # per-token load-balancing loss (V-MoE / Switch: 0.01)
    seed: int = 0
    eval_every: int | str = "epoch"  # steps between validations, or "epoch"
    num_threads: int | None = None  # None: all cores this process may use

    def __post_init__(self):
        if all(getattr(self, name) is None for name in ("epochs", "steps", "seconds")):
            raise ConfigError("epochs", "a budget is needed: set epochs, steps or seconds")
        for name in ("epochs", "steps", "seconds", "grad_clip"):
            _check_number(name, getattr(self, name), optional=True, positive=True, integer=name == "steps")
        for name in ("batch_size", "seed"):
            _check_number(name, getattr(self, name), integer=True, positive=name == "batch_size")
        _check_number("num_threads", self.num_threads, optional=True, positive=True, integer=True)
        _check_number("lr", self.lr, positive=True)
        for name in ("weight_decay", "label_smoothing", "aux_loss_weight", "warmup_fraction"):
            _check_number(name, getattr(self, name))
        if self.warmup_fraction >= 1 or self.label_smoothing >= 1:
            raise ConfigError("warmup_fraction" if self.warmup_fraction >= 1 else "label_smoothing", "must be < 1")
        if self.eval_every != "epoch":
            _check_number("eval_every", self.eval_every, positive=True, integer=True)
        if not isinstance(self.augment, bool):
            raise ConfigError("augment", f"must be true or false, got {self.augment!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> TrainRecipe:
        if not isinstance(data, dict):  # callers prefix the fields' names with their section's
            raise ConfigError("recipe", f"must be a mapping of recipe fields, got {type(data).__name__}")
        return from_mapping(cls, data, "")


def _check_number(name, value, *, optional=False, positive=False, integer=False) -> None:
    if value is None and optional:
        return
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        raise ConfigError(name, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ConfigError(name, f"must be {'> 0' if positive else '>= 0'}, got {value}")


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
    stopped_early: bool
    test_accuracy: float | None = None
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, val accuracy) at each evaluation
    model: nn.Module | None = field(default=None, repr=False, compare=False)  # the trained model, not serialised

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}
        data["loss_curve"] = [list(point) for point in self.loss_curve]
        data["evals"] = [list(point) for point in self.evals]
        return data


@dataclass
class _State:
    """Everything a resumed run needs besides model and optimizer."""

    step: int = 0
    train_time: float = 0.0  # seconds spent in training steps
    wall_time: float = 0.0
    loss_curve: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    stopped_early: bool = False
    finished: bool = False
    metrics: dict = field(default_factory=dict)  # of the latest evaluation on val


def train(cfg: ArchConfig, dataset: Dataset, recipe: TrainRecipe, *, superclasses: np.ndarray | None = None,
          on_eval: Callable[[int, float, float], bool] | None = None, checkpoint_dir=None, progress: bool = False,
          evaluate_test: bool = False) -> TrainResult:
    """Train `cfg` on `dataset.train` for the recipe's budget; validate on `dataset.val`.

    `on_eval(step, epoch, val_accuracy)` runs at each evaluation; True stops training (early stopping lives in
    the search). With `checkpoint_dir`, progress is saved at each evaluation and at the end, and resumed from
    there. `superclasses` (class -> group) trains a per-image router; the data set's own are used otherwise.
    """
    _check_fits(cfg, dataset)
    groups = _router_targets(cfg, dataset, superclasses)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(recipe.num_threads or len(os.sched_getaffinity(0)))
    try:
        return _Run(cfg, dataset, recipe, groups, checkpoint_dir).loop(on_eval, progress, evaluate_test)
    finally:
        torch.set_num_threads(previous_threads)


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
    def __init__(self, cfg: ArchConfig, dataset: Dataset, recipe: TrainRecipe, groups, checkpoint_dir):
        self.cfg, self.data, self.recipe, self.groups = cfg, dataset, recipe, groups
        torch.manual_seed(recipe.seed)
        self.model = build_model(cfg)
        # Weight decay on matmul and conv weights only: not on biases, norms, class token or positions.
        params = dict(self.model.named_parameters())
        decay = [p for n, p in params.items() if n.endswith("weight") and p.ndim >= 2]
        no_decay = [p for n, p in params.items() if not (n.endswith("weight") and p.ndim >= 2)]
        self.optimizer = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
                                           lr=recipe.lr, weight_decay=recipe.weight_decay,
                                           foreach=True)  # one kernel per op, not per tensor: small models
        n = len(dataset.train)
        self.batch = min(recipe.batch_size, n)
        self.steps_per_epoch = n // self.batch  # full batches only: every step has the same shape
        budgets = [recipe.steps, recipe.epochs and math.ceil(recipe.epochs * self.steps_per_epoch)]
        self.max_steps = min((b for b in budgets if b), default=None)
        self.eval_every = self.steps_per_epoch if recipe.eval_every == "epoch" else recipe.eval_every
        self.mean = torch.tensor(dataset.mean).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(dataset.std).view(1, -1, 1, 1) * 255
        self.checkpoint = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir else None
        self.state = _State()
        self.order = (-1, None)  # (epoch, its shuffle of the train split)
        if self.checkpoint and self.checkpoint.is_file():
            self._load()

    # --- schedule and budget ---------------------------------------------------------------------------

    def progress(self) -> float:
        """Fraction of the budget spent: the largest over the step and time budgets."""
        done = [self.state.step / self.max_steps] if self.max_steps else []
        if self.recipe.seconds:
            done.append(self.state.train_time / self.recipe.seconds)
        return max(done)

    def lr(self) -> float:
        """Linear warm-up, then cosine decay to 0, over the budget's progress (steps or seconds)."""
        p, warmup = self.progress(), self.recipe.warmup_fraction
        if p < warmup:
            return self.recipe.lr * max(p, 1e-3) / warmup  # floor: step 0 of a time budget is not a no-op
        return self.recipe.lr * 0.5 * (1 + math.cos(math.pi * (p - warmup) / (1 - warmup)))

    # --- one step --------------------------------------------------------------------------------------

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's batch: epoch e shuffles with seed (seed, e), so a step's batch depends on the step only."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if self.order[0] != epoch:
            self.order = (epoch, torch.randperm(len(self.data.train), generator=_generator(self.recipe.seed, epoch)))
        order = self.order[1]
        take = order[index * self.batch : (index + 1) * self.batch]
        images, labels = self.data.train.images[take], self.data.train.labels[take]
        if self.recipe.augment:
            images = augment(images, flip=self.data.flip_ok, generator=_generator(self.recipe.seed, step, 1))
        return self.normalize(images), labels

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = self.model(images, with_aux=True)
        loss = F.cross_entropy(out.logits, labels, label_smoothing=self.recipe.label_smoothing)
        if out.router_logits is not None and self.groups is not None and self.cfg.moe.router_loss_weight:
            loss = loss + self.cfg.moe.router_loss_weight * F.cross_entropy(out.router_logits, self.groups[labels])
        if out.aux_loss is not None:
            loss = loss + self.recipe.aux_loss_weight * out.aux_loss
        return loss

    def step(self) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr()
        images, labels = self.batch_at(self.state.step)
        self.model.train()
        loss = self.loss(images, labels)
        if not torch.isfinite(loss):
            raise TrainingError(f"{self.cfg.name}: loss became {loss.item()} at step {self.state.step} "
                                f"(lr {self.lr():.2e}); try a lower lr or a grad_clip")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.recipe.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.grad_clip, foreach=True)
        self.optimizer.step()
        self.state.step += 1
        return loss.item()

    # --- the loop --------------------------------------------------------------------------------------

    def loop(self, on_eval, progress: bool, evaluate_test: bool) -> TrainResult:
        bar = _progress_bar(progress, self.max_steps, self.state.step)
        start, losses = time.perf_counter(), []
        while not self.state.finished:
            tick = time.perf_counter()
            losses.append(self.step())
            self.state.train_time += time.perf_counter() - tick
            bar.update(1)
            done = self.progress() >= 1
            evaluating = done or self.state.step % self.eval_every == 0
            if len(losses) == LOG_EVERY or evaluating:  # flushed at evaluations: a resumed curve is the same
                self.state.loss_curve.append((self.state.step, float(np.mean(losses))))
                losses = []
            if evaluating:
                self.state.metrics = self.evaluate(self.data.val)
                accuracy = self.state.metrics["accuracy"]
                self.state.evals.append((self.state.step, accuracy))
                stop = bool(on_eval and on_eval(self.state.step, self.epochs(), accuracy))
                self.state.stopped_early = stop and not done
                self.state.finished = done or stop
                self.state.wall_time += time.perf_counter() - start
                start = time.perf_counter()
                self._save()
        bar.close()
        return self.result(evaluate_test)

    def epochs(self) -> float:
        return self.state.step / self.steps_per_epoch

    def result(self, evaluate_test: bool) -> TrainResult:
        test = None
        if evaluate_test:
            if not len(self.data.test):
                raise ConfigError("evaluate_test", f"data set {self.data.name!r} has no test split")
            test = self.evaluate(self.data.test)["accuracy"]
        s = self.state
        return TrainResult(
            val_accuracy=s.metrics["accuracy"], router_accuracy=s.metrics["router_accuracy"],
            expert_load=s.metrics["expert_load"], loss_curve=s.loss_curve, steps=s.step,
            epochs=round(self.epochs(), 4), wall_time_s=round(s.wall_time, 3),
            images_per_s=round(s.step * self.batch / max(s.train_time, 1e-9), 1), stopped_early=s.stopped_early,
            test_accuracy=test, evals=s.evals, model=self.model,
        )

    @torch.inference_mode()
    def evaluate(self, split: Split) -> dict[str, Any]:
        """Top-1 accuracy on split, the router's super-class accuracy and the expert load."""
        self.model.eval()
        correct, router_correct, image_load = 0, 0, 0
        hooks = _token_load_hooks(self.model)
        for start in range(0, len(split), EVAL_BATCH):
            images = self.normalize(split.images[start : start + EVAL_BATCH])
            labels = split.labels[start : start + EVAL_BATCH]
            out = self.model(images, with_aux=True)
            correct += (out.logits.argmax(-1) == labels).sum().item()
            if out.router_logits is not None:
                chosen = out.router_logits.topk(self.cfg.moe.top_k, dim=-1).indices  # (B, k)
                image_load = image_load + torch.bincount(chosen.flatten(), minlength=self.cfg.moe.num_experts)
                if self.groups is not None:
                    router_correct += (out.router_logits.argmax(-1) == self.groups[labels]).sum().item()
        for hook in hooks:
            hook.handle.remove()
        n = max(len(split), 1)
        if hooks:
            token_load = sum(hook.counts for hook in hooks)
            load = (token_load / token_load.sum()).tolist()
        else:
            load = image_load.tolist() if self.router_is_per_image else None
        return {"accuracy": correct / n, "router_accuracy": router_correct / n if self.groups is not None else None,
                "expert_load": load}

    @property
    def router_is_per_image(self) -> bool:
        return self.cfg.is_moe and self.cfg.moe.routing == "per_image"

    # --- checkpoints -----------------------------------------------------------------------------------

    def _save(self) -> None:
        if not self.checkpoint:
            return
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        payload = {"arch": self.cfg.to_dict(), "recipe": self.recipe.to_dict(), "dataset": self.data.name,
                   "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                   "state": asdict(self.state), "rng": torch.get_rng_state()}
        partial = self.checkpoint.with_suffix(".tmp")
        torch.save(payload, partial)
        partial.replace(self.checkpoint)  # atomic: a crash mid-save leaves the previous checkpoint

    def _load(self) -> None:
        try:
            payload = torch.load(self.checkpoint, weights_only=False)
        except Exception as error:  # a torn or foreign file: say which, not a pickle traceback
            raise TrainingError(f"cannot read checkpoint {self.checkpoint} ({error}); delete it to restart") from None
        mine = {"arch": self.cfg.to_dict(), "recipe": self.recipe.to_dict(), "dataset": self.data.name}
        for key, value in mine.items():
            if payload.get(key) != value:
                raise TrainingError(f"checkpoint {self.checkpoint} is from another run (its {key} differs); "
                                    f"use another checkpoint_dir or delete it")
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.state = _State(**payload["state"])
        torch.set_rng_state(payload["rng"])


def augment(images: torch.Tensor, *, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding by 1/14 of the size, 2 px at 28 (and random horizontal flips when
    `flip`), for a whole uint8 batch at once: one gather, no per-image loop. Light: on short proxy budgets
    Fashion-MNIST's val accuracy after 300 steps fell from 0.71 to 0.67 with 3 px instead of 2."""
    B, C, H, W = images.shape
    pad = max(1, H // 14)
    padded = F.pad(images, (pad, pad, pad, pad))  # (B, C, H + 2p, W + 2p)
    dy, dx = torch.randint(0, 2 * pad + 1, (2, B, 1), generator=generator)
    rows = (dy + torch.arange(H))[:, None, :, None]  # (B, 1, H, 1)
    cols = dx + torch.arange(W)
    if flip:
        mirrored = torch.rand(B, 1, generator=generator) < 0.5
        cols = torch.where(mirrored, cols.flip(-1), cols)
    cols = cols[:, None, None, :]  # (B, 1, 1, W)
    return padded[torch.arange(B)[:, None, None, None], torch.arange(C)[None, :, None, None], rows, cols]


def _generator(seed: int, *key: int) -> torch.Generator:
    """A generator seeded from (seed, *key), well mixed, the same in every process."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, *key]).generate_state(1)[0]))


class _TokenLoadHook:
    """Counts, on a per-token MoE block, how many token slots its router sends to each expert."""

    def __init__(self, module: PerTokenExperts):
        self.counts = torch.zeros(module.fc1_weight.shape[0])
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module: PerTokenExperts, inputs) -> None:
        tokens = inputs[0].reshape(-1, inputs[0].shape[-1])
        chosen = module.router(tokens).topk(module.top_k, dim=-1).indices
        self.counts += torch.bincount(chosen.flatten(), minlength=len(self.counts))


def _token_load_hooks(model: nn.Module) -> list[_TokenLoadHook]:
    return [_TokenLoadHook(m) for m in model.modules() if isinstance(m, PerTokenExperts)]


def _progress_bar(enabled: bool, total: int | None, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


__all__ = ["TrainRecipe", "TrainResult", "TrainingError", "augment", "train"]
