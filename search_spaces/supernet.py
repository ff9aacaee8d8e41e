"""A weight-sharing supernet over a `mobile_vmoe` space: every architecture the space samples is a subnet.

Weight entanglement as in AutoFormer (Chen et al. 2021, Cream/AutoFormer's `LinearSuper`, `LayerNormSuper`):
a subnet of width w, MLP hidden size h and depth d uses the leading slices `[:w]`, `[:h]` of the largest
layers' weights and the first d blocks. Heads follow the width (q, k and v each sliced to their leading w
columns, so h heads of a fixed head width are the first h heads; AutoFormer's `qkv_super` interleaves
q, k, v rows instead, but `VisionMoE` reads qkv as [q | k | v] blocks).

Patch sizes: one trunk per patch size (patch and position embedding, blocks, routers, norm, head), weights
shared only between subnets of one token count. Sharing the blocks across patch sizes was measured first
(benchmarks/evaluator_fidelity.py, fashion-quick's space, 24 architectures against 1,500-step standalone
training): shared blocks rated every 16-token (patch 7) subnet below the 49-token ones, the reverse of
standalone training, Kendall tau 0.08 [-0.27, 0.41] after 600 steps; a trunk per patch size ranks them at
0.57 [0.34, 0.75] after 300. Once-for-All likewise keeps what depends on the resolution apart.

Experts: each block holds its dense MLP and a bank of max(num_experts) experts; a subnet with E experts in
blocks L runs, in those blocks, the first E experts (sliced like the MLP), per image, k of E. One per-image
router per expert count E (sliced on its input width only): the super-class targets of E experts are a
partition of the classes of their own (`nas.superclasses`), unrelated to that of another E, so a router
row shared between E=4 and E=8 would be asked to mean two different groups. Routers cost C x E weights.

A subnet's forward runs `build_model(arch)`'s own code (`torch.func.functional_call` on a weightless
template) on the sliced weights, so `extract(arch)`, a standalone `VisionMoE` holding copies of the same
slices, computes exactly what the subnet computed: profile, export and full training work on it unchanged.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from nas.config import ConfigError, shown
from search_spaces.config import ArchConfig
from search_spaces.mobile_vmoe import InvalidArchitecture, MobileVMoESpace
from search_spaces.model import Attention, Experts, Mlp, ModelOutput, VisionMoE, _init_linear, build_model

TEMPLATES = 256  # weightless models kept for reuse (a template costs ~1 ms to build; a study repeats archs)


class SupernetError(ConfigError):
    """The space or a stored supernet does not fit; the message names the field or the file."""


def check_space(space: MobileVMoESpace, image_size: int) -> tuple[int, ...]:
    """The patch sizes the supernet builds embeddings for; one SupernetError naming the field the supernet
    cannot hold."""
    if "per_token" in space.routings:
        raise SupernetError("space.routings", "the supernet holds per-image routing only (a per-token router "
                                              f"per block is not entangled); got {list(space.routings)}")
    patches = tuple(p for p in space.patch_sizes if image_size % p == 0)
    if not patches:
        raise SupernetError("space.patch_sizes", f"none of {list(space.patch_sizes)} divides the image size "
                                                 f"{image_size}")
    return patches


class SuperBlock(nn.Module):
    """A block at the largest width: its dense MLP and, where the space searches MoE, its expert bank."""

    def __init__(self, width: int, hidden: int, experts: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, 1)  # holds qkv and proj; heads are a subnet's reshape
        self.norm2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, hidden)
        self.experts = Experts(experts, width, hidden) if experts else None

    def subnet_state(self, arch: ArchConfig, moe: bool, prefix: str) -> dict[str, torch.Tensor]:
        w, h, width = arch.width, arch.mlp_hidden, self.norm1.normalized_shape[0]
        qkv = self.attn.qkv
        state = {
            "norm1.weight": self.norm1.weight[:w], "norm1.bias": self.norm1.bias[:w],
            # qkv's rows are [q | k | v], each `width` long: the leading w of each.
            "attn.qkv.weight": qkv.weight.view(3, width, width)[:, :w, :w].reshape(3 * w, w),
            "attn.qkv.bias": qkv.bias.view(3, width)[:, :w].reshape(3 * w),
            "attn.proj.weight": self.attn.proj.weight[:w, :w], "attn.proj.bias": self.attn.proj.bias[:w],
            "norm2.weight": self.norm2.weight[:w], "norm2.bias": self.norm2.bias[:w],
        }
        if moe:
            e, bank = arch.moe.num_experts, self.experts
            state.update({"mlp.fc1_weight": bank.fc1_weight[:e, :w, :h], "mlp.fc1_bias": bank.fc1_bias[:e, :h],
                          "mlp.fc2_weight": bank.fc2_weight[:e, :h, :w], "mlp.fc2_bias": bank.fc2_bias[:e, :w]})
        else:
            state.update({"mlp.fc1.weight": self.mlp.fc1.weight[:h, :w], "mlp.fc1.bias": self.mlp.fc1.bias[:h],
                          "mlp.fc2.weight": self.mlp.fc2.weight[:w, :h], "mlp.fc2.bias": self.mlp.fc2.bias[:w]})
        return {prefix + name: value for name, value in state.items()}


class Trunk(nn.Module):
    """The weights of every subnet of one patch size, at the largest width, depth, MLP and expert count."""

    def __init__(self, space: MobileVMoESpace, patch_size: int, expert_counts: tuple[int, ...], *, image_size: int,
                 in_channels: int, num_classes: int):
        super().__init__()
        width = max(space.widths)
        hidden = max(int(w * r) for w in space.widths for r in space.mlp_ratios)
        self.patch_embed = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, (image_size // patch_size) ** 2 + 1, width) * 0.02)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.ModuleList(SuperBlock(width, hidden, max(expert_counts, default=0))
                                    for _ in range(max(space.depths)))
        self.routers = nn.ModuleDict({str(e): nn.Linear(width, e, bias=False) for e in expert_counts})
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def subnet_state(self, arch: ArchConfig) -> dict[str, torch.Tensor]:
        w = arch.width
        state = {"patch_embed.weight": self.patch_embed.weight[:w], "patch_embed.bias": self.patch_embed.bias[:w],
                 "cls_token": self.cls_token[..., :w], "pos_embed": self.pos_embed[..., :w],
                 "norm.weight": self.norm.weight[:w], "norm.bias": self.norm.bias[:w],
                 "head.weight": self.head.weight[:, :w], "head.bias": self.head.bias}
        for index in range(arch.depth):
            state.update(self.blocks[index].subnet_state(arch, index in arch.moe_layers, f"blocks.{index}."))
        if arch.is_moe:
            state["router.linear.weight"] = self.routers[str(arch.moe.num_experts)].weight[:, :w]
        return state


class Supernet(nn.Module):
    def __init__(self, space: MobileVMoESpace, *, image_size: int, in_channels: int, num_classes: int):
        super().__init__()
        self.space, self.image_size = space, image_size
        self.in_channels, self.num_classes = in_channels, num_classes
        self.patch_sizes = check_space(space, image_size)
        self.expert_counts = tuple(sorted(e for e in set(space.num_experts) if e > 0))
        dims = {"image_size": image_size, "in_channels": in_channels, "num_classes": num_classes}
        self.trunks = nn.ModuleDict({str(p): Trunk(space, p, self.expert_counts, **dims) for p in self.patch_sizes})
        self.apply(_init_linear)
        self._templates: OrderedDict[str, VisionMoE] = OrderedDict()

    def identity(self) -> dict[str, Any]:
        """What the supernet's weights mean: its space, the data's shape and its layout (checkpoints are keyed
        by it: a supernet of the blocks shared across patch sizes is another folder)."""
        return {"space": self.space.to_dict(), "image_size": self.image_size, "in_channels": self.in_channels,
                "num_classes": self.num_classes, "layout": "a trunk per patch size"}

    def check_arch(self, arch: ArchConfig) -> None:
        """Refuse an architecture that is not a subnet, naming its field."""
        data = (("image_size", self.image_size), ("in_channels", self.in_channels), ("num_classes", self.num_classes))
        for name, value in data:
            if getattr(arch, name) != value:
                raise SupernetError(name, f"{arch.name} has {getattr(arch, name)}, the supernet {value}")
        trunk = self.trunks[str(self.patch_sizes[0])]  # every trunk has the same sizes
        held = (("patch_size", arch.patch_size, self.patch_sizes), ("depth", arch.depth, range(len(trunk.blocks) + 1)),
                ("width", arch.width, range(trunk.norm.normalized_shape[0] + 1)),
                ("mlp_ratio", arch.mlp_hidden, range(trunk.blocks[0].mlp.fc1.out_features + 1)),
                ("moe.num_experts", arch.moe.num_experts if arch.moe else 0, (0, *self.expert_counts)),
                ("moe.routing", arch.moe.routing if arch.moe else "per_image", ("per_image",)))
        for name, value, choices in held:
            if value not in choices:
                raise SupernetError(name, f"{arch.name}: {shown(value)} is not held by the supernet")

    def subnet_state(self, arch: ArchConfig) -> dict[str, torch.Tensor]:
        """`build_model(arch)`'s state dict as slices of its trunk's weights (views where a slice is one, made
        contiguous: the subnet and its extracted copy then run the same kernels on the same layout)."""
        self.check_arch(arch)
        state = self.trunks[str(arch.patch_size)].subnet_state(arch)
        return {name: value.contiguous() for name, value in state.items()}

    def template(self, arch: ArchConfig) -> VisionMoE:
        """A weightless `VisionMoE` of `arch` (on the meta device) whose code the subnet runs."""
        key = arch.config_hash()
        if key not in self._templates:
            with torch.device("meta"):
                self._templates[key] = build_model(arch)
            while len(self._templates) > TEMPLATES:
                self._templates.popitem(last=False)
        self._templates.move_to_end(key)
        return self._templates[key].train(self.training)

    def forward(self, images: torch.Tensor, arch: ArchConfig, *, with_aux: bool = False
                ) -> torch.Tensor | ModelOutput:
        """The subnet `arch` on `images`: what `extract(arch)(images)` returns, differentiable in the supernet."""
        return functional_call(self.template(arch), self.subnet_state(arch), (images,), {"with_aux": with_aux})

    @torch.no_grad()
    def extract(self, arch: ArchConfig) -> VisionMoE:
        """A standalone `build_model(arch)` holding copies of the subnet's inherited weights (on the CPU)."""
        model = build_model(arch)
        model.load_state_dict({k: v.detach().cpu().clone() for k, v in self.subnet_state(arch).items()})
        return model.train(self.training)


class _Pick:
    """A Suggester choosing with a function of the choices (max, min, a random draw)."""

    def __init__(self, choose):
        self.choose = choose

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        return self.choose(name, tuple(choices))


def of_patch_size(space: MobileVMoESpace, patch_size: int) -> MobileVMoESpace:
    """The part of `space` that one trunk holds."""
    return dataclasses.replace(space, patch_sizes=(patch_size,))


def extreme_arch(space: MobileVMoESpace, largest: bool, *, image_size: int, in_channels: int, num_classes: int
                 ) -> ArchConfig:
    """The space's largest subnet (deepest, widest, most tokens, most experts, top-k and MoE blocks) or its
    smallest (shallowest, narrowest, fewest tokens, fewest experts: dense where the space has dense)."""
    from search_spaces.mobile_vmoe import placement_layers

    fits = [p for p in space.patch_sizes if image_size % p == 0] or list(space.patch_sizes)
    pick = max if largest else min

    def choose(name: str, choices: tuple) -> Any:
        if name == "patch_size":
            return (min if largest else max)(fits)
        if name == "moe_placement":
            return pick(choices, key=lambda p: len(placement_layers(p, pick(space.depths))))
        if name == "top_k":
            return pick(k for k in choices if k <= pick(space.num_experts))
        if name == "routing":
            return "per_image"
        return pick(choices)

    try:
        return space.sample(_Pick(choose), image_size=image_size, in_channels=in_channels, num_classes=num_classes)
    except InvalidArchitecture as error:
        raise SupernetError("space", f"its {'largest' if largest else 'smallest'} subnet does not build: "
                                     f"{error}") from None


def random_arch(space: MobileVMoESpace, generator: torch.Generator, *, image_size: int, in_channels: int,
                num_classes: int, tries: int = 100) -> ArchConfig:
    """A uniformly drawn subnet (per choice), redrawn while the combination does not build."""

    def choose(name: str, choices: tuple) -> Any:
        return choices[int(torch.randint(len(choices), (1,), generator=generator))]

    for _ in range(tries):
        try:
            return space.sample(_Pick(choose), image_size=image_size, in_channels=in_channels,
                                num_classes=num_classes)
        except InvalidArchitecture:
            continue
    raise SupernetError("space", f"{tries} random draws built no architecture")


__all__ = ["SuperBlock", "Supernet", "SupernetError", "Trunk", "check_space", "extreme_arch", "of_patch_size",
           "random_arch"]
