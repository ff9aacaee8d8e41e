"""What an app needs beside a model's graph: how to prepare an image, how to read the output, how the MoE routes.

`ModelInfo` is written three ways from one place: `input.json` beside the exported files, the metadata of each
file (ONNX `metadata_props`, Core ML `user_defined_metadata`), and, for a per-image MoE in Core ML,
`coreml/routing.json`: which tail program to run for the experts the trunk picked.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

from search_spaces import ArchConfig

NORMALISE = "x = (pixel / 255 - mean) / std, per channel, pixels in 0..255"


@dataclass(frozen=True)
class ModelInfo:
    arch: ArchConfig
    mean: tuple[float, ...]  # per channel, on the [0, 1] scale (nas.datasets.Dataset.mean)
    std: tuple[float, ...]
    class_names: tuple[str, ...]  # logit i is class_names[i]

    @classmethod
    def of(cls, arch: ArchConfig, dataset) -> ModelInfo:
        """The info of `arch` trained on `dataset` (a nas.datasets.Dataset: its normalisation and class names)."""
        return cls(arch, tuple(dataset.mean), tuple(dataset.std), tuple(dataset.class_names))

    def routing(self) -> dict:
        """The routing facts of the architecture: dense, or which blocks are MoE and how they route."""
        moe = self.arch.moe
        if moe is None:
            return {"routing": "dense"}
        return {"routing": moe.routing, "num_experts": moe.num_experts, "top_k": moe.top_k,
                "moe_blocks": list(moe.layers)}

    def to_dict(self) -> dict:
        """input.json: the input and output of every exported file."""
        cfg = self.arch
        return {"name": cfg.name, "input": "images", "layout": "NCHW",
                "shape": ["batch", cfg.in_channels, cfg.image_size, cfg.image_size], "image_size": cfg.image_size,
                "in_channels": cfg.in_channels, "mean": list(self.mean), "std": list(self.std),
                "normalise": NORMALISE, "output": "logits", "class_names": list(self.class_names),
                **self.routing()}

    def metadata(self) -> dict[str, str]:
        """The same as string pairs, as ONNX metadata_props and Core ML user_defined_metadata hold them."""
        return {key: value if isinstance(value, str) else json.dumps(value) for key, value in self.to_dict().items()}

    def description(self) -> str:
        """One line for a Core ML model's short description."""
        cfg = self.arch
        return (f"{cfg.name}: images ({cfg.in_channels}, {cfg.image_size}, {cfg.image_size}), {NORMALISE} with "
                f"mean {list(self.mean)} and std {list(self.std)}; logits over {len(self.class_names)} classes")


def coreml_routing(arch: ArchConfig, *, batch: int) -> dict:
    """coreml/routing.json of a per-image MoE's trunk and tails (profilers.export_coreml): the tail file of
    each set of k experts, keyed by their sorted indices, and how to run it."""
    from profilers import tail_name  # not at import: the CLI reads nas.export's PICK_RULES without onnx

    k = arch.moe.top_k
    tails = {"-".join(map(str, experts)): f"{tail_name(experts)}.mlpackage"
             for experts in itertools.combinations(range(arch.moe.num_experts), k)}
    return {
        "form": "per_image:trunk+tails", "num_experts": arch.moe.num_experts, "top_k": k, "batch": batch,
        "trunk": {"file": "trunk.mlpackage", "inputs": ["images"], "outputs": ["features", "experts", "gates"]},
        "key": "the image's `experts` (the trunk's output, k indices) sorted ascending, joined by '-'",
        "tails": tails,
        "tail_inputs": ["features"] if k == 1 else ["features", "gates"],
        "combine": ("run tails[key] on the trunk's features; its logits are the output" if k == 1 else
                    f"one tail holds all {k} experts: reorder the trunk's gates as its experts were sorted, run "
                    "tails[key] on (features, gates); it mixes the experts by the gates, its logits are the output"),
    }


__all__ = ["ModelInfo", "coreml_routing"]
