"""FLOPs per image: fvcore's count of the traced model, and the analytic formula it must equal.

Convention (fvcore's): one fused multiply-add is one FLOP. Contractions (linear, matmul, conv,
attention) count their multiply-adds, an affine layer norm counts 5 per element, and elementwise or
data-movement ops (bias adds, residuals, GELU, softmax, gates, top-k, gathers) count zero. Every op the
model traces to is in one of those tables, so an op that is in neither shows up in `uncounted_ops`
instead of vanishing.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

from torch import nn

with warnings.catch_warnings():  # fvcore scripts its focal loss on import, which torch >= 2.14 calls deprecated
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

from profilers._export import as_model, eval_mode, example_images
from search_spaces import ArchConfig, VisionMoE
from search_spaces.model import Attention, Experts, Mlp, PerImageRouter


@dataclass
class FlopReport:
    total: int  # active FLOPs per image, batch 1
    by_module: dict[str, int] = field(default_factory=dict)  # patch_embed, attention, mlp, experts, router, ...
    uncounted_ops: list[str] = field(default_factory=list)  # traced ops with no handle: the total misses them


def _matmul_flops(inputs, outputs) -> int:
    """Broadcast-aware: fvcore's default counts prod(a.shape) * b.shape[-1], which misses the broadcast
    dimension of (B, 1, N, C) @ (B, k, C, H), i.e. k-1 of the k experts a per-image MoE runs."""
    contracted = get_shape(inputs[0])[-1]
    return math.prod(get_shape(outputs[0])) * contracted


def _sdpa_flops(inputs, outputs) -> int:
    """Q K^T and (softmax) V, as if written out: B*h*N*S*(d + d_v); the softmax and scale count zero."""
    *batch, n, d = get_shape(inputs[0])
    s, d_v = get_shape(inputs[2])[-2:]
    return math.prod(batch) * n * s * (d + d_v)


COUNTED_OPS = {  # over fvcore's defaults (linear, conv, layer_norm, mm, bmm, einsum, ...)
    "aten::matmul": _matmul_flops,
    "aten::scaled_dot_product_attention": _sdpa_flops,
}
ZERO_FLOP_OPS = (  # elementwise and routing ops: zero in fvcore's convention, listed so none is silent
    "aten::add", "aten::sub", "aten::mul", "aten::div", "aten::neg", "aten::gelu", "aten::softmax",
    "aten::topk", "aten::sum", "aten::mean", "aten::one_hot", "aten::index", "aten::index_select",
    "aten::gather", "aten::index_add", "aten::scatter_add", "aten::nonzero", "aten::nonzero_numpy",
    "aten::sort", "aten::argmax", "aten::where", "aten::unflatten", "aten::scatter", "aten::view_as",
)


def count_flops(model_or_cfg: ArchConfig | VisionMoE) -> FlopReport:
    """Active FLOPs per image with fvcore, at batch 1. Per-image MoE blocks run k gathered experts
    (a static shape, whatever the router picks); per-token blocks run each expert on its own tokens,
    and those counts add up to k per token for any routing, so the total never depends on the traced
    image."""
    model = as_model(model_or_cfg)
    with eval_mode(model):  # fvcore traces lazily: everything it reports is computed in here
        analysis = (
            FlopCountAnalysis(model, (example_images(model.cfg, 1),))
            .set_op_handle(**COUNTED_OPS, **dict.fromkeys(ZERO_FLOP_OPS))
            .tracer_warnings("none")
            .unsupported_ops_warnings(False)
            .uncalled_modules_warnings(False)
        )
        return FlopReport(
            total=int(analysis.total()),
            by_module=_by_category(model, analysis.by_module()),
            uncounted_ops=sorted(analysis.unsupported_ops()),
        )


def _category(name: str, module: nn.Module) -> str | None:
    if name == "patch_embed":
        return "patch_embed"
    if name == "head":
        return "head"
    if isinstance(module, PerImageRouter) or (name.endswith(".router") and isinstance(module, nn.Linear)):
        return "router"
    for kind, category in ((Attention, "attention"), (Mlp, "mlp"), (Experts, "experts"), (nn.LayerNorm, "norm")):
        if isinstance(module, kind):
            return category
    return None


def _by_category(model: nn.Module, totals: dict[str, int]) -> dict[str, int]:
    """Each module's own FLOPs (its total less its children's) go to its category, or its parent's."""
    categories: dict[str, str] = {}
    by_category: dict[str, int] = {}
    for name, module in model.named_modules():  # parents come before their children
        parent = name.rpartition(".")[0]
        categories[name] = _category(name, module) or categories.get(parent, "other")
        prefix = f"{name}." if name else ""
        own = totals.get(name, 0) - sum(totals.get(f"{prefix}{child}", 0) for child, _ in module.named_children())
        by_category[categories[name]] = by_category.get(categories[name], 0) + int(own)
    return by_category


def analytic_flops(cfg: ArchConfig) -> int:
    """Active FLOPs per image, written out from the architecture (fvcore's convention, see module doc).

    With N tokens (patches + class token), width C, MLP hidden H, E experts, top-k:
        patch embedding     P * C * in_channels * patch_size^2   (a conv; biases are not counted)
        each block          5NC (norm1) + 3NC^2 (qkv) + 2N^2C (QK^T, AV) + NC^2 (proj) + 5NC (norm2)
          dense MLP         2NCH
          MoE, per_image    k * 2NCH                  (k gathered experts for the whole image)
          MoE, per_token    NCE (router) + k * 2NCH   (k experts per token)
        per_image router    CE, once, on the class token entering the first MoE block
        final norm + head   5NC + C * num_classes     (the head reads the class token only)
    A cross-check on the fvcore count: tests assert they are equal.
    """
    N, C, H = cfg.num_tokens, cfg.width, cfg.mlp_hidden
    norm = 5 * N * C
    attention = 3 * N * C * C + 2 * N * N * C + N * C * C
    mlp = 2 * N * C * H
    flops = cfg.num_patches * C * cfg.in_channels * cfg.patch_size**2 + norm + C * cfg.num_classes
    for index in range(cfg.depth):
        flops += 2 * norm + attention
        if index not in cfg.moe_layers:
            flops += mlp
        elif cfg.moe.routing == "per_image":
            flops += cfg.moe.top_k * mlp
        else:
            flops += N * C * cfg.moe.num_experts + cfg.moe.top_k * mlp
    if cfg.is_moe and cfg.moe.routing == "per_image":
        flops += C * cfg.moe.num_experts
    return flops
