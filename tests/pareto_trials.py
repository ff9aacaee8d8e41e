"""Hand-made studies for the Pareto, report and export tests: trials with known metrics, no training."""

import optuna

from nas.objectives import OBJECTIVES
from nas.record import Metrics, TrialRecord, user_attrs
from search_spaces import ArchConfig


def arch(kind: str, width: int = 16) -> ArchConfig:
    moe = {"num_experts": 4, "top_k": 1, "layers": [1]} if kind == "moe" else None
    return ArchConfig(image_size=16, in_channels=1, patch_size=4, num_classes=12, depth=2, width=width, num_heads=2,
                      mlp_ratio=2.0, moe=moe)


def trial(kind: str, accuracy: float, flops: float, latency: float | None = None, *, width: int = 16,
          constraint: float | None = None, duplicate_of: int | None = None) -> dict:
    """A trial as the search stores it: its user attributes; `constraint` > 0 makes it infeasible."""
    metrics = Metrics(accuracy=accuracy, flops=flops, latency_ms=latency, params_active=1000 * width,
                      params_total=2000 * width, size_bytes_fp32=8000 * width, size_mb=0.008 * width,
                      latency_backend="onnxruntime" if latency is not None else None)
    attrs = user_attrs(TrialRecord(arch=arch(kind, width), metrics=metrics, duplicate_of=duplicate_of))
    return {"user_attrs": attrs, "constraints": None if constraint is None else {"max_flops": constraint}}


def study(trials: list[dict], objectives=("accuracy", "flops", "latency"), storage=None, name="hand") -> optuna.Study:
    """A study of completed `trials`, valued on `objectives` as the search values them."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = optuna.create_study(study_name=name, storage=storage, directions=[OBJECTIVES[o].direction for o in objectives])
    s.set_user_attr("objectives", list(objectives))
    for t in trials:
        metrics = t["user_attrs"]  # each metric is a user attribute
        s.add_trial(optuna.trial.create_trial(values=[metrics.get(OBJECTIVES[o].metric) for o in objectives], **t))
    return s
