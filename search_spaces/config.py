"""The architecture config: the one description of a model.

An `ArchConfig` builds the model, keys every cache (`config_hash`), names trials (`name`) and is what
export writes. It validates itself on construction, so a config that exists is a config that builds.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

ROUTINGS = ("per_image", "per_token")


class ConfigError(ValueError):
    """A config field is missing, of the wrong type or out of range; the message names the field."""

    def __init__(self, field_name: str, problem: str):
        super().__init__(f"{field_name}: {problem}")
        self.field = field_name
        self.problem = problem


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(name, f"must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int = 10  # the paper's best E on ImageNet
    top_k: int = 1  # k=1 keeps the dense model's FLOPs
    layers: tuple[int, ...] = ()  # block indices whose MLP is replaced by experts
    routing: str = "per_image"  # "per_image" (Mobile V-MoE) or "per_token" (V-MoE baseline)
    router_loss_weight: float = 0.3  # weight of the super-class router loss (paper: 0.3)

    def __post_init__(self):
        if isinstance(self.layers, (list, tuple)):  # canonical: sorted tuple, so equal configs compare equal
            layers = tuple(self.layers)
            if all(isinstance(i, int) for i in layers):
                layers = tuple(sorted(layers))
            object.__setattr__(self, "layers", layers)

    def validate(self, depth: int) -> None:
        _check_int("moe.num_experts", self.num_experts, 1)
        _check_int("moe.top_k", self.top_k, 1)
        if self.top_k > self.num_experts:
            raise ConfigError("moe.top_k", f"must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if not isinstance(self.layers, tuple) or not self.layers:
            raise ConfigError("moe.layers", f"must be a non-empty list of block indices, got {self.layers!r}")
        for index in self.layers:
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < depth:
                raise ConfigError("moe.layers", f"block index {index!r} is outside [0, depth={depth})")
        if len(set(self.layers)) != len(self.layers):
            raise ConfigError("moe.layers", f"block indices must be unique, got {list(self.layers)}")
        if self.routing not in ROUTINGS:
            raise ConfigError("moe.routing", f"must be one of {', '.join(ROUTINGS)}, got {self.routing!r}")
        if self.routing == "per_image" and min(self.layers) == 0:
            raise ConfigError(
                "moe.layers",
                "per_image routing needs at least one dense block before the first MoE block "
                "(the router reads its class token), but block 0 is MoE",
            )
        weight = self.router_loss_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ConfigError("moe.router_loss_weight", f"must be a number >= 0, got {weight!r}")


@dataclass(frozen=True)
class ArchConfig:
    image_size: int = 224
    in_channels: int = 3
    patch_size: int = 16
    num_classes: int = 1000
    depth: int = 12
    width: int = 192
    num_heads: int = 3
    mlp_ratio: float = 4.0
    moe: MoEConfig | None = None  # None: a dense ViT

    def __post_init__(self):
        if isinstance(self.moe, dict):
            object.__setattr__(self, "moe", from_mapping(MoEConfig, self.moe, "moe"))
        if self.moe is not None and not isinstance(self.moe, MoEConfig):
            raise ConfigError("moe", f"must be a mapping of MoE fields, got {self.moe!r}")
        if self.moe is not None and self.moe.num_experts == 0:
            object.__setattr__(self, "moe", None)  # num_experts: 0 is how a search space says "dense"
        self.validate()

    def validate(self) -> None:
        for name in ("image_size", "in_channels", "patch_size", "num_classes", "depth", "width", "num_heads"):
            _check_int(name, getattr(self, name), 1)
        if self.image_size % self.patch_size:
            raise ConfigError(
                "patch_size", f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}"
            )
        if self.width % self.num_heads:
            raise ConfigError("num_heads", f"width={self.width} is not divisible by num_heads={self.num_heads}")
        if isinstance(self.mlp_ratio, bool) or not isinstance(self.mlp_ratio, (int, float)) or self.mlp_ratio <= 0:
            raise ConfigError("mlp_ratio", f"must be a positive number, got {self.mlp_ratio!r}")
        if self.moe is not None:
            self.moe.validate(self.depth)

    # Derived sizes, used by the model, the FLOP formulas and the search.
    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        return self.num_patches + 1  # + class token

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return self.moe.layers if self.moe else ()

    @property
    def name(self) -> str:
        """A short readable name, e.g. `vit-12x192h3-p16-224` or `vmoe-12x192h3-p16-224-e10k1-pi-L10.11`."""
        base = f"{self.depth}x{self.width}h{self.num_heads}-p{self.patch_size}-{self.image_size}"
        if self.mlp_ratio != 4:
            base += f"-r{self.mlp_ratio:g}"
        if not self.moe:
            return f"vit-{base}"
        routing = "pi" if self.moe.routing == "per_image" else "pt"
        layers = ".".join(map(str, self.moe_layers))
        return f"vmoe-{base}-e{self.moe.num_experts}k{self.moe.top_k}-{routing}-L{layers}"

    def to_dict(self) -> dict[str, Any]:
        """Plain, stable dict: the same config always gives the same dict (and YAML, and hash)."""
        data = asdict(self)
        data["mlp_ratio"] = float(self.mlp_ratio)
        if self.moe is not None:
            data["moe"]["layers"] = list(self.moe.layers)
            data["moe"]["router_loss_weight"] = float(self.moe.router_loss_weight)
        return data

    def config_hash(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: Any) -> ArchConfig:
        return from_mapping(cls, data, "")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> ArchConfig:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError("config", f"not valid YAML ({error})") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_yaml())
        return path

    @classmethod
    def load(cls, path: str | Path) -> ArchConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError("config", f"no architecture file at {path}")
        try:
            return cls.from_yaml(path.read_text())
        except ConfigError as error:
            raise ConfigError(error.field, f"{error.problem} (in {path})") from None

    def dense(self) -> ArchConfig:
        """The dense ViT of the same shape: the baseline this MoE must beat."""
        return replace(self, moe=None)


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing anchors and aliases: a few hundred bytes of nested aliases expand
    to gigabytes, and a config never needs them."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise yaml.composer.ComposerError(None, None, "anchors and aliases are not allowed", event.start_mark)
        return super().compose_node(parent, index)


def safe_yaml_load(text: str) -> Any:
    """`yaml.safe_load` for text from elsewhere: no anchors or aliases (a `yaml.YAMLError` names the line)."""
    return yaml.load(text, Loader=_NoAliasLoader)


def check_fields(cls: type, data: Any, where: str) -> dict:
    """`data` if it is a mapping of `cls`'s dataclass fields; else a ConfigError naming the section `where`
    ("" for the top level) or its first unknown field, with the known ones."""
    if not isinstance(data, dict):
        raise ConfigError(where or "config", f"must be a mapping of {cls.__name__} fields, got {data!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        field = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(field, f"unknown field (known: {', '.join(sorted(known))})")
    return data


def from_mapping(cls: type, data: Any, where: str):
    """`cls(**data)` for a config dataclass, after `check_fields`."""
    return cls(**check_fields(cls, data, where))


__all__ = ["ROUTINGS", "ArchConfig", "ConfigError", "MoEConfig", "check_fields", "from_mapping", "safe_yaml_load"]
