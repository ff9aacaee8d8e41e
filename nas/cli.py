"""`vmoe-nas`: one entry point, one subcommand per step of the flow. Each subcommand is a thin layer
over a Python function of the same name."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from nas.config import ConfigError, check_int, first_line
from nas.export import DEFAULT_EPOCHS, PICK_RULES
from nas.objectives import OBJECTIVES
from nas.processes import interruptible
from profilers import BACKENDS, MAX_BATCH, MAX_THREADS
from search_spaces import describe, load_arch


def _print_json(data: dict) -> None:
    print(json.dumps(data, indent=2))


def cmd_describe(args: argparse.Namespace) -> None:
    info = describe(load_arch(args.arch))
    if args.json:
        return _print_json(info)
    print(f"{info['name']}  (hash {info['config_hash']})")
    for block in info["blocks"]:
        print(f"  block {block['index']:>2}: {block['mlp']}")
    print(f"params total:  {info['params_total']:,}")
    print(f"params active: {info['params_active']:,} per image")


def cmd_profile(args: argparse.Namespace) -> None:
    from profilers import format_profile, profile

    if args.remote_url and args.backend != "remote":
        raise ConfigError("--remote-url", f"is for --backend remote, not {args.backend}")
    check_int("--threads", args.threads, 1, MAX_THREADS)
    check_int("--batch", args.batch, 1, MAX_BATCH)
    remote = {"remote_url": args.remote_url} if args.remote_url else {}  # only the remote backend takes it
    anchor = load_arch(args.anchor) if args.anchor else None
    if args.no_measure and not args.latency_model:
        raise ConfigError("--no-measure", "needs --latency-model: without measuring, latency comes from a model")
    model = None
    if args.latency_model:
        from profilers.latency_model import LatencyModel

        model = LatencyModel.load(args.latency_model)  # a bad file is refused before anything is measured
    result = profile(load_arch(args.arch), backend=args.backend, threads=args.threads, batch=args.batch,
                     provider=args.provider, anchor=anchor, measure=not args.no_measure, **remote)
    for warning in result.warnings or []:
        print(f"vmoe-nas profile: warning: {warning}", file=sys.stderr)
    if model:
        from profilers.latency_model import add_prediction

        result = add_prediction(result, model)
    if args.json:
        return _print_json(result.to_dict())
    print(format_profile(result))


def cmd_latency_model_fit(args: argparse.Namespace) -> None:
    from nas.latency import fit_for_study
    from nas.study import load_study_config

    check_int("--size", args.size, 2)
    cfg = load_study_config(args.config, backend=args.backend, remote_url=args.remote_url)
    resume = args.out.with_name(args.out.name + ".partial.jsonl")  # an interrupted calibration resumes from it
    model = fit_for_study(cfg, size=args.size, resume=resume, progress=not args.no_progress)
    model.save(args.out)
    resume.unlink(missing_ok=True)
    errors = model.errors["features"]
    print(f"latency model for {model.key['backend']} on {model.key['device']}, threads {model.key['threads']}, "
          f"batch {model.key['batch']}: {len(model.calibration)} architectures in {model.calibration_s:.0f} s; "
          f"leave-one-out MAPE {errors['mape']:.1f}%, {100 * errors['within_10']:.0f}% within +-10%, "
          f"bound {model.bound_pct:.1f}% (FLOPs alone: MAPE {model.errors['flops']['mape']:.1f}%); "
          f"written to {args.out}")


def cmd_search(args: argparse.Namespace) -> None:
    from nas.search import run_search
    from nas.study import load_study_config

    if args.devices and "," not in args.devices:  # one device: no pinning, it is simply the device
        args.device, args.devices = args.device or args.devices, None
    cfg = load_study_config(
        args.config,
        data_name=args.data,
        data_dir=args.data_dir,
        n_trials=args.n_trials,
        timeout=args.timeout,
        storage=args.storage,
        study_name=args.study_name,
        workers=args.workers or (len(args.devices.split(",")) if args.devices and "," in args.devices else None),
        sampler=args.sampler,
        seed=args.seed,
        results_dir=args.results_dir,
        backend=args.backend,
        remote_url=args.remote_url,
        device=args.device,
        devices=args.devices.split(",") if args.devices and "," in args.devices else None,
    )
    print(f"study {cfg.study_name}: objectives {', '.join(cfg.objectives)}; log in {cfg.study_dir / 'search.log'}")
    try:
        study = run_search(cfg, progress=not args.no_progress, allow_changes=args.allow_changes)
    except KeyboardInterrupt:
        print(f"interrupted: run the same command again to resume study {cfg.study_name}", file=sys.stderr)
        raise
    from nas import record as records

    states = {}
    for trial in records.read_all(study):
        state = "interrupted" if trial.status == "interrupted" else trial.state.name.lower()
        states[state] = states.get(state, 0) + 1
    print(f"study {cfg.study_name} finished: " + ", ".join(f"{n} {s}" for s, n in sorted(states.items())))
    if cfg.confirm.enabled and not args.no_confirm:
        from nas.confirm import confirm
        from nas.trial_store import storage_url

        _print_confirmed(confirm(study, cfg, workers=cfg.workers, progress=not args.no_progress,
                                 storage=storage_url(cfg)))  # launchers sharing it share the runs
    if not args.no_report:
        from nas.report import write_report

        written = write_report(study, cfg.study_dir)
        print(f"Pareto report: {written['report.md']}, plots: {written['pareto.html']}")


def cmd_supernet(args: argparse.Namespace) -> None:
    from nas.study import load_study_config
    from nas.supernet import train_supernet
    from nas.trial import build_context

    cfg = load_study_config(args.config, data_dir=args.data_dir, results_dir=args.results_dir, device=args.device)
    if cfg.evaluator_kind != "supernet":
        raise ConfigError("evaluator.kind", f"study {cfg.study_name} scores with kind {cfg.evaluator_kind!r}; "
                                            "a supernet is trained for kind: supernet")
    ctx = build_context(cfg, progress=not args.no_progress)
    try:
        result = train_supernet(ctx, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"interrupted: run the same command again to resume the supernet of {cfg.study_name}", file=sys.stderr)
        raise
    print(f"supernet of {cfg.study_name}: {result.steps} steps, {result.train_images:,} training images, "
          f"val accuracy of its largest subnet {result.largest_accuracy:.4f}, smallest "
          f"{result.smallest_accuracy:.4f}; {result.checkpoint}")


def _print_confirmed(record) -> None:
    from nas.confirm import latency_warning
    from nas.pareto import confirmed_frame

    settings = record.settings
    print(f"confirmed {len(record.pairs)} pairs with {len(settings['seeds'])} seeds at {settings['steps']} steps "
          f"(margin {settings['margin']:g}, latency tie band {settings['latency_band']:.1%}):")
    for _, row in confirmed_frame(record).iterrows():
        print("  " + _pair_line(row))
    if warning := latency_warning(settings):
        print(f"warning: {warning}", file=sys.stderr)


def _pair_line(row) -> str:
    """One confirmed pair (a `nas.pareto.confirmed_frame` row): verdict, the test that decided it, gain, interval."""
    from nas.pareto import answered

    costs = " and ".join(dict.fromkeys(["flops" if c == "twin" else c for c in answered(row)]))
    also = f", also the best dense of no more {row['also'].replace(',', ', ')}" if row["also"] else ""
    return (f"{row['verdict']:>5} at equal {costs} (decided by {row['decided_by']}): {row['moe_name']} vs "
            f"{row['dense_name']} ({row['comparator']}{also}): gain {row['gain_mean']:+.4f} "
            f"[{row['ci_low']:+.4f}, {row['ci_high']:+.4f}], p_holm {row['p_holm']:.3g}")


def cmd_confirm(args: argparse.Namespace) -> None:
    from nas import record as records
    from nas.confirm import confirm
    from nas.report import write_report
    from nas.storage import existing_storage, load_study, parse_storage
    from nas.study import MAX_CONFIRM_PAIRS, MAX_CONFIRM_SEEDS, MAX_COUNT, MAX_PROCESSES, StudyConfig

    for name, value, maximum in (("--seeds", args.seeds, MAX_CONFIRM_SEEDS), ("--pairs", args.pairs, MAX_CONFIRM_PAIRS),
                                 ("--steps", args.steps, MAX_COUNT), ("--workers", args.workers, MAX_PROCESSES)):
        if value is not None:
            check_int(name, value, 1, maximum)
    if args.margin is not None and not math.isfinite(args.margin):
        raise ConfigError("--margin", f"must be a finite number, got {args.margin}")
    url = parse_storage(args.storage) if args.storage else existing_storage(Path(args.results_dir) / args.study)
    study = load_study(args.study, storage=url, results_dir=args.results_dir)
    stored = records.read_study(study).config
    if stored is None:
        raise ConfigError("--study", f"study {args.study!r} stores no config: it was not run by vmoe-nas search")
    # The study's own settings, here: its storage is the one just opened, its files under --results-dir.
    cfg = StudyConfig.from_dict({**stored, "storage": None, "results_dir": args.results_dir})
    record = confirm(study, cfg, seeds=args.seeds, pairs=args.pairs, steps=args.steps, margin=args.margin,
                     workers=args.workers or 1, progress=not args.no_progress, storage=url)
    _print_confirmed(record)
    paths = write_report(study, Path(args.results_dir) / args.study)
    print(f"wrote {paths['beats_dense.csv']}, {paths['report.md']}, {paths['pareto.html']}")


def cmd_superclasses(args: argparse.Namespace) -> None:
    from nas.data import load_dataset
    from nas.devices import resolve_device
    from nas.superclasses import cache_name, superclasses_for

    resolve_device(args.device)  # before the data set is read
    dataset = load_dataset(args.data, data_dir=args.data_dir)
    found = superclasses_for(dataset, args.groups, cache_dir=args.cache_dir, seed=args.seed,
                             progress=not args.no_progress, device=args.device)
    path = found.save(args.out or Path(args.cache_dir) / cache_name(dataset.name, args.groups, args.seed))
    print(f"{dataset.name}: {args.groups} super-classes ({found.source}), written to {path}")
    for index, group in enumerate(found.groups):
        print(f"  group {index}: " + ", ".join(dataset.class_names[c] for c in group))


def cmd_profiler_server(args: argparse.Namespace) -> None:
    from profilers.server import serve

    serve(host=args.host, port=args.port, backend=args.backend, token_file=args.token_file,
          insecure_no_token=args.insecure_no_token, max_upload_mb=args.max_upload_mb, timeout_s=args.timeout)


def cmd_pareto(args: argparse.Namespace) -> None:
    from nas.pareto import analyze
    from nas.report import confirmed_sentence, unconfirmed_sentence, write_report
    from nas.storage import load_study

    study = load_study(args.study, storage=args.storage, results_dir=args.results_dir)
    analysis = analyze(study, objectives=args.objectives, margin=args.margin)
    paths = write_report(study, args.out or Path(args.results_dir) / args.study, analysis=analysis)
    if analysis.no_result:
        print(f"study {args.study}: {analysis.no_result}")
        print("wrote " + ", ".join(str(path) for path in paths.values()))
        return
    reference = ", ".join(f"{name} {value:.4g}" for name, value in analysis.reference.items())
    print(f"study {args.study}: {len(analysis.ranked)} trials analysed; reference point {reference}")
    for which in ("overall", "dense", "moe"):
        print(f"  {which:>7} front: {len(analysis.front(which))} trials, hypervolume {analysis.hypervolume[which]:.4f}")
    if analysis.confirm_settings:
        settings = analysis.confirm_settings
        print(f"  confirmed ({len(settings['seeds'])} seeds, {settings['steps']} steps): "
              f"{confirmed_sentence(analysis)}")
        for _, row in analysis.confirmed.iterrows():
            print("    " + _pair_line(row))
    else:
        print(f"  not confirmed (vmoe-nas confirm --study {args.study} retrains them with paired seeds)")
    print(f"  unconfirmed, one seed (margin {analysis.margin:g}): {unconfirmed_sentence(analysis)}")
    if not analysis.confirm_settings:
        for _, row in analysis.beats_dense.head(5).iterrows():
            print(f"    trial {row['trial']} {row['name']}: {row['gain_flops']:+.4f} at equal FLOPs, "
                  f"{row['gain_latency']:+.4f} at equal latency (one seed)")
    print("wrote " + ", ".join(str(path) for path in paths.values()))
    for note in analysis.notes:
        print(f"note: {note}")


def cmd_export(args: argparse.Namespace) -> None:
    from nas.export import export_trial
    from nas.storage import existing_storage, load_study, parse_storage

    study_dir = Path(args.results_dir) / args.study
    url = parse_storage(args.storage) if args.storage else existing_storage(study_dir)
    study = load_study(args.study, storage=url, results_dir=args.results_dir)
    paths = export_trial(study, args.out, trial=args.trial, pick=args.pick, epochs=args.epochs,
                         coreml=not args.no_coreml, executorch=not args.no_executorch, force=args.force,
                         study_dir=study_dir, margin=args.margin, source=url.redacted)
    card = paths["model_card.md"].read_text().splitlines()
    print(f"exported {card[0].lstrip('# ')} to {args.out}: " + ", ".join(sorted(paths)))
    for line in card:
        if line.startswith("Picked by "):  # a gain rule says whether its gains were confirmed
            print(line.replace("`", ""))
    print(f"train it: vmoe-nas train {paths['train.yaml']}")


def cmd_train(args: argparse.Namespace) -> None:
    from nas.devices import resolve_device
    from nas.full_train import load_train_config, run_training
    from nas.trainer import CHECKPOINT_NAME, TrainingInterrupted

    run = load_train_config(args.config).output_dir
    if args.device:
        resolve_device(args.device)
    checkpoint = run / CHECKPOINT_NAME
    if checkpoint.is_file() and not args.force and not (run / "metrics.json").is_file():
        print(f"resuming from {checkpoint}")
    try:
        metrics = run_training(args.config, force=args.force, progress=not args.no_progress, device=args.device)
    except TrainingInterrupted as stopped:
        print(f"interrupted ({stopped}): saved step {stopped.step}{f' of {stopped.steps}' if stopped.steps else ''} "
              f"to {stopped.path}; run the same command again to resume from there", file=sys.stderr)
        raise
    except KeyboardInterrupt:  # before training began, or a second signal: say what is on disk
        saved = f"resume from {checkpoint}" if checkpoint.is_file() else "start over (nothing was saved)"
        print(f"interrupted: run the same command again to {saved}", file=sys.stderr)
        raise
    test = metrics["test_accuracy"]
    print(f"{metrics['name']}: {metrics['steps']} steps, val accuracy {metrics['val_accuracy']:.4f}, "
          f"test accuracy {'-' if test is None else f'{test:.4f}'}; wrote {run / 'metrics.json'}")
    if "onnx_error" in metrics:
        print(f"warning: no model.onnx ({metrics['onnx_error']}); the trained weights are in model.pt", file=sys.stderr)


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
    p.add_argument("--latency-model", help="a latency model file (vmoe-nas latency-model fit): adds "
                   "latency_ms.predicted beside the measured median")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
