"""The training recipe: optimiser, schedule, budget, augmentation and where a run goes, validated on
construction; the part of it that identifies a run (what a checkpoint must match to be resumed); and what it
sets up for a run: the learning-rate schedule over its budget and the optimiser's weight-decay groups.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from nas.config import MAX_NUMBER, MAX_SEED, ConfigError, check_fields, check_int, check_number, from_mapping, shown
from nas.devices import parse_device

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Where, how fast and how often saved a run goes, not what it computes: a checkpoint resumes across them.
RUN_ONLY = ("device", "compile", "num_threads", "checkpoint_every_s")
MAX_BATCH_SIZE = 65536  # images per step: past it a batch of ImageNet images outgrows any accelerator's memory
MAX_STEPS = 10**12  # steps or epochs: past it a budget is a typo


@dataclass(frozen=True)
class TrainRecipe:
    # Budget: any of the three; training stops at the first one reached. It is also the schedule's length,
    # whatever step `train(stop_at_step=...)` pauses at.
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
    seed: int = 0  # the model's initial weights, and the batches unless data_seed is set
    data_seed: int | None = None  # batch order and augmentation: one data_seed, same batches whatever the model
    eval_every: int | str = "epoch"  # steps between validations, or "epoch"
    num_threads: int | None = None  # None: all cores this process may use
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps; auto: CUDA, then MPS, then the CPU
    precision: str = "auto"  # auto | fp32 | bf16 | fp16; auto: bf16 on CUDA where supported, fp32 on the CPU
    compile: bool = False  # torch.compile: pays off over long runs, not over a search's short proxies
    mixup: float = 0.0  # mixup alpha (timm's Mixup); 0 = off. DeiT uses 0.8 over 300 epochs
    cutmix: float = 0.0  # cutmix alpha; 0 = off. DeiT: 1.0
    checkpoint_every_s: float = 600.0  # with a checkpoint folder: saved this often too, not only at evaluations

    def __post_init__(self):
        if all(getattr(self, name) is None for name in ("epochs", "steps", "seconds")):
            raise ConfigError("epochs", "a budget is needed: set epochs, steps or seconds")
        for name in ("epochs", "steps", "seconds", "grad_clip"):
            check_number(name, getattr(self, name), optional=True, positive=True, integer=name == "steps")
        for name in ("batch_size", "seed"):
            check_number(name, getattr(self, name), integer=True, positive=name == "batch_size")
        check_number("data_seed", self.data_seed, optional=True, integer=True)
        check_number("num_threads", self.num_threads, optional=True, positive=True, integer=True)
        for name, maximum in (("seed", MAX_SEED), ("data_seed", MAX_SEED), ("batch_size", MAX_BATCH_SIZE),
                              ("num_threads", 1024), ("steps", MAX_STEPS), ("epochs", MAX_STEPS),
                              ("seconds", 10**9), ("eval_every", MAX_STEPS)):
            value = getattr(self, name)
            if isinstance(value, (int, float)) and value > maximum:
                raise ConfigError(name, f"must be <= {maximum:,}, got {shown(value)}")
        check_number("lr", self.lr, positive=True)
        check_number("checkpoint_every_s", self.checkpoint_every_s, positive=True)
        for name in ("weight_decay", "label_smoothing", "aux_loss_weight", "warmup_fraction"):
            check_number(name, getattr(self, name))
        if self.warmup_fraction >= 1 or self.label_smoothing >= 1:
            raise ConfigError("warmup_fraction" if self.warmup_fraction >= 1 else "label_smoothing", "must be < 1")
        if self.eval_every != "epoch":
            check_number("eval_every", self.eval_every, positive=True, integer=True)
        for name in ("augment", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"must be true or false, got {getattr(self, name)!r}")
        parse_device(self.device)
        if self.precision not in PRECISIONS:
            raise ConfigError("precision", f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("mixup", "cutmix"):
            check_number(name, getattr(self, name))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> TrainRecipe:
        if not isinstance(data, dict):  # callers prefix the fields' names with their section's
            raise ConfigError("recipe", f"must be a mapping of recipe fields, got {type(data).__name__}")
        return from_mapping(cls, data, "")


def recipe_identity(data: Any) -> dict | None:
    """A stored recipe read back as a recipe, so that fields added since it was written take their defaults,
    without the fields that only say where and how fast it ran (RUN_ONLY)."""
    try:
        recipe = TrainRecipe.from_dict(data).to_dict()
    except ConfigError:
        return None
    return {name: value for name, value in recipe.items() if name not in RUN_ONLY}



def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matmul and conv weights only: not on biases, norms, class token or positions."""
    params = dict(model.named_parameters())
    decays = {name: name.endswith("weight") and p.ndim >= 2 for name, p in params.items()}
    return [{"params": [p for name, p in params.items() if decays[name]], "weight_decay": weight_decay},
            {"params": [p for name, p in params.items() if not decays[name]], "weight_decay": 0.0}]


@dataclass(frozen=True)
class Schedule:
    """Linear warm-up from 0, then cosine decay to 0, over the fraction of the budget spent. Its length is the
    recipe's budget, not where a run stops: a run stopped at a rung and continued follows the same curve."""

    peak_lr: float
    warmup_fraction: float
    steps: int | None  # the step budget (the smaller of steps and epochs), if any
    seconds: float | None  # the training-time budget, if any

    @classmethod
    def of(cls, recipe: TrainRecipe, steps_per_epoch: int) -> Schedule:
        budgets = [recipe.steps, recipe.epochs and math.ceil(recipe.epochs * steps_per_epoch)]
        return cls(recipe.lr, recipe.warmup_fraction, min((b for b in budgets if b), default=None), recipe.seconds)

    def progress(self, step: int, train_time: float = 0.0) -> float:
        """Fraction of the budget spent: the largest over the step and time budgets."""
        done = [step / self.steps] if self.steps else []
        if self.seconds:
            done.append(train_time / self.seconds)
        return max(done)

    def lr(self, progress: float) -> float:
        warmup = self.warmup_fraction
        if progress < warmup:
            return self.peak_lr * max(progress, 1e-3) / warmup  # floor: step 0 of a time budget is not a no-op
        return self.peak_lr * 0.5 * (1 + math.cos(math.pi * (progress - warmup) / (1 - warmup)))


__all__ = ["MAX_BATCH_SIZE", "MAX_STEPS", "PRECISIONS", "RUN_ONLY", "Schedule", "TrainRecipe", "param_groups",
           "recipe_identity"]


EVALUATOR_KINDS = ("train", "supernet")  # standalone proxy training; inherited weights of a supernet


@dataclass(frozen=True)
class SupernetSpec:
    """The supernet fields of a study's `evaluator` (beside `kind: supernet` and the training recipe)."""

    random_subnets: int = 2  # per step (beside the largest and the smallest with `sandwich`)
    distill: bool = True  # in-place distillation: subnets learn the largest's soft predictions
    sandwich: bool = True  # false: each step trains only its `random_subnets` uniformly drawn (single path)
    finetune_steps: int = 0  # per candidate, after inheriting its weights (0: score the inherited weights)
    val_images: int | None = None  # validation images a candidate is scored on (None: the whole split)

    def __post_init__(self):
        for name, minimum in (("random_subnets", 0), ("finetune_steps", 0), ("val_images", 1)):
            check_int(f"evaluator.{name}", getattr(self, name), minimum, MAX_NUMBER, optional=name == "val_images")
        for name in ("distill", "sandwich"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"evaluator.{name}", f"must be true or false, got {getattr(self, name)!r}")
        if not self.sandwich and self.distill:
            raise ConfigError("evaluator.distill", "in-place distillation learns from the sandwich's largest "
                                                   "subnet: set sandwich: true or distill: false")
        if not self.sandwich and not self.random_subnets:
            raise ConfigError("evaluator.random_subnets", "without the sandwich rule a step trains only its "
                                                          "random subnets: at least 1")

    @property
    def subnets_per_step(self) -> int:
        return (2 if self.sandwich else 0) + self.random_subnets

    @classmethod
    def of(cls, evaluator: dict) -> SupernetSpec:
        fields = {k: v for k, v in evaluator.items() if k in SUPERNET_FIELDS}
        return cls(**check_fields(cls, fields, "evaluator"))


SUPERNET_FIELDS = tuple(f.name for f in dataclasses.fields(SupernetSpec))
