"""The Mobile V-MoE model family: a pre-norm ViT whose chosen blocks swap their MLP for experts.

One class, `VisionMoE`, covers all three kinds an `ArchConfig` describes:
- dense: a standard ViT (conv patch embedding, class token, learned positions, pre-norm blocks);
- per_image (Mobile V-MoE): one router reads the class token entering the first MoE block and picks k
  experts for the whole image; every MoE block of that image uses those experts;
- per_token (V-MoE): a router in each MoE block picks k experts for every token.
Only the MLP is per-expert; attention, norms and embeddings are shared.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from nas.config import ConfigError, is_number, shown
from search_spaces.config import ArchConfig


@dataclass
class Routing:
    """What the MoE blocks of one forward pass share: the per-image choice and the losses they add."""

    experts: torch.Tensor | None = None  # (B, k) expert indices, per_image only
    gates: torch.Tensor | None = None  # (B, k) weights summing to 1, per_image only
    router_logits: torch.Tensor | None = None  # (B, E), per_image only: trained on super-classes
    aux_losses: list[torch.Tensor] = field(default_factory=list)  # load balancing: per_token, end-to-end per_image


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, num_classes)
    router_logits: torch.Tensor | None  # (B, E) for per_image routing, else None
    aux_loss: torch.Tensor | None  # summed load-balancing losses (per_token; per_image with loss weight 0)


class Attention(nn.Module):
    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Shapes from the module, not from x: a traced ONNX export then computes no shape at run time but the batch.
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        x = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim ** -0.5)  # (B, heads, N, head_dim)
        return self.proj(x.transpose(1, 2).flatten(2))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Experts(nn.Module):
    """E MLPs of one shape, their weights stacked so that selected experts can be gathered."""

    def __init__(self, num_experts: int, width: int, hidden: int):
        super().__init__()
        # Stored input-major, (E, in, out), so a gathered expert multiplies without a transpose.
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, width, hidden))
        self.fc1_bias = nn.Parameter(torch.zeros(num_experts, hidden))
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, hidden, width))
        self.fc2_bias = nn.Parameter(torch.zeros(num_experts, width))
        nn.init.trunc_normal_(self.fc1_weight, std=0.02)
        nn.init.trunc_normal_(self.fc2_weight, std=0.02)

    def expert_mlp(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """One expert on a (T, C) batch of tokens."""
        hidden = F.gelu(x @ self.fc1_weight[expert] + self.fc1_bias[expert])
        return hidden @ self.fc2_weight[expert] + self.fc2_bias[expert]


class PerImageExperts(Experts):
    """Runs, for each image, only the k experts its router chose: their weights are gathered per image
    and applied with batched matmuls, so the cost is k MLPs whatever E is. In training, images are
    grouped by expert instead: the backward of a per-image weight gather scatters B weight-sized
    gradients, which made a step ~1.3x a dense one; grouped, the gradients land on each expert directly."""

    def __init__(self, num_experts: int, top_k: int, width: int, hidden: int):
        super().__init__(num_experts, width, hidden)
        self.top_k = top_k  # a number, not the routing's shape: a trace keeps it a constant

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        if self.training:
            return self._forward_grouped(x, routing)
        if self.top_k == 1:
            # k=1: the one renormalised gate is exactly 1, so there is nothing to mix. Skipping the mixing
            # (and the k axis) keeps the exported graph to one Gather per expert tensor and the matmuls;
            # the gate is applied only where a gradient is wanted, as the router's one path from the task.
            out = self._gathered_mlp(x, routing.experts.squeeze(1))  # (B, N, C)
            return out * routing.gates[:, :, None] if routing.gates.requires_grad else out
        out = self._gathered_mlp(x.unsqueeze(1), routing.experts)  # (B, k, N, C)
        return (out * routing.gates[:, :, None, None]).sum(1)  # (B, N, C)

    def _gathered_mlp(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Each image's experts on its tokens: x (B, N, C) with experts (B,), or (B, 1, N, C) with (B, k)."""

        def pick(weight: torch.Tensor) -> torch.Tensor:  # (E, ...) -> (*experts.shape, ...)
            # index_select exports to one ONNX Gather; weight[experts] to index reshaping and a GatherND.
            picked = weight.index_select(0, experts.flatten())
            return picked if experts.dim() == 1 else picked.unflatten(0, (-1, self.top_k))

        hidden = F.gelu(x @ pick(self.fc1_weight) + pick(self.fc1_bias.unsqueeze(1)))  # (B, [k,] N, H)
        return hidden @ pick(self.fc2_weight) + pick(self.fc2_bias.unsqueeze(1))  # (B, [k,] N, C)

    def _forward_grouped(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        out = torch.zeros_like(x)
        for expert in range(self.fc1_weight.shape[0]):
            image, slot = (routing.experts == expert).nonzero(as_tuple=True)  # (n,) each
            expert_out = self.expert_mlp(x[image], expert)  # (n, N, C)
            out = out.index_add(0, image, expert_out * routing.gates[image, slot, None, None])
        return out


class PerTokenExperts(Experts):
    """V-MoE's layer: a router per block sends each token to its top-k experts. Tokens are grouped by
    expert, so each expert runs on its own tokens only. Gates are the raw softmax probabilities (not
    renormalised, as in V-MoE) so the router learns from the task loss even at k=1."""

    def __init__(self, num_experts: int, top_k: int, width: int, hidden: int):
        super().__init__(num_experts, width, hidden)
        self.top_k = top_k
        self.router = nn.Linear(width, num_experts, bias=False)

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        tokens, width = x.flatten(0, 1), self.fc2_bias.shape[1]  # a parameter's shape: a constant in a trace
        probs = self.router(tokens).softmax(-1)  # (T, E)
        gates, experts = probs.topk(self.top_k, dim=-1)  # (T, k)
        out = torch.zeros_like(tokens)
        routed = torch.zeros_like(probs).scatter(1, experts, gates)  # (T, E): each expert's gate, 0 if not chosen
        chosen = torch.zeros_like(probs).scatter(1, experts, 1.0) > 0  # (T, E)
        for expert in range(self.fc1_weight.shape[0]):
            token_index = chosen[:, expert].nonzero().squeeze(-1)
            gate = routed[:, expert].index_select(0, token_index).unsqueeze(-1)
            expert_out = self.expert_mlp(tokens.index_select(0, token_index), expert) * gate
            out = out.scatter_add(0, token_index.unsqueeze(-1).expand(-1, width), expert_out)
        routing.aux_losses.append(load_balancing_loss(probs, experts))
        return out.view_as(x)


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer auxiliary loss, E * sum_e f_e * P_e: f_e is the share of token slots sent to
    expert e, P_e its mean router probability. Equals 1 when the load is uniform."""
    num_experts = probs.shape[-1]
    dispatch = F.one_hot(experts, num_experts).float().mean(dim=(0, 1))  # (E,)
    return num_experts * (dispatch * probs.mean(0)).sum()


class Block(nn.Module):
    def __init__(self, cfg: ArchConfig, mlp: nn.Module, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width)
        self.attn = Attention(cfg.width, cfg.num_heads)
        self.norm2 = nn.LayerNorm(cfg.width)
        self.mlp = mlp
        self.drop_path = nn.Identity()
        if drop_path:  # stochastic depth: in training, each image skips a residual branch with this probability
            from torchvision.ops import StochasticDepth  # only then: the profiler agent imports this module

            self.drop_path = StochasticDepth(drop_path, "row")

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x), routing))


class PerImageRouter(nn.Module):
    """Mobile V-MoE's single router: class token -> E logits -> top-k experts, gates renormalised. With
    `balance` (no super-class loss: routing learned end-to-end) it adds the Switch load-balancing loss over
    the batch's images, as a per-token router does: trained on the task alone, a top-k router otherwise
    favours the experts it already picks (on `synthetic`, after 1000 steps, 1 of 4 experts got no image)."""

    def __init__(self, width: int, num_experts: int, top_k: int, *, balance: bool = False):
        super().__init__()
        self.top_k = top_k
        self.balance = balance
        self.linear = nn.Linear(width, num_experts, bias=False)

    def forward(self, class_token: torch.Tensor, routing: Routing) -> None:
        logits = self.linear(class_token)  # (B, E)
        probs = logits.softmax(-1)
        top, experts = probs.topk(self.top_k, dim=-1)  # (B, k)
        if self.balance and self.training:  # a training loss: the exported and profiled graphs stay as they were
            routing.aux_losses.append(load_balancing_loss(probs, experts))
        routing.router_logits = logits
        routing.experts = experts
        # Straight-through: renormalised in value (at k=1 the one gate is exactly 1), but the sum is detached, so
        # the gradient is that of the raw softmax probabilities (as in V-MoE and Switch), over their sum.
        # Renormalised through the sum, the k=1 gate would be the constant 1 and the task would give the router
        # no gradient. Scaling by the raw probabilities instead would change the model itself: each expert's
        # output shrunk to ~1/E at initialisation, and a k=1 export that must apply its gate.
        routing.gates = top / top.sum(-1, keepdim=True).detach()


def _make_mlp(cfg: ArchConfig, index: int) -> nn.Module:
    if index not in cfg.moe_layers:
        return Mlp(cfg.width, cfg.mlp_hidden)
    if cfg.moe.routing == "per_image":
        return PerImageExperts(cfg.moe.num_experts, cfg.moe.top_k, cfg.width, cfg.mlp_hidden)
    return PerTokenExperts(cfg.moe.num_experts, cfg.moe.top_k, cfg.width, cfg.mlp_hidden)


GLOBAL_POOLS = ("token", "avg", "max", "")  # timm's names: class token, mean or max of the patch tokens, none


class VisionMoE(nn.Module):
    """`drop_path_rate` (stochastic depth, rising linearly over the blocks to this rate, as in timm) and
    `global_pool` are training choices, not architecture: they leave the graph's cost unchanged and are not
    part of `cfg`. `cfg.num_classes == 0`: no head, `forward` gives the pooled features."""

    def __init__(self, cfg: ArchConfig, *, drop_path_rate: float = 0.0, global_pool: str = "token"):
        super().__init__()
        if global_pool not in GLOBAL_POOLS:
            raise ConfigError("global_pool", f"must be one of {', '.join(map(repr, GLOBAL_POOLS))}, got "
                                             f"{shown(global_pool)}")
        if not is_number(drop_path_rate) or not 0 <= drop_path_rate < 1:
            raise ConfigError("drop_path_rate", f"must be a number in [0, 1), got {shown(drop_path_rate)}")
        self.cfg, self.global_pool = cfg, global_pool
        self.patch_embed = nn.Conv2d(cfg.in_channels, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_tokens, cfg.width) * 0.02)
        rates = [drop_path_rate * i / max(1, cfg.depth - 1) for i in range(cfg.depth)]  # no tensor: builds on meta
        self.blocks = nn.ModuleList(Block(cfg, _make_mlp(cfg, i), rates[i]) for i in range(cfg.depth))
        per_image = cfg.is_moe and cfg.moe.routing == "per_image"
        self.router = (PerImageRouter(cfg.width, cfg.moe.num_experts, cfg.moe.top_k,
                                      balance=cfg.moe.router_loss_weight == 0) if per_image else None)
        self.router_block = cfg.moe_layers[0] if per_image else None  # the router runs before this block
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.apply(_init_linear)

    def forward_features(self, images: torch.Tensor, routing: Routing) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, num_patches, C)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # (B, N, C)
        for index, block in enumerate(self.blocks):
            if index == self.router_block:
                self.router(x[:, 0], routing)
            x = block(x, routing)
        return self.norm(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) from the pooled tokens (B, N, C); (B, N, num_classes) for every token without pooling."""
        if self.global_pool == "token":
            features = features[:, 0]  # the class token
        elif self.global_pool == "avg":
            features = features[:, 1:].mean(1)
        elif self.global_pool == "max":
            features = features[:, 1:].amax(1)
        return self.head(features)

    def forward(self, images: torch.Tensor, *, with_aux: bool = False) -> torch.Tensor | ModelOutput:
        """Logits; with `with_aux=True` (training), also the router logits and the auxiliary loss."""
        routing = Routing()
        logits = self.forward_head(self.forward_features(images, routing))
        if not with_aux:
            return logits
        aux_loss = torch.stack(routing.aux_losses).sum() if routing.aux_losses else None
        return ModelOutput(logits, routing.router_logits, aux_loss)


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_model(cfg: ArchConfig, **options) -> VisionMoE:
    """The model of `cfg`; `options`: VisionMoE's training choices (drop_path_rate, global_pool)."""
    return VisionMoE(cfg, **options)


def count_params(model: VisionMoE) -> tuple[int, int]:
    """(total, active per image): active counts the shared parts, the routers and k of E experts in
    each MoE block (for per_token, k experts per token)."""
    total = sum(p.numel() for p in model.parameters())
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    expert_params = sum(p.numel() for m in experts for name, p in m.named_parameters() if "router" not in name)
    moe = model.cfg.moe
    inactive = expert_params * (moe.num_experts - moe.top_k) // moe.num_experts if moe else 0
    return total, total - inactive


def describe(cfg: ArchConfig) -> dict:
    """What a person asks of an architecture first: its blocks, which are MoE, and its sizes."""
    total, active = count_params(build_model(cfg))
    moe = cfg.moe
    blocks = [
        {"index": i, "mlp": (f"moe-{moe.routing}" if i in cfg.moe_layers else "dense")}
        for i in range(cfg.depth)
    ]
    return {
        "name": cfg.name,
        "config_hash": cfg.config_hash(),
        "arch": cfg.to_dict(),
        "blocks": blocks,
        "params_total": total,
        "params_active": active,
    }
