"""A found architecture in the user's own training: a timm model name and the paper's loss as a function.

    import search_spaces.timm_entry  # registers "mobile_vmoe" with timm
    model = timm.create_model("mobile_vmoe", arch="exports/best-moe/arch.yaml", num_classes=1000)
    out = model(images, with_aux=True)  # ModelOutput: logits, router_logits, aux_loss
    loss = mobile_vmoe_loss(out.logits, out.router_logits, labels, superclasses, router_weight=0.3)

`arch` (required) is an architecture YAML (what `vmoe-nas export` writes), a preset name or an `ArchConfig`;
timm's `num_classes` (0: no head, the model gives pooled features), `in_chans` and `img_size` replace its
fields; `drop_path_rate` (stochastic depth) and `global_pool` ('token', 'avg', 'max' or '') are honoured.
Any other option (drop_rate, features_only, ...) is refused by name. `model.pretrained_cfg` describes the real
input (size, and the mean and std of `input.json` beside an exported arch.yaml), so
`timm.data.resolve_data_config` gives it; timm's `pretrained_cfg_overlay` replaces any of it. Importing this
module imports timm.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model

from nas.config import ConfigError, is_file, shown
from search_spaces.config import ArchConfig
from search_spaces.model import VisionMoE, build_model
from search_spaces.presets import load_arch

TIMM_FIELDS = {"num_classes": "num_classes", "in_chans": "in_channels", "img_size": "image_size"}
MODEL_OPTIONS = ("drop_path_rate", "global_pool")  # VisionMoE's own training choices
TIMM_PLUMBING = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")  # what timm.create_model always passes


def input_cfg(cfg: ArchConfig, mean=None, std=None) -> dict:
    """timm's pretrained_cfg fields of `cfg`'s input; without `mean` and `std`, ImageNet's for 3 channels and
    0.5 for others."""
    if mean is None or std is None:
        mean, std = (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD) if cfg.in_channels == 3 else (
            (0.5,) * cfg.in_channels, (0.5,) * cfg.in_channels)
    return {"input_size": (cfg.in_channels, cfg.image_size, cfg.image_size), "fixed_input_size": True,
            "mean": tuple(mean), "std": tuple(std), "num_classes": cfg.num_classes}


default_cfgs = generate_default_cfgs({"mobile_vmoe": {**input_cfg(load_arch("vmoe-12x192")),
                                                      "first_conv": "patch_embed", "classifier": "head"}})


@register_model
def mobile_vmoe(pretrained: bool = False, arch: str | ArchConfig | None = None,
                pretrained_cfg_overlay: dict | None = None, **kwargs) -> VisionMoE:
    """A freshly initialised model of `arch` (no pretrained weights: the search fixes graph and cost)."""
    if pretrained:
        raise ValueError("mobile_vmoe has no pretrained weights; train it (vmoe-nas train, or your own loop)")
    unknown = sorted(k for k in kwargs if k not in (*TIMM_FIELDS, *MODEL_OPTIONS, *TIMM_PLUMBING))
    if unknown:
        raise ConfigError(unknown[0], f"mobile_vmoe does not implement it (it takes {', '.join(TIMM_FIELDS)}, "
                                      f"{', '.join(MODEL_OPTIONS)})")
    cfg = _arch(arch)
    overrides = {field: kwargs[name] for name, field in TIMM_FIELDS.items() if kwargs.get(name) is not None}
    options = {name: kwargs[name] for name in MODEL_OPTIONS if kwargs.get(name) is not None}
    model = build_model(dataclasses.replace(cfg, **overrides) if overrides else cfg, **options)
    beside = Path(arch).with_name("input.json") if not isinstance(arch, ArchConfig) and Path(arch).is_file() else None
    normalisation = json.loads(beside.read_text()) if beside is not None and beside.is_file() else {}
    model.pretrained_cfg = {**default_cfgs["mobile_vmoe"].default.to_dict(),
                            **input_cfg(model.cfg, normalisation.get("mean"), normalisation.get("std")),
                            **(pretrained_cfg_overlay or {})}
    return model


def _arch(arch) -> ArchConfig:
    """`arch` as an ArchConfig: given as one, a preset name, or a YAML file (only .yaml/.yml: any other file is
    not read, so no error quotes what it holds)."""
    if isinstance(arch, ArchConfig):
        return arch
    if not isinstance(arch, (str, Path)) or not str(arch):
        raise ConfigError("arch", "mobile_vmoe needs arch=: an architecture YAML file (vmoe-nas export writes "
                                  f"arch.yaml), a preset name or an ArchConfig; got {shown(arch)}")
    path = Path(arch)
    if is_file(path) and path.suffix.lower() not in (".yaml", ".yml"):
        raise ConfigError("arch", f"{shown(str(arch))} is not a YAML file (.yaml or .yml)")
    return load_arch(arch)


def router_loss(router_logits: torch.Tensor, labels: torch.Tensor, superclasses: torch.Tensor) -> torch.Tensor:
    """Mobile V-MoE's super-class router loss: cross-entropy of the per-image router's logits (B, E) against
    each label's super-class (`superclasses`: class -> group, one per class, as `superclasses.json` holds)."""
    return F.cross_entropy(router_logits, superclasses.to(labels.device)[labels])


def mobile_vmoe_loss(logits: torch.Tensor, router_logits: torch.Tensor | None, labels: torch.Tensor,
                     superclasses: torch.Tensor | None, *, router_weight: float = 0.3,
                     label_smoothing: float = 0.0) -> torch.Tensor:
    """The paper's training loss for any loop: classification cross-entropy plus `router_weight` (the
    architecture's `moe.router_loss_weight`) times the router loss; a dense model or per-token routing has
    no router logits, and its loss is the cross-entropy alone."""
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if router_logits is not None and superclasses is not None and router_weight:
        loss = loss + router_weight * router_loss(router_logits, labels, superclasses)
    return loss


__all__ = ["mobile_vmoe", "mobile_vmoe_loss", "router_loss"]
