"""`vmoe-nas`: one entry point, one subcommand per step of the flow. Each subcommand is a thin layer
over a Python function of the same name."""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

from nas.commands import (
    cmd_confirm,
    cmd_describe,
    cmd_export,
    cmd_latency_model_fit,
    cmd_pareto,
    cmd_profile,
    cmd_profiler_server,
    cmd_search,
    cmd_superclasses,
    cmd_supernet,
    cmd_train,
)
from nas.config import first_line
from nas.export import DEFAULT_EPOCHS, PICK_RULES
from nas.objectives import OBJECTIVES
from nas.processes import interruptible
from profilers import BACKENDS, STATISTICS


class AgentBackends:
    """The backends a profiler agent can run, as argparse choices. Knowing them imports each backend, so
    they are listed only when checked or shown: building the parser for `describe` imports no runtime."""

    def __contains__(self, name: object) -> bool:
        return name in BACKENDS.agent_backends()

    def __iter__(self):
        return iter(BACKENDS.agent_backends())


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import version

    parser = argparse.ArgumentParser(prog="vmoe-nas", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('vmoe-nas')}")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("describe", help="blocks and parameter counts of an architecture")
    p.add_argument("arch", help="architecture YAML file or preset name")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=cmd_describe)

    p = commands.add_parser("profile", help="FLOPs, parameters, size and latency of an architecture")
    p.add_argument("arch", help="architecture YAML file or preset name")
    p.add_argument("--backend", default="onnxruntime", choices=list(BACKENDS))
    p.add_argument("--remote-url", help="profiler agent (vmoe-nas profiler-server) for --backend remote; "
                   "token from $VMOE_PROFILER_TOKEN")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads")
    p.add_argument("--batch", type=int, default=1, help="images per call")
    p.add_argument("--provider", help="ONNX Runtime execution provider, torch device or Core ML compute units")
    p.add_argument("--anchor", help="another architecture timed interleaved with ARCH: their latency ratio holds "
                   "where absolute times drift (local backends)")
    p.add_argument("--statistic", choices=list(STATISTICS), help="what a latency is of the per-call times, for "
                   "--anchor's ratio and --latency-model (default: the model's, else median)")
    p.add_argument("--latency-model", help="a latency model file (vmoe-nas latency-model fit): adds "
                   "latency_ms.predicted beside the measured latency")
    p.add_argument("--no-measure", action="store_true", help="with --latency-model: the predicted latency only, "
                   "nothing exported or timed")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=cmd_profile)

    p = commands.add_parser("latency-model", help="fit a latency model of a device on a study's space")
    actions = p.add_subparsers(dest="action", required=True)
    p = actions.add_parser("fit", help="measure a calibration set of the study's space on its profiler and fit")
    p.add_argument("--config", required=True, help="study YAML file or preset whose space and profiler to calibrate")
    p.add_argument("--backend", help="latency backend (overrides profiler.backend)")
    p.add_argument("--remote-url", help="profiler agent http://HOST:PORT for --backend remote")
    p.add_argument("--statistic", choices=list(STATISTICS), help="what the model predicts of the per-call times "
                   "(overrides profiler.statistic)")
    p.add_argument("--out", type=Path, required=True, help="the model file to write (JSON)")
    p.add_argument("--size", type=int, default=40, help="calibration architectures (default 40)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_latency_model_fit)

    p = commands.add_parser("search", help="run or resume a search study")
    p.add_argument("--config", default="fashion-quick",
                   help="study YAML file or preset (smoke, fashion-quick, positive-control)")
    p.add_argument("--data", help="data set name (overrides the config)")
    p.add_argument("--data-dir", help="folder holding the data set files")
    p.add_argument("--n-trials", type=int, help="number of trials in the study")
    p.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    p.add_argument("--storage", help="Optuna storage URL (sqlite:///..., postgresql://..., journal:PATH)")
    p.add_argument("--study-name", help="study name (also the folder under results/)")
    p.add_argument("--workers", type=int, help="worker processes sharing the storage")
    p.add_argument("--sampler", help="tpe, nsga2, gp or random")
    p.add_argument("--seed", type=int, help="sampler seed")
    p.add_argument("--results-dir", help="where studies write (default results/)")
    p.add_argument("--backend", help="latency backend (overrides profiler.backend): onnxruntime, torch, coreml, "
                   "executorch, remote")
    p.add_argument("--remote-url", help="profiler agent http://HOST:PORT for --backend remote")
    p.add_argument("--device", help="training device: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--devices", help="cuda:0,cuda:1,...: one worker process per GPU (pinned by CUDA_VISIBLE_DEVICES)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-report", action="store_true", help="skip the Pareto report at the end")
    p.add_argument("--allow-changes", action="store_true", help="resume a study whose config changed in fields that "
                   "change what a trial means (data, space, evaluator, constraints, profiler); refused otherwise")
    p.add_argument("--no-confirm", action="store_true", help="skip the confirmation stage at the end (see confirm)")
    p.set_defaults(run=cmd_search)

    p = commands.add_parser("supernet", help="train (or resume) the weight-sharing supernet of a kind: supernet study")
    p.add_argument("--config", required=True, help="study YAML file or preset (smoke-oneshot, fashion-oneshot)")
    p.add_argument("--data-dir", help="folder holding the data set files")
    p.add_argument("--results-dir", help="where studies write (default results/)")
    p.add_argument("--device", help="training device: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_supernet)

    p = commands.add_parser("confirm", help="retrain the top MoEs and their dense comparators with paired seeds: "
                            "does an MoE beat dense beyond noise?")
    p.add_argument("--study", required=True, help="study name")
    p.add_argument("--storage", help="Optuna storage URL (default: journal.log or study.db in RESULTS_DIR/STUDY/)")
    p.add_argument("--results-dir", default="results", help="where studies write (default results/)")
    p.add_argument("--seeds", type=int, help="seeds per arm (default: the study's confirm.seeds)")
    p.add_argument("--steps", type=int, help="training steps per run (default: the study's top rung)")
    p.add_argument("--pairs", type=int, help="MoEs from the top of the MoE front (default: confirm.pairs)")
    p.add_argument("--margin", type=float, help="accuracy gain the interval must clear for 'beats' (a fraction)")
    p.add_argument("--workers", type=int, help="processes training runs in parallel (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_confirm)

    p = commands.add_parser("superclasses", help="super-classes of a data set (its own, or from confusion)")
    p.add_argument("--data", required=True, help="data set name (fashion-mnist, cifar100, npz:PATH, ...)")
    p.add_argument("--groups", type=int, required=True, help="number of super-classes E (= experts)")
    p.add_argument("--out", type=Path, help="JSON file to write (default: the cache file)")
    p.add_argument("--data-dir", help="folder holding the data set files")
    p.add_argument("--cache-dir", default="results/superclasses", help="where discovered mappings are cached")
    p.add_argument("--seed", type=int, default=0, help="seed of the discovery model and the clustering")
    p.add_argument("--device", default="auto", help="training device: auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_superclasses)

    p = commands.add_parser("profiler-server", help="the agent that measures latency on this (target) device",
                            allow_abbrev=False)  # --token must not pass for --token-file
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; off loopback a token is required")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--backend", default="onnxruntime", choices=AgentBackends(), metavar="BACKEND",
                   help="runtime that measures, one of %(choices)s: onnxruntime takes ONNX, coreml zipped ML "
                   "programs, executorch a .pte, torch an arch YAML")
    p.add_argument("--token-file", help="file holding the bearer token every request must carry (default: "
                   "$VMOE_PROFILER_TOKEN; never on the command line, where ps shows it)")
    p.add_argument("--insecure-no-token", action="store_true",
                   help="on loopback only: accept requests without a token, from any local program")
    p.add_argument("--max-upload-mb", type=float, default=256, help="largest model accepted, in MiB")
    p.add_argument("--timeout", type=float, default=300, help="seconds per request: upload, queue and measurement")
    p.set_defaults(run=cmd_profiler_server)

    p = commands.add_parser("pareto", help="Pareto fronts, hypervolumes, MoE against dense, plots and report")
    p.add_argument("--study", required=True, help="study name")
    p.add_argument("--storage", help="Optuna storage URL (default: journal.log or study.db in RESULTS_DIR/STUDY/)")
    p.add_argument("--results-dir", default="results", help="where studies write (default results/)")
    p.add_argument("--objectives", nargs="+", choices=list(OBJECTIVES), help="objectives to sort on (default: "
                   "the study's)")
    p.add_argument("--margin", type=float, default=0.0, help="accuracy gain an MoE needs to count as beating dense")
    p.add_argument("--out", type=Path, help="folder for the report files (default RESULTS_DIR/STUDY/)")
    p.set_defaults(run=cmd_pareto)

    rules = "\n".join(f"  {rule:<28} {text}" for rule, text in PICK_RULES.items())
    p = commands.add_parser("export", help="export a trial: arch, training recipe, ONNX, Core ML, model card",
                            formatter_class=argparse.RawDescriptionHelpFormatter, epilog=f"pick rules:\n{rules}")
    p.add_argument("--study", required=True, help="study name")
    p.add_argument("--storage", help="Optuna storage URL (default: journal.log or study.db in RESULTS_DIR/STUDY/)")
    p.add_argument("--results-dir", default="results", help="where studies write (default results/)")
    choice = p.add_mutually_exclusive_group(required=True)
    choice.add_argument("--trial", type=int, help="trial number")
    choice.add_argument("--pick", metavar="RULE", help="a rule choosing the trial (below)")
    p.add_argument("--out", type=Path, required=True, help="folder to write (appears whole or not at all)")
    p.add_argument("--epochs", type=float, default=DEFAULT_EPOCHS, help="epochs of full training in train.yaml")
    p.add_argument("--margin", type=float, default=0.0, help="accuracy gain over dense the largest-gain rules need")
    p.add_argument("--no-coreml", action="store_true", help="skip the Core ML conversion")
    p.add_argument("--no-executorch", action="store_true", help="skip the ExecuTorch program (model.pte)")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.set_defaults(run=cmd_export)

    p = commands.add_parser("train", help="full training of an exported configuration (checkpoints, resume)")
    p.add_argument("config", type=Path, help="DIR/train.yaml written by vmoe-nas export")
    p.add_argument("--force", action="store_true", help="start from scratch, over a finished or interrupted run")
    p.add_argument("--device", help="training device (default: the recipe's): auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_train)
    return parser


# Errors a user can fix get one line naming what to fix, not a traceback. Named by module, so that a command
# imports only what it uses: an error class whose module was never imported cannot have been raised.
USER_ERRORS = {"nas.config": "ConfigError", "nas.data": "DataError", "nas.superclasses": "SuperclassError",
               "nas.storage": "StorageError", "nas.trainer": "TrainingError", "profilers._errors": "ProfileError",
               "builtins": "FileNotFoundError"}


def is_user_error(error: BaseException) -> bool:
    return any(isinstance(error, getattr(sys.modules[module], name))
               for module, name in USER_ERRORS.items() if module in sys.modules)


def storage_failure(error: BaseException) -> str | None:
    """One line for an error a study storage raised on reading (a damaged or unreachable database)."""
    storage = sys.modules.get("nas.storage")
    if storage is None or not isinstance(error, storage.STORAGE_ERRORS):
        return None
    return f"the study storage failed: {first_line(storage.root_cause(error))}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with interruptible():  # SIGTERM (docker stop, kubectl, schedulers) and SIGHUP stop like Ctrl-C
            args.run(args)
    except Exception as error:
        message = error if is_user_error(error) else storage_failure(error)
        if message is None:
            raise
        print(f"vmoe-nas {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vmoe-nas {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if argv is None:  # the command line's own process, about to exit: its shutdown then skips a last garbage
            gc.freeze()   # collection over torch's objects (0.3-0.6 s of a cold `vmoe-nas profile` on 2 busy cores)
    return 0


if __name__ == "__main__":
    sys.exit(main())
