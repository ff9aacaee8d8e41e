"""ExecuTorch export (`.pte` programs lowered to XNNPACK) and the `executorch` latency backend.

A `.pte` is what a PyTorch app ships to Android or iOS: torch.export, then `to_edge_transform_and_lower`
with `XnnpackPartitioner`, which hands each run of ops XNNPACK takes to one delegate call and leaves the
rest on ExecuTorch's portable (reference) kernels. Every split costs a call and a copy, and the portable
kernels are slow, so the model is lowered in `XnnpackForm`: the same numbers as `VisionMoE` in eval mode,
in ops XNNPACK takes. What XNNPACK has no operator for stays portable, once per model where it can:
- routing: `topk` (XNNPACK has no top-k, argmax or sort), one per model, and the reshape of its int64
  indices for the gather (XNNPACK takes floats only);
- the gather of the chosen experts: `index_select` (XNNPACK has no gather), one per model, on a table of
  every MoE layer's expert weights side by side; the layers slice their share out inside the delegate;
- per_token MoE layers keep their own form (their token grouping is data-dependent).
The form writes LayerNorm as 4D means (XNNPACK's mean is a global average pool over the two inner
dimensions), attention as matmuls and a softmax (the SDPA decomposition guards fully masked rows with
`any`/`where`/`full_like`, none of which XNNPACK takes), the class token as a pad and an add (no
`expand`), and picks the class token with a slice and a reshape (no `select`).

The program's input shape is fixed (batch included): XNNPACK plans its memory for it.
"""

from __future__ import annotations

import math
import re
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from profilers._backends import AgentLimits, LocalBackend, Payload, Runnable, model_form
from profilers._errors import PayloadError, ProfileError
from profilers._export import as_model, build_once, cache_dir, cache_key, eval_mode, example_images, package_version
from search_spaces import ArchConfig, VisionMoE
from search_spaces.model import Attention, PerImageExperts, Routing

PTE_MAGIC = re.compile(rb"ET\d\d")  # the flatbuffer file identifier, bytes 4-8 of every .pte
FLOAT = 6  # ExecuTorch's ScalarType for float32
STRUCTURAL = {"getitem", "executorch_call_delegate"}  # graph plumbing, not kernels


class LoweringError(ProfileError):
    """A model that ExecuTorch cannot export, lower or run; the message names the op where one is at fault."""


# ---------------------------------------------------------------- the form XNNPACK takes


def layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """`norm(x)` over the last dimension, its means taken as XNNPACK's 4D mean over the inner two dimensions."""
    shape = x.shape

    def mean(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(1, -1, shape[-1], 1).mean(dim=(2, 3), keepdim=True).reshape(*shape[:-1], 1)

    centred = x - mean(x)
    return centred * torch.rsqrt(mean(centred * centred) + norm.eps) * norm.weight + norm.bias


def attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """`attn(x)` with the softmax attention written out (unmasked, so no guard for fully masked rows), as
    3D `bmm`s (a 4D matmul brings an `expand`) on slices of the qkv projection (an index would be a `select`)."""
    B, N, C = x.shape
    heads = attn.num_heads
    head_dim = C // heads
    qkv = attn.qkv(x)

    def split_heads(part: int) -> torch.Tensor:  # (B * heads, N, head_dim)
        return qkv[:, :, part * C:(part + 1) * C].reshape(B, N, heads, head_dim).transpose(1, 2).reshape(
            B * heads, N, head_dim)

    q, k, v = split_heads(0), split_heads(1), split_heads(2)
    weights = torch.bmm(q * head_dim**-0.5, k.transpose(1, 2)).softmax(-1)  # (B * heads, N, N)
    x = torch.bmm(weights, v).reshape(B, heads, N, head_dim)
    return attn.proj(x.transpose(1, 2).reshape(B, N, C))


def first_token(x: torch.Tensor) -> torch.Tensor:
    """`x[:, 0]` as a slice and a reshape (XNNPACK has no select)."""
    return x[:, :1].reshape(x.shape[0], x.shape[2])


class XnnpackForm(nn.Module):
    """`model` in eval mode, in the ops XNNPACK takes (see the module's docstring). Shares its weights."""

    def __init__(self, model: VisionMoE):
        super().__init__()
        self.model = model
        # The class token lands on the zero row that a pad puts before the patches: row 0 of `start`.
        start = model.pos_embed.detach().clone()
        start[:, :1] += model.cls_token.detach()
        self.register_buffer("start", start)
        self.moe_blocks = [i for i, b in enumerate(model.blocks) if isinstance(b.mlp, PerImageExperts)]
        if self.moe_blocks:
            # Every per-image MoE layer's expert tensors side by side, one row per expert: one gather for all.
            parts = [t.detach().flatten(1) for i in self.moe_blocks for t in self._expert_tensors(i)]
            self.register_buffer("expert_table", torch.cat(parts, dim=1))

    def _expert_tensors(self, block: int) -> tuple[torch.Tensor, ...]:
        mlp = self.model.blocks[block].mlp
        return mlp.fc1_weight, mlp.fc1_bias, mlp.fc2_weight, mlp.fc2_bias

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        model, x = self.model, self.embed(images)
        routing, experts = Routing(), {}
        for index, block in enumerate(model.blocks):
            if index == model.router_block:
                experts = self._route(first_token(x), routing)
            x = x + attention(block.attn, layer_norm(block.norm1, x))
            h = layer_norm(block.norm2, x)
            x = x + (self._moe(h, *experts[index]) if index in experts else block.mlp(h, routing))
        # LayerNorm is per token: normalising the class token alone is the model's norm-then-select.
        return model.head(layer_norm(model.norm, first_token(x)))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = self.model.patch_embed(images).flatten(2).transpose(1, 2)  # (B, num_patches, C)
        return F.pad(x, (0, 0, 1, 0)) + self.start  # (B, N, C): as cat([cls, x]) + pos_embed

    def router_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The per-image router's logits: the blocks before it only."""
        model, x, routing = self.model, self.embed(images), Routing()
        for block in model.blocks[: model.router_block]:
            x = block(x, routing)
        return model.router.linear(first_token(x))

    def _route(self, class_token: torch.Tensor, routing: Routing) -> dict[int, tuple]:
        """Top-k experts and renormalised gates per image, and each MoE layer's gathered expert weights."""
        router = self.model.router
        top, chosen = router.linear(class_token).softmax(-1).topk(router.top_k, dim=-1)  # (B, k)
        slots = [top[:, j:j + 1] for j in range(router.top_k)]  # (B, 1) each
        total = slots[0]
        for slot in slots[1:]:
            total = total + slot
        gates = [slot / total for slot in slots]  # k = 1: exactly 1, unused
        B, k = chosen.shape
        # index_select copies whole rows; the portable `index` kernel (expert_table[chosen]) computes every
        # element's source apart and was 3x slower on a 28 px MoE than the model without it.
        rows = self.expert_table.index_select(0, chosen.reshape(B * k)).reshape(B, k, -1)  # (B, k, weights)
        experts, offset = {}, 0
        for index in self.moe_blocks:
            tensors = []
            for t in self._expert_tensors(index):
                size = math.prod(t.shape[1:])
                shape = (B, *t.shape[1:]) if t.dim() == 3 else (B, 1, t.shape[1])  # biases: (B, 1, width)
                tensors.append([rows[:, j:j + 1, offset:offset + size].reshape(shape) for j in range(k)])
                offset += size
            experts[index] = (*tensors, gates)
        return experts

    @staticmethod
    def _moe(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gates) -> torch.Tensor:
        """The chosen experts on each image's tokens, as batched matmuls, mixed by the gates (k > 1)."""
        outs = [torch.bmm(F.gelu(torch.bmm(x, w1) + b1), w2) + b2
                for w1, b1, w2, b2 in zip(fc1_weight, fc1_bias, fc2_weight, fc2_bias)]
        if len(outs) == 1:
            return outs[0]
        mixed = outs[0] * gates[0][:, :, None]
        for out, gate in zip(outs[1:], gates[1:]):
            mixed = mixed + out * gate[:, :, None]
        return mixed


# ---------------------------------------------------------------- lowering


@dataclass
class Delegation:
    """How a lowered program splits between XNNPACK and ExecuTorch's portable kernels."""

    delegate_calls: int
    delegated_ops: int
    portable_ops: dict[str, int] = field(default_factory=dict)  # edge op name -> count
    lowering_s: float = 0.0

    def to_dict(self) -> dict:
        return {"delegate_calls": self.delegate_calls, "delegated_ops": self.delegated_ops,
                "portable_ops": dict(self.portable_ops), "lowering_s": self.lowering_s}

    def summary(self) -> str:
        portable = ", ".join(f"{op} x{n}" for op, n in sorted(self.portable_ops.items())) or "none"
        return (f"{self.delegate_calls} XNNPACK delegate call(s) holding {self.delegated_ops} ops; "
                f"left on portable kernels: {portable}")


@dataclass
class LoweredProgram:
    buffer: bytes
    delegation: Delegation


def delegation_of(graph_module: torch.fx.GraphModule) -> Delegation:
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(graph_module)
    portable = Counter()
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and op_name(node.target) not in STRUCTURAL:
            portable[op_name(node.target)] += 1
    return Delegation(info.num_delegated_subgraphs, info.num_delegated_nodes, dict(portable))


def op_name(target) -> str:
    """`aten::topk` for the edge op `aten.topk.default`; plumbing (`getitem`) by its own name."""
    parts = getattr(target, "__name__", str(target)).split(".")
    return f"{parts[0]}::{parts[1]}" if len(parts) > 1 else parts[0]


def lower(module: nn.Module, images: torch.Tensor, *, name: str) -> LoweredProgram:
    """torch.export `module` at `images`' shape and lower it to XNNPACK; `LoweringError` names the op at fault."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    start = time.perf_counter()
    with eval_mode(module), torch.no_grad():
        stage = "torch.export"
        try:
            program = torch.export.export(module, (images,))
            stage = "lowering to XNNPACK"
            edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
            delegation = delegation_of(edge.exported_program().graph_module)
            stage = "writing the ExecuTorch program"
            buffer = edge.to_executorch().buffer
        except Exception as error:
            raise LoweringError(failure_message(name, stage, error)) from error
    check_kernels(delegation, name)
    delegation.lowering_s = time.perf_counter() - start
    return LoweredProgram(buffer, delegation)


def failure_message(name: str, stage: str, error: Exception) -> str:
    text = str(error).strip()
    op = re.search(r"aten[.:]+\w+(\.\w+)?", text)
    where = f" at {op.group(0)}" if op else ""
    return f"{name}: {stage} failed{where}: {type(error).__name__}: {(text.splitlines() or [''])[0][:300]}"


def check_kernels(delegation: Delegation, name: str) -> None:
    """Every op left outside XNNPACK has a kernel in this ExecuTorch runtime (else the program cannot run)."""
    from executorch.runtime import Runtime

    available = {name.split(".")[0] for name in Runtime.get().operator_registry.operator_names}  # aten::topk.values
    missing = sorted(op for op in delegation.portable_ops if op not in available)
    if missing:
        raise LoweringError(f"{name}: no ExecuTorch kernel for {missing[0]} (XNNPACK does not take it either)")


def export_executorch(model_or_cfg: ArchConfig | VisionMoE, path: str | Path, *, batch: int = 1) -> Delegation:
    """Write the XNNPACK-lowered `.pte` of the model (in `XnnpackForm`) for inputs of `batch` images."""
    model = as_model(model_or_cfg)
    with eval_mode(model):
        lowered = lower(XnnpackForm(model), example_images(model.cfg, batch), name=model.cfg.name)
    Path(path).write_bytes(lowered.buffer)
    return lowered.delegation


def executorch_cache_path(cfg: ArchConfig, batch: int) -> Path:
    return cache_dir() / "executorch" / f"{cache_key(cfg, f'b{batch}')}.pte"


def cached_executorch(cfg: ArchConfig, batch: int) -> Path:
    """The `.pte` of a freshly built `cfg` at `batch` (latency does not depend on the weights' values)."""
    return build_once(executorch_cache_path(cfg, batch), lambda path: export_executorch(cfg, path, batch=batch),
                      verify=lambda path: check_pte(path.read_bytes()))


# ---------------------------------------------------------------- the checked export


PTE_TOLERANCE = 1e-4  # max |logit difference| between executorch.runtime and torch, as for ONNX Runtime


def images_reaching_experts(model: VisionMoE, *, seed: int = 0, candidates: int = 64,
                            steps: int = 100) -> tuple[torch.Tensor, str]:
    """Images that the eager router sends, together, to every expert: random ones (of `candidates`, at
    several scales) first, then, for each expert none of them reaches, one image optimised towards it (a
    freshly initialised router favours a few experts). Three random images for a model without a per-image
    router. Returns them and a phrase saying which experts they reach."""
    cfg = model.cfg
    generator = torch.Generator().manual_seed(seed)
    pool = torch.randn(candidates, cfg.in_channels, cfg.image_size, cfg.image_size, generator=generator)
    pool *= torch.logspace(-1, 1, candidates)[torch.randperm(candidates, generator=generator), None, None, None]
    if model.router is None:
        return pool[:3], "random inputs (no per-image router)"
    form = XnnpackForm(model)
    with eval_mode(model):
        with torch.no_grad():
            chosen = form.router_logits(pool).topk(cfg.moe.top_k).indices.tolist()
        picked, reached = [], set()
        for image, experts in zip(pool, chosen):
            if not set(experts) <= reached:
                picked.append(image)
                reached |= set(experts)
        for expert in sorted(set(range(cfg.moe.num_experts)) - reached):
            image = pool[:1].clone().requires_grad_(True)
            optimizer = torch.optim.Adam([image], lr=0.05)
            for _ in range(steps):
                logits = form.router_logits(image)
                if expert in logits.topk(cfg.moe.top_k).indices[0].tolist():
                    picked.append(image.detach()[0])
                    reached.add(expert)
                    break
                optimizer.zero_grad()
                (image.grad,) = torch.autograd.grad(-logits.log_softmax(-1)[0, expert], image)  # no weight grads
                optimizer.step()
    return torch.stack(picked), f"{len(picked)} inputs routed to {len(reached)} of {cfg.moe.num_experts} experts"


def write_checked_pte(model: VisionMoE, path: Path) -> tuple[Delegation, float, str]:
    """Write the batch-1 `.pte` of `model` and run it in executorch.runtime on `images_reaching_experts`;
    the delegation, the largest |logit difference| to eager torch, and which experts the check reached."""
    delegation = export_executorch(model, path, batch=1)
    images, reached = images_reaching_experts(model)
    program = load_pte(path)
    with eval_mode(model), torch.no_grad():
        expected = model(images)
    actual = torch.cat([program(image[None])[0] for image in images])
    return delegation, float((actual - expected).abs().max()), reached


# ---------------------------------------------------------------- running


@dataclass
class LoadedProgram:
    """The `forward` method of a `.pte`, with the program that owns its memory (a method alone outlives it)."""

    program: object  # executorch.runtime.Program
    method: object  # executorch.runtime.Method

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        return self.method.execute(list(inputs))


def load_pte(pte: bytes | Path, threads: int | None = None) -> LoadedProgram:
    """A `.pte`, loaded and verified; with `threads`, XNNPACK's thread pool resized first."""
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    from executorch.runtime import Runtime, Verification

    if threads is not None:
        _unsafe_reset_threadpool(threads)  # process-wide: the one pool every delegate call uses
    program = Runtime.get().load_program(pte, verification=Verification.InternalConsistency)
    return LoadedProgram(program, program.load_method("forward"))


def check_pte(body: bytes) -> tuple[int, ...]:
    """The input shape of a `.pte` once it loads, verified, with one method `forward` taking one float tensor."""
    if len(body) < 8 or not PTE_MAGIC.fullmatch(body[4:8]):
        raise PayloadError("not an ExecuTorch program (no .pte file identifier)")
    try:
        loaded = load_pte(body)  # held while its metadata is read: the method's memory is the program's
    except Exception as error:  # the runtime's RuntimeError for a malformed or unsupported program
        raise PayloadError(f"ExecuTorch cannot load the program: {str(error).strip()[:300]}") from None
    meta = loaded.method.metadata
    if meta.num_inputs() != 1 or meta.input_tensor_meta(0).dtype() != FLOAT:
        raise PayloadError("the program must have exactly one float input (the images)")
    return tuple(meta.input_tensor_meta(0).sizes())


class ExecuTorchBackend(LocalBackend):
    """ExecuTorch programs lowered to XNNPACK (CPU), `threads` threads in XNNPACK's pool. The agent takes a
    `.pte`; its input shape, batch included, is fixed when it is lowered."""

    name = "executorch"
    content_type = "application/x-executorch"

    def form(self, model):
        return f"{model_form(model)} (xnnpack)"

    def prepare(self, model, *, batch, threads, provider, cache):
        self._check_provider(provider)
        if cache:
            path = cached_executorch(model.cfg, batch)
            return self.runnable(path.read_bytes(), model.cfg, batch, threads, self.form(model), str(path))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.pte"
            export_executorch(model, path, batch=batch)
            return self.runnable(path.read_bytes(), model.cfg, batch, threads, self.form(model))

    def runnable(self, pte: bytes, cfg: ArchConfig | None, batch: int, threads: int, export_form: str | None,
                 artifact: str | None = None, shape: tuple[int, ...] | None = None) -> Runnable:
        program = load_pte(pte, threads)
        images = torch.randn(shape) if shape else example_images(cfg, batch)
        return Runnable(lambda: program(images), "xnnpack", export_form, artifact=artifact,
                        versions={"executorch": package_version("executorch")})

    def pack(self, model, *, batch, cache, workdir):
        path = cached_executorch(model.cfg, batch) if cache else workdir / "model.pte"
        if not cache:
            export_executorch(model, path, batch=batch)
        return Payload(path.read_bytes(), self.form(model), str(path) if cache else None)

    def load(self, body, *, workdir, batch, threads, provider, limits: AgentLimits):
        self._check_provider(provider)
        if len(body) > limits.max_bytes:
            raise PayloadError(f"the program is over the agent's model size limit of {limits.max_bytes} bytes")
        shape = check_pte(body)
        if len(shape) != 4 or shape[0] != batch:
            raise PayloadError(f"the program takes inputs of shape {list(shape)}: lowered for batch "
                               f"{shape[0] if shape else '?'} (N, C, H, W), asked for batch {batch}")
        if math.prod(shape) > limits.max_input_elements:
            raise PayloadError(f"the input at batch {batch} ({math.prod(shape)} elements) is over the agent's "
                               f"limit of {limits.max_input_elements}")
        return self.runnable(body, None, batch, threads, None, shape=shape)  # the form: the sender knows

    @staticmethod
    def _check_provider(provider: str | None) -> None:
        if provider not in (None, "xnnpack"):
            raise ProfileError(f"the executorch backend runs XNNPACK on the CPU (provider xnnpack), got {provider!r}")

    @classmethod
    def providers(cls) -> list[str]:
        from executorch.runtime import Runtime

        return ["xnnpack"] if Runtime.get().backend_registry.is_available("XnnpackBackend") else []


__all__ = ["PTE_TOLERANCE", "Delegation", "ExecuTorchBackend", "LoweringError", "XnnpackForm", "cached_executorch",
           "check_pte", "export_executorch", "images_reaching_experts", "load_pte", "lower", "write_checked_pte"]
