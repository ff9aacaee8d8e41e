"""Tiny architectures for tests: they build and run in milliseconds."""

from search_spaces import ArchConfig, MoEConfig


def tiny(depth=3, width=16, heads=2, moe=None, **kw) -> ArchConfig:
    """A model small enough to build and run in milliseconds."""
    base = dict(image_size=8, in_channels=1, patch_size=4, num_classes=5, depth=depth, width=width,
                num_heads=heads, mlp_ratio=2.0)
    base.update(kw)
    return ArchConfig(**base, moe=moe)


def tiny_moe(experts=4, top_k=1, layers=(1, 2), routing="per_image", **kw) -> ArchConfig:
    return tiny(moe=MoEConfig(num_experts=experts, top_k=top_k, layers=layers, routing=routing), **kw)
