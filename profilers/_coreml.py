"""Core ML export (coremltools, through torch.export, to ML programs) in a form without gathers.

Core ML runs `gather` on the CPU only, so a model that gathers expert weights may fall off the Neural
Engine. The forms exported instead:
- dense: the model as is, one `model.mlpackage`.
- per_image:trunk+tails: `trunk.mlpackage` (patch embedding, blocks before the first MoE block, router;
  outputs features, experts, gates) and one tail per set of k experts, `tail-<e1>-...mlpackage`, whose MoE
  blocks are plain MLPs of those experts (taking the gates when k > 1). An app runs the trunk, then the
  tail of the experts it picked (sorted ascending, gates in the same order). All tails cost the same.
- per_token:all_experts_masked: every expert runs on every token and the gate matrix, zero outside each
  token's top k, mixes them: gather- and scatter-free but E/k times the expert FLOPs of the sparse model.
"""

from __future__ import annotations

import copy
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from profilers._errors import PayloadError, ProfileError
from profilers._export import as_model, build_once, cache_dir, cache_key, eval_mode, example_images
from search_spaces import ArchConfig, VisionMoE
from search_spaces.model import Block, Experts, Mlp, PerTokenExperts, Routing

PRECISIONS = ("fp16", "fp32")


@dataclass
class CoreMLExport:
    form: str  # dense | per_image:trunk+tails | per_token:all_experts_masked
    programs: dict[str, Path] = field(default_factory=dict)  # "model", or "trunk" and "tail-<experts>"
    pipeline: tuple[str, ...] = ("model",)  # the programs one prediction runs, in order

    @property
    def measured_form(self) -> str:
        """The form and the programs a measurement of this export runs."""
        return f"{self.form} (measured: {' then '.join(self.pipeline)})"


def coreml_form(cfg: ArchConfig) -> str:
    return "dense" if not cfg.is_moe else f"{cfg.moe.routing}:" + (
        "trunk+tails" if cfg.moe.routing == "per_image" else "all_experts_masked"
    )


def coreml_cache_dir(cfg: ArchConfig, precision: str, batch: int) -> Path:
    return cache_dir() / "coreml" / cache_key(cfg, precision, f"b{batch}")


def check_package(package: Path) -> None:
    """Every path an `.mlpackage` names (its Manifest.json items) resolves inside it to a file or folder
    it holds: coremltools opens a manifest path as given, so `/etc/os-release` or `/dev/zero` would be read."""
    root = package.resolve()
    try:
        items = json.loads((package / "Manifest.json").read_text())["itemInfoEntries"]
        paths = [str(item["path"]) for item in items.values()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise PayloadError(f"{package.name}/Manifest.json is missing or malformed ({type(error).__name__})") from None
    for path in paths:
        target = (package / "Data" / path).resolve()  # follows links and `..`: what would really be opened
        if not (target.is_relative_to(root) and (target.is_file() or target.is_dir())):
            raise PayloadError(f"{package.name}/Manifest.json names {path[:100]!r}, which is not in the package")


class Trunk(nn.Module):
    """Everything before the first MoE block, and the per-image router."""

    def __init__(self, model: VisionMoE):
        super().__init__()
        self.patch_embed, self.cls_token, self.pos_embed = model.patch_embed, model.cls_token, model.pos_embed
        self.blocks = nn.ModuleList(model.blocks[: model.router_block])
        self.router = model.router

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        routing = Routing()
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, num_patches, C)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # (B, N, C)
        for block in self.blocks:
            x = block(x, routing)
        self.router(x[:, 0], routing)
        return x, routing.experts, routing.gates


class GatedMlps(nn.Module):
    """k experts of one image as plain MLPs, mixed by that image's gates."""

    def __init__(self, mlps: list[Mlp]):
        super().__init__()
        self.mlps = nn.ModuleList(mlps)

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        return sum(routing.gates[:, j, None, None] * mlp(x, routing) for j, mlp in enumerate(self.mlps))


def expert_as_mlp(experts: Experts, expert: int) -> Mlp:
    width, hidden = experts.fc1_weight.shape[1:]
    mlp = Mlp(width, hidden)
    with torch.no_grad():  # experts store (in, out); nn.Linear stores (out, in)
        mlp.fc1.weight.copy_(experts.fc1_weight[expert].T)
        mlp.fc1.bias.copy_(experts.fc1_bias[expert])
        mlp.fc2.weight.copy_(experts.fc2_weight[expert].T)
        mlp.fc2.bias.copy_(experts.fc2_bias[expert])
    return mlp


class Tail(nn.Module):
    """The blocks from the first MoE block on, with the given experts' MLPs in place of the MoE layers."""

    def __init__(self, model: VisionMoE, experts: tuple[int, ...]):
        super().__init__()
        self.blocks = nn.ModuleList(self._block(model, b, experts) for b in model.blocks[model.router_block:])
        self.norm, self.head = model.norm, model.head

    @staticmethod
    def _block(model: VisionMoE, block: Block, experts: tuple[int, ...]) -> Block:
        if not isinstance(block.mlp, Experts):
            return block
        mlps = [expert_as_mlp(block.mlp, e) for e in experts]
        tail_block = Block(model.cfg, mlps[0] if len(mlps) == 1 else GatedMlps(mlps))
        tail_block.norm1, tail_block.attn, tail_block.norm2 = block.norm1, block.attn, block.norm2
        return tail_block

    def forward(self, x: torch.Tensor, gates: torch.Tensor | None = None) -> torch.Tensor:
        routing = Routing(gates=gates)  # k = 1 needs no gates: renormalised, the one gate is 1
        for block in self.blocks:
            x = block(x, routing)
        return self.head(self.norm(x)[:, 0])


class MaskedPerTokenExperts(nn.Module):
    """A per-token MoE layer computed densely: all E experts on all tokens, mixed by the top-k gates."""

    def __init__(self, experts: PerTokenExperts):
        super().__init__()
        self.experts = experts

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        e = self.experts
        probs = e.router(x).softmax(-1)  # (B, N, E)
        kth = probs.topk(e.top_k, dim=-1).values[..., -1:]  # (B, N, 1)
        gates = probs * (probs >= kth)  # (B, N, E): the top-k probabilities (barring exact ties), zero elsewhere
        hidden = F.gelu(torch.einsum("bnc,ech->benh", x, e.fc1_weight) + e.fc1_bias[None, :, None])  # (B, E, N, H)
        out = hidden @ e.fc2_weight.unsqueeze(0) + e.fc2_bias[None, :, None]  # (B, E, N, C)
        return torch.einsum("benc,bne->bnc", out, gates)


def masked_per_token(model: VisionMoE) -> VisionMoE:
    """A copy of `model` whose per-token MoE layers are computed in the masked, dense form."""
    model = copy.deepcopy(model)
    for block in model.blocks:
        if isinstance(block.mlp, PerTokenExperts):
            block.mlp = MaskedPerTokenExperts(block.mlp)
    return model


def export_coreml(
    model_or_cfg: ArchConfig | VisionMoE, out_dir: str | Path, *, batch: int = 1, precision: str = "fp16",
    all_tails: bool = True, metadata: dict[str, str] | None = None, description: str | None = None,
) -> CoreMLExport:
    """Convert to ML programs (`.mlpackage`) in `out_dir`, in the gather-free form of `coreml_form`.
    Programs already in `out_dir` are kept. `all_tails=False` writes only the first tail: enough to
    measure, since every tail has the same shape and cost. `metadata` and `description` go into every
    program (its user-defined metadata and short description)."""
    if precision not in PRECISIONS:
        raise ProfileError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    model = as_model(model_or_cfg)
    cfg, out_dir = model.cfg, Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = example_images(cfg, batch)
    form = coreml_form(cfg)
    about = {"metadata": metadata or {}, "description": description}
    with eval_mode(model), torch.no_grad():
        if form != "per_image:trunk+tails":
            module = masked_per_token(model) if cfg.is_moe else model
            program = _convert(module, {"images": images}, ("logits",), out_dir / "model.mlpackage", precision,
                               **about)
            return CoreMLExport(form, {"model": program})
        trunk = Trunk(model)
        features, _, gates = trunk(images)
        result = CoreMLExport(form, {"trunk": _convert(
            trunk, {"images": images}, ("features", "experts", "gates"), out_dir / "trunk.mlpackage", precision,
            **about)})
        tail_inputs = {"features": features} if cfg.moe.top_k == 1 else {"features": features, "gates": gates}
        subsets = list(itertools.combinations(range(cfg.moe.num_experts), cfg.moe.top_k))
        for subset in subsets if all_tails else subsets[:1]:
            result.programs[tail_name(subset)] = _convert(
                Tail(model, subset), tail_inputs, ("logits",), out_dir / f"{tail_name(subset)}.mlpackage", precision,
                **about)
        result.pipeline = ("trunk", tail_name(subsets[0]))
        return result


def tail_name(experts: tuple[int, ...]) -> str:
    return "tail-" + "-".join(map(str, experts))


def _convert(module: nn.Module, inputs: dict[str, torch.Tensor], outputs: tuple[str, ...], path: Path,
             precision: str, metadata: dict[str, str], description: str | None) -> Path:
    def build(tmp: Path) -> None:
        import coremltools as ct  # optional, and slow to import: only when a program is missing

        program = torch.export.export(module, tuple(inputs.values())).run_decompositions({})
        mlmodel = ct.convert(
            program, convert_to="mlprogram",
            inputs=[ct.TensorType(name=name) for name in inputs],
            outputs=[ct.TensorType(name=name) for name in outputs],
            compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
            skip_model_load=True,  # loading needs macOS; the backend loads it there with its compute units
        )
        mlmodel.user_defined_metadata.update(metadata)
        if description:
            mlmodel.short_description = description
        mlmodel.save(str(tmp))

    return build_once(path, build, verify=check_package)
