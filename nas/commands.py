"""What each `vmoe-nas` subcommand does: a thin layer over the Python function of the same name, importing
only what it uses (`nas.cli` holds the arguments and the one-line errors)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from nas.config import ConfigError, check_int
from profilers import MAX_BATCH, MAX_THREADS
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
    statistic = args.statistic or (model.statistic if model else "median")
    result = profile(load_arch(args.arch), backend=args.backend, threads=args.threads, batch=args.batch,
                     provider=args.provider, anchor=anchor, measure=not args.no_measure, statistic=statistic, **remote)
    for warning in result.warnings or []:
        print(f"vmoe-nas profile: warning: {warning}", file=sys.stderr)
    if model:
        from profilers.latency_model import add_prediction

        result = add_prediction(result, model, statistic)
    if args.json:
        return _print_json(result.to_dict())
    print(format_profile(result))


def cmd_latency_model_fit(args: argparse.Namespace) -> None:
    from nas.latency import fit_for_study
    from nas.study import load_study_config

    check_int("--size", args.size, 2)
    cfg = load_study_config(args.config, backend=args.backend, remote_url=args.remote_url, statistic=args.statistic)
    resume = args.out.with_name(args.out.name + ".partial.jsonl")  # an interrupted calibration resumes from it
    model = fit_for_study(cfg, size=args.size, resume=resume, progress=not args.no_progress)
    model.save(args.out)
    resume.unlink(missing_ok=True)
    errors = model.errors["features"]
    print(f"latency model ({model.statistic}) for {model.key['backend']} on {model.key['device']}, threads "
          f"{model.key['threads']}, batch {model.key['batch']}: {len(model.calibration)} architectures in "
          f"{model.calibration_s:.0f} s; leave-one-out MAPE {errors['mape']:.1f}%, {100 * errors['within_10']:.0f}% "
          f"within +-10%, bound {model.bound_pct:.1f}% (FLOPs alone: MAPE {model.errors['flops']['mape']:.1f}%); "
          f"written to {args.out}")


def cmd_search(args: argparse.Namespace) -> None:
    from nas.search import run_search
    from nas.study import load_study_config

    if args.devices and "," not in args.devices:  # one device: no pinning, it is simply the device
        args.device, args.devices = args.device or args.devices, None
    devices = args.devices.split(",") if args.devices else None  # two or more, one worker each
    cfg = load_study_config(
        args.config,
        data_name=args.data,
        data_dir=args.data_dir,
        n_trials=args.n_trials,
        timeout=args.timeout,
        storage=args.storage,
        study_name=args.study_name,
        workers=args.workers or (len(devices) if devices else None),
        sampler=args.sampler,
        seed=args.seed,
        results_dir=args.results_dir,
        backend=args.backend,
        remote_url=args.remote_url,
        device=args.device,
        devices=devices,
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
    from nas.trainer import TrainingInterrupted
    from nas.trial import build_context

    cfg = load_study_config(args.config, data_dir=args.data_dir, results_dir=args.results_dir, device=args.device)
    if cfg.evaluator_kind != "supernet":
        raise ConfigError("evaluator.kind", f"study {cfg.study_name} scores with kind {cfg.evaluator_kind!r}; "
                                            "a supernet is trained for kind: supernet")
    ctx = build_context(cfg, progress=not args.no_progress)
    try:
        result = train_supernet(ctx, progress=not args.no_progress)
    except TrainingInterrupted as stopped:
        print(f"interrupted ({stopped}): {stopped.saved()}; run the same command again to resume the supernet of "
              f"{cfg.study_name} from there", file=sys.stderr)
        raise
    except KeyboardInterrupt:  # before training began, or a second signal
        print(f"interrupted: run the same command again to resume the supernet of {cfg.study_name}", file=sys.stderr)
        raise
    print(f"supernet of {cfg.study_name}: {result.steps} steps, {result.train_images:,} training images, "
          f"val accuracy of its largest subnet {result.largest_accuracy:.4f}, smallest "
          f"{result.smallest_accuracy:.4f}; {result.checkpoint}")


def _print_confirmed(record) -> None:
    from nas.pairs import latency_warning
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
        print(f"interrupted ({stopped}): {stopped.saved()}; run the same command again to resume from there",
              file=sys.stderr)
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
