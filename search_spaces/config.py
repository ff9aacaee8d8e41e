"""The architecture config: the one description of a model.

An `ArchConfig` builds the model, keys every cache (`config_hash`), names trials (`name`) and is what
export writes. It validates itself on construction, so a config that exists is a config that builds.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from nas.config import ConfigError, check_int, from_mapping, is_file, is_number, read_yaml, safe_yaml_load, shown

ROUTINGS = ("per_image", "per_token")
MAX_PARAMS = 10**10  # 40 GB of fp32 weights: refuses what no machine builds (a typo can ask for terabytes)
MAX_DEPTH = 1000  # blocks: a tiny block has few parameters, but a million of them take minutes to construct
MAX_CHOICES = 100  # per search-space field: a sampler learns nothing from more, and checking them takes minutes


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
        check_int("moe.num_experts", self.num_experts, 1)
        check_int("moe.top_k", self.top_k, 1)
        if self.top_k > self.num_experts:
            raise ConfigError("moe.top_k", f"must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if not isinstance(self.layers, tuple) or not self.layers:
            raise ConfigError("moe.layers", f"must be a non-empty list of block indices, got {shown(self.layers)}")
        for index in self.layers:
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < depth:
                raise ConfigError("moe.layers", f"block index {shown(index)} is outside [0, depth={depth})")
        if len(set(self.layers)) != len(self.layers):
            raise ConfigError("moe.layers", f"block indices must be unique, got {shown(list(self.layers))}")
        if self.routing not in ROUTINGS:
            raise ConfigError("moe.routing", f"must be one of {', '.join(ROUTINGS)}, got {shown(self.routing)}")
        if self.routing == "per_image" and min(self.layers) == 0:
            raise ConfigError(
                "moe.layers",
                "per_image routing needs at least one dense block before the first MoE block "
                "(the router reads its class token), but block 0 is MoE",
            )
        if not is_number(self.router_loss_weight) or self.router_loss_weight < 0:
            raise ConfigError("moe.router_loss_weight", f"must be a number >= 0, got {shown(self.router_loss_weight)}")


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
            raise ConfigError("moe", f"must be a mapping of MoE fields, got {shown(self.moe)}")
        if self.moe is not None and self.moe.num_experts == 0:
            object.__setattr__(self, "moe", None)  # num_experts: 0 is how a search space says "dense"
        self.validate()

    def validate(self) -> None:
        for name in ("image_size", "in_channels", "patch_size", "depth", "width", "num_heads"):
            check_int(name, getattr(self, name), 1)
        check_int("num_classes", self.num_classes, 0)  # 0: no head, the model gives features (timm's convention)
        if self.depth > MAX_DEPTH:
            raise ConfigError("depth", f"must be <= MAX_DEPTH={MAX_DEPTH}, got {shown(self.depth)}")
        if self.image_size % self.patch_size:
            raise ConfigError(
                "patch_size", f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}"
            )
        if self.width % self.num_heads:
            raise ConfigError("num_heads", f"width={self.width} is not divisible by num_heads={self.num_heads}")
        if not is_number(self.mlp_ratio) or self.mlp_ratio <= 0:
            raise ConfigError("mlp_ratio", f"must be a positive number, got {shown(self.mlp_ratio)}")
        if self.mlp_hidden < 1:
            raise ConfigError("mlp_ratio", f"width={self.width} x mlp_ratio={self.mlp_ratio:g} is a zero-width MLP; "
                                           "it must give at least 1 hidden unit")
        if self.moe is not None:
            self.moe.validate(self.depth)
        if self.num_params > MAX_PARAMS:  # every term grows with the width
            raise ConfigError("width", f"this model would have {self.num_params:.3g} parameters, more than "
                                       f"MAX_PARAMS={MAX_PARAMS:.3g}")

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
    def num_params(self) -> int:
        """All parameters, every expert included, written out from the architecture: what `build_model` would
        allocate, known before it does. Tests hold it equal to `count_params`' total.

        With width C, MLP hidden H, E experts:
            patch embedding  C * in_channels * patch_size^2 + C     (conv weight and bias)
            tokens           C + num_tokens * C                     (class token, positions)
            each block       4C^2 + 8C (2 norms, qkv, proj) + 2CH + H + C per MLP (E of them in an MoE block)
              per_token      + C * E (a router per MoE block, no bias)
            per_image router C * E, once
            final norm, head 2C + C * num_classes + num_classes
        """
        c, h = self.width, self.mlp_hidden
        mlp = 2 * c * h + h + c
        params = c * self.in_channels * self.patch_size**2 + c + c + self.num_tokens * c
        params += self.depth * (4 * c * c + 8 * c + mlp) + 2 * c + c * self.num_classes + self.num_classes
        if self.moe is not None:
            experts, per_token = self.moe.num_experts, self.moe.routing == "per_token"
            params += len(self.moe.layers) * ((experts - 1) * mlp + (c * experts if per_token else 0))
            params += 0 if per_token else c * experts
        return params

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    @property
    def routes_on_superclasses(self) -> bool:
        """Whether its router is trained to predict super-classes (per-image routing with a router loss)."""
        return bool(self.moe and self.moe.routing == "per_image" and self.moe.router_loss_weight > 0)

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
    def from_yaml(cls, text: str | bytes) -> ArchConfig:
        return cls.from_dict(safe_yaml_load(text))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_yaml())
        return path

    @classmethod
    def load(cls, path: str | Path) -> ArchConfig:
        path = Path(path)
        if not is_file(path):
            raise ConfigError("config", f"no architecture file at {shown(str(path))}")
        data = read_yaml(path)
        if not isinstance(data, dict):  # say what it holds, never quote it: the path may name any file
            raise ConfigError("config", f"{path} holds no architecture (a YAML mapping of fields such as depth and "
                                        f"width) but a {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except ConfigError as error:
            raise ConfigError(error.field, f"{error.problem} (in {path})") from None

    def dense(self) -> ArchConfig:
        """The dense ViT of the same shape: the baseline this MoE must beat."""
        return replace(self, moe=None)


__all__ = ["MAX_CHOICES", "MAX_DEPTH", "MAX_PARAMS", "ROUTINGS", "ArchConfig", "MoEConfig"]
