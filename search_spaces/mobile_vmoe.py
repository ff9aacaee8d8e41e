"""The default search space: Mobile V-MoE and dense ViTs over depth, width, heads, MLP ratio, experts,
top-k, MoE placement, routing and router loss weight.

Every choice is a fixed categorical set (no range depends on another parameter: samplers mishandle
those), and a dense trial (`num_experts: 0`) samples no MoE parameters. A sampled combination that
cannot be built (top-k above E, a per-image MoE starting at block 0, ...) raises `InvalidArchitecture`
before anything is profiled.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

from nas.config import ConfigError, check_int, from_mapping, is_number, shown
from search_spaces.config import MAX_CHOICES, MAX_DEPTH, ROUTINGS, ArchConfig, MoEConfig

PLACEMENTS = ("last1", "last2", "last3", "alternate")  # or explicit lists such as "4,5"
# trial parameter -> the space field listing its choices
PARAMS = {"depth": "depths", "width": "widths", "num_heads": "num_heads", "patch_size": "patch_sizes",
          "mlp_ratio": "mlp_ratios", "num_experts": "num_experts", "top_k": "top_k", "moe_placement": "placements",
          "routing": "routings", "router_loss_weight": "router_loss_weights"}


class InvalidArchitecture(ValueError):
    """A sampled combination of choices that does not describe a buildable model."""


class Suggester(Protocol):
    """What a space needs from an Optuna trial (`optuna.Trial` fits; so does a test double)."""

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


def placement_layers(placement: str, depth: int) -> tuple[int, ...]:
    """Block indices of a named placement: last N blocks, every other block of the second half
    (ending at the last block), or an explicit comma-separated list."""
    if placement.startswith("last") and placement[4:].isdigit():
        count = int(placement[4:])
        return tuple(range(max(depth - count, 0), depth))
    if placement == "alternate":
        return tuple(sorted(range(depth - 1, depth // 2 - 1, -2)))
    try:
        return tuple(sorted(int(i) for i in placement.split(",")))
    except ValueError:
        known = ", ".join(PLACEMENTS)
        raise ConfigError("space.placements", f"unknown placement {shown(placement)} (use {known} or '4,5')") from None


def _as_tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _first_buildable(candidates: Iterable[dict]) -> tuple[dict | None, str]:
    """The first of `candidates` (ArchConfig arguments) that builds; else None and the first one's error."""
    first_error = ""
    for arch in candidates:
        try:
            ArchConfig(**arch)
            return arch, ""
        except ConfigError as error:
            first_error = first_error or str(error)
    return None, first_error


@dataclass(frozen=True)
class MobileVMoESpace:
    patch_sizes: tuple[int, ...] = (4, 7)
    depths: tuple[int, ...] = (4, 6, 8)
    widths: tuple[int, ...] = (32, 48, 64, 96)
    head_width: int | None = 16  # heads = width // head_width; or set num_heads to search heads directly
    num_heads: tuple[int, ...] = ()
    mlp_ratios: tuple[float, ...] = (2.0, 4.0)
    num_experts: tuple[int, ...] = (0, 4, 8)  # 0 = dense: every study samples its own dense baselines
    top_k: tuple[int, ...] = (1, 2)
    placements: tuple[str, ...] = ("last1", "last2", "last3", "alternate")
    routings: tuple[str, ...] = ("per_image",)
    router_loss_weights: tuple[float, ...] = (0.3,)

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "head_width":
                object.__setattr__(self, f.name, _as_tuple(value))
        self.validate()

    def validate(self) -> None:
        for f in fields(self):
            choices = getattr(self, f.name)
            if isinstance(choices, tuple) and len(choices) > MAX_CHOICES:
                raise ConfigError(f"space.{f.name}",
                                  f"lists {len(choices):,} choices, more than MAX_CHOICES={MAX_CHOICES}")
        for name in ("patch_sizes", "depths", "widths", "mlp_ratios", "num_experts", "placements", "routings"):
            if not getattr(self, name):
                raise ConfigError(f"space.{name}", "must list at least one choice")
        if (self.head_width is None) == (not self.num_heads):
            raise ConfigError("space.head_width", "set exactly one of head_width or num_heads")
        for name in ("patch_sizes", "depths", "widths", "num_heads", "top_k"):
            for value in getattr(self, name):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ConfigError(f"space.{name}", f"choices must be positive integers, got {shown(value)}")
        if max(self.depths) > MAX_DEPTH:
            raise ConfigError("space.depths", f"choices must be <= {MAX_DEPTH}, got {shown(max(self.depths))}")
        if self.head_width is not None:
            check_int("space.head_width", self.head_width, 1)
        for value in self.num_experts:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError("space.num_experts", f"choices must be integers >= 0, got {shown(value)}")
        if any(e > 0 for e in self.num_experts) and not self.top_k:
            raise ConfigError("space.top_k", "must list at least one choice when MoE is searched")
        for routing in self.routings:
            if routing not in ROUTINGS:
                raise ConfigError("space.routings", f"must be among {', '.join(ROUTINGS)}, got {shown(routing)}")
        for placement in self.placements:
            if not isinstance(placement, str):
                raise ConfigError("space.placements", f"choices must be names such as 'last2' or lists such as '4,5', "
                                  f"got {shown(placement)}")
            placement_layers(placement, max(self.depths))
        for name, minimum in (("mlp_ratios", 1e-9), ("router_loss_weights", 0)):
            for value in getattr(self, name):
                if not is_number(value) or value < minimum:
                    raise ConfigError(f"space.{name}", f"choices must be numbers >= {minimum:g}, got {shown(value)}")
        self._check_buildable()

    def _check_buildable(self) -> None:
        """Refuse a space whose choices never build: some width, heads and MLP ratio must build a model and, when
        MoE is searched, some experts, top-k, placement, depth and routing an MoE (else every such trial is
        pruned). Patch sizes are left to the data set, which brings the image size."""
        base = dict(image_size=1, in_channels=1, patch_size=1, num_classes=1, depth=1)
        trunk, problem = _first_buildable(dict(base, width=w, num_heads=h, mlp_ratio=r)
                                          for w in self.widths for h in self._heads(w) if w % h == 0
                                          for r in self.mlp_ratios)
        if trunk is None:
            heads = "num_heads" if self.num_heads else "head_width"
            raise ConfigError("space", f"no choice of widths, {heads} and mlp_ratios builds a model "
                                       f"(e.g. {problem or 'no width is divisible by its number of heads'})")
        experts = [e for e in self.num_experts if e > 0]
        moe, problem = _first_buildable(
            dict(trunk, depth=d, moe=MoEConfig(e, k, placement_layers(p, d), r))
            for e in experts for k in self.top_k if k <= e
            for d in self.depths for p in self.placements for r in self.routings
        )
        if experts and moe is None:
            raise ConfigError("space", f"num_experts {experts} asks for MoE, but no choice of top_k, placements, "
                                       f"depths and routings builds one "
                                       f"(e.g. {problem or 'every top_k exceeds the number of experts'})")

    def _heads(self, width: int) -> tuple[int, ...]:
        """The head counts a trial of this width may have."""
        return self.num_heads or (max(width // self.head_width, 1),)

    @classmethod
    def from_dict(cls, data: dict) -> MobileVMoESpace:
        return from_mapping(cls, data, "space")

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def sample(self, trial: Suggester, *, image_size: int, in_channels: int, num_classes: int) -> ArchConfig:
        """Sample one architecture. Raises `InvalidArchitecture` for a combination that cannot be built."""
        depth = trial.suggest_categorical("depth", self.depths)
        width = trial.suggest_categorical("width", self.widths)
        heads = trial.suggest_categorical("num_heads", self.num_heads) if self.num_heads else self._heads(width)[0]
        arch = dict(
            image_size=image_size,
            in_channels=in_channels,
            patch_size=trial.suggest_categorical("patch_size", self.patch_sizes),
            num_classes=num_classes,
            depth=depth,
            width=width,
            num_heads=heads,
            mlp_ratio=float(trial.suggest_categorical("mlp_ratio", self.mlp_ratios)),
        )
        experts = trial.suggest_categorical("num_experts", self.num_experts)
        if experts:
            arch["moe"] = MoEConfig(
                num_experts=experts,
                top_k=trial.suggest_categorical("top_k", self.top_k),
                layers=placement_layers(trial.suggest_categorical("moe_placement", self.placements), depth),
                routing=trial.suggest_categorical("routing", self.routings),
                router_loss_weight=float(trial.suggest_categorical("router_loss_weight", self.router_loss_weights)),
            )
        try:
            return ArchConfig(**arch)
        except ConfigError as error:
            raise InvalidArchitecture(str(error)) from None

    def smallest_dense(self, *, image_size: int, in_channels: int, num_classes: int) -> ArchConfig:
        """The cheapest dense architecture the space's choices make (fewest and narrowest blocks, fewest
        tokens): the anchor a study's latencies are measured against."""
        cheapest = {"depth": min, "width": min, "num_heads": min, "mlp_ratio": min,
                    "patch_size": lambda sizes: max((p for p in sizes if image_size % p == 0), default=sizes[0])}

        class Cheapest:
            def suggest_categorical(self, name: str, choices: Any) -> Any:
                return 0 if name == "num_experts" else cheapest[name](choices)

        return self.sample(Cheapest(), image_size=image_size, in_channels=in_channels, num_classes=num_classes)

    def router_groups(self) -> tuple[int, ...]:
        """The expert counts whose per-image routers learn super-classes (so need a class grouping)."""
        guided = "per_image" in self.routings and any(weight > 0 for weight in self.router_loss_weights)
        return tuple(sorted(e for e in set(self.num_experts) if e > 0)) if guided else ()

    def params_for(self, cfg: ArchConfig) -> dict[str, Any]:
        """The trial parameters that sample `cfg`, for enqueuing a known architecture (e.g. a preset).
        Raises ConfigError naming the first value the space cannot express."""
        params: dict[str, Any] = {
            "depth": cfg.depth,
            "width": cfg.width,
            "patch_size": cfg.patch_size,
            "mlp_ratio": float(cfg.mlp_ratio),
            "num_experts": cfg.moe.num_experts if cfg.moe else 0,
        }
        if self.num_heads:
            params["num_heads"] = cfg.num_heads
        elif (cfg.num_heads,) != self._heads(cfg.width):
            raise ConfigError("enqueue", f"{cfg.name}: num_heads={cfg.num_heads} is not width // head_width")
        if cfg.moe:
            placement = next((p for p in self.placements if placement_layers(p, cfg.depth) == cfg.moe.layers), None)
            if placement is None:
                raise ConfigError("enqueue", f"{cfg.name}: MoE layers {list(cfg.moe.layers)} match no placement")
            params.update(
                top_k=cfg.moe.top_k,
                moe_placement=placement,
                routing=cfg.moe.routing,
                router_loss_weight=float(cfg.moe.router_loss_weight),
            )
        self.check_params(params, f"enqueue: {cfg.name}")
        return params

    def check_params(self, params: dict[str, Any], where: str) -> None:
        """Enqueued parameters must name this space's parameters and pick among their choices."""
        known = [name for name in PARAMS if name != "num_heads" or self.num_heads]  # else heads follow the width
        for name, value in params.items():
            if name not in known:
                raise ConfigError(where, f"unknown parameter {shown(name)} (known: {', '.join(known)})")
            choices = getattr(self, PARAMS[name])
            if value not in choices:
                raise ConfigError(where, f"{name}={shown(value)} is not among the space's {shown(list(choices))}")


SPACES = {"mobile_vmoe": MobileVMoESpace}
