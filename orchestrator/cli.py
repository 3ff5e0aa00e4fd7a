"""The ``mode-cl`` command line. Subcommands parse their arguments and call the orchestrator; a
:class:`trainables.errors.UserError` from anywhere becomes one line on stderr and exit code 2.

mode-cl --version
mode-cl methods                          # the continual-learning methods
mode-cl pretrain-base [CONFIG]           # build (or find cached) the tiny base model
mode-cl run [CONFIG] [--set k=v] [--name N] [--storage S] [--address A] [--out DIR] [--no-ray] [--dry-run]
mode-cl data import-coin --model M --out DIR [--task NAME --train F --test F]... [--generation F]
"""

from __future__ import annotations

import argparse
import signal
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from orchestrator import stopping
from trainables import __version__
from trainables.errors import UserError

EXIT_USAGE = 2


def _methods(_: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from trainables.methods import METHODS

    table = Table(title="methods")
    table.add_column("name")
    table.add_column("description")
    for name, cls in METHODS.items():
        doc = cls.__doc__ or sys.modules[cls.__module__].__doc__ or ""
        paragraph = " ".join(doc.strip().split("\n\n")[0].split())  # the docstring's first paragraph
        table.add_row(name, paragraph.split(". ")[0].rstrip(".") + ".")  # its first sentence
    Console().print(table)
    return 0


DEFAULT_RUN_CONFIG = Path(__file__).resolve().parent.parent / "search_spaces" / "digits.yaml"
DEFAULT_WORK_DIR = Path("mode-cl-work")


def _run(args: argparse.Namespace) -> int:
    from orchestrator.report import print_plan, print_results, wide_console
    from orchestrator.train import run
    from trainables.benchmarks import check_inputs
    from trainables.config import load_run_config

    config = load_run_config(args.config, args.set or [])
    if args.dry_run:
        from trainables.plan import resource_plan

        print_plan(resource_plan(config), config)
        return 0
    check_inputs(config)
    console = wide_console()
    path = "in-process" if args.no_ray else "Ray Train"
    console.print(
        f"[bold]mode-cl run[/] ({path}): method {config.method.name}, tasks {list(config.tasks)}, seed {config.seed}"
    )
    results, out = run(
        config,
        args.work_dir,
        name=args.name,
        out=Path(args.out) if args.out else None,
        storage=args.storage,
        address=args.address,
        in_process=args.no_ray,
        log=console.print,
    )
    print_results(results, console)
    console.print(f"results: {out / 'results.json'}")
    return 0


def _import_coin(args: argparse.Namespace) -> int:
    from trainables.benchmarks.coin.data import TaskFiles, import_coin

    if (args.train or args.test) and not args.task:
        raise UserError("--train/--test need --task NAME (e.g. --task ScienceQA); import one task per call")
    tasks = [TaskFiles(args.task, args.train, args.test)] if args.task else []
    result = import_coin(
        args.out,
        args.model,
        tasks,
        generation=args.generation,
        image_root=args.image_root,
        separator_token=args.separator_token,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        gen_holdout=args.gen_holdout,
        stream_codes=args.stream_codes,
        device=args.device,
    )
    for split, written in result["shards_written"].items():
        print(f"{split}: {written} shard(s) written")
    print(f"imported into {args.out} (manifest.json lists every task and split)")
    return 0


def _pretrain_base(args: argparse.Namespace) -> int:
    from trainables.benchmarks.digits import benchmark as digits
    from trainables.config import load_run_config

    config = load_run_config(args.config, args.set or [])
    directory = digits.prepare(config, Path(args.work_dir))
    print(f"base model: {directory}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from orchestrator.space import load_space

    space = load_space(args.space)
    print(
        f"{args.space}: ok — {space.size} trials ({space.search}, {space.scheduler['type']}), objective "
        f"{space.objective_mode} {space.objective_metric}, {space.max_concurrent_trials} at a time"
    )
    return 0


def _storage(args: argparse.Namespace) -> str:
    return args.storage or str((Path(args.work_dir) / "sweeps").resolve())


def _tracking(args: argparse.Namespace):
    from orchestrator.mlflow_server import resolve_tracking_uri
    from orchestrator.sweep_tracking import TrackingChoice

    return TrackingChoice(resolve_tracking_uri(args.tracking_uri), args.no_tracking, Path(args.work_dir) / "mlflow")


def _sweep(args: argparse.Namespace) -> int:
    from orchestrator.ray_runtime import set_verbose
    from orchestrator.report import print_trials, wide_console

    if args.cluster:
        from orchestrator.cluster import load_cluster, sweep_on_cluster
        from orchestrator.space import load_space

        space = load_space(args.space)
        return sweep_on_cluster(load_cluster(args.cluster), Path(args.space), args.name or space.name)
    console = wide_console()
    set_verbose(args.verbose)
    tracking = _tracking(args)
    with tracking.server_booting():  # it boots while the space is imported and checked
        from orchestrator.space import load_space
        from orchestrator.sweep import start_sweep

        space = load_space(args.space)
        if args.name:
            space.name = args.name
        rows = start_sweep(space, Path(args.work_dir), _storage(args), tracking, args.address, console.print)
    print_trials(rows, space.objective_metric, console)
    console.print("browse the results: mode-cl ui")
    return 0


def _resume(args: argparse.Namespace) -> int:
    from orchestrator.ray_runtime import set_verbose
    from orchestrator.report import print_trials, wide_console

    if args.cluster:
        from orchestrator.cluster import load_cluster, resume_on_cluster

        return resume_on_cluster(load_cluster(args.cluster), args.sweep)
    console = wide_console()
    set_verbose(args.verbose)
    tracking = _tracking(args)
    with tracking.server_booting():  # it boots while the sweep is imported and checked
        from orchestrator.sweep import resume

        rows = resume(args.sweep, _storage(args), tracking, args.address, console.print)
    print_trials(rows, "avg_acc", console)
    return 0


def _report(args: argparse.Namespace) -> int:
    from orchestrator.report import GROUPED_FORMATS, is_results_collection, report_groups, report_trials
    from orchestrator.sweep_store import find_sweep
    from trainables.config_rules import ConfigError

    if args.recompute:
        from orchestrator.report import recompute_report

        is_path = Path(args.sweep).exists()
        return recompute_report(args.sweep if is_path else find_sweep(args.sweep, _storage(args)))
    collection = not args.cluster and is_results_collection(args.sweep)  # runs' results, always grouped
    grouping = collection or args.group_by is not None or args.baseline is not None or args.half_width is not None
    if args.format in set(GROUPED_FORMATS) - {"table", "json", "parquet"} and not grouping:
        raise ConfigError("--format", f"{args.format} is for grouped reports; add --group-by")
    if args.half_width is not None and not args.half_width > 0:
        raise ConfigError("--half-width", f"must be > 0, got {args.half_width}")
    if args.cluster:
        if grouping:
            raise ConfigError("--group-by", "grouped reports read the sweep's files: copy them from the cluster first")
        from orchestrator.cluster import load_cluster, report_on_cluster

        return report_on_cluster(load_cluster(args.cluster), args.sweep, args.format)
    directory = args.sweep if collection else find_sweep(args.sweep, _storage(args))
    if grouping:
        return report_groups(directory, args.group_by or [], args.baseline, args.half_width, args.format, args.output)
    return report_trials(directory, args.format, args.output)


def _compare(args: argparse.Namespace) -> int:
    from orchestrator.compare import compare

    by, allow = args.group_by or [], [k for group in args.allow_diff for k in group.split(",") if k]
    return compare(args.sources, _storage(args), by, args.baseline, allow, args.format, args.output)


def _ui(args: argparse.Namespace) -> int:
    from orchestrator.mlflow_server import serve_forever

    if args.cluster:
        from orchestrator.cluster import load_cluster, ui_on_cluster

        return ui_on_cluster(load_cluster(args.cluster), args.port or 5001)
    return serve_forever(Path(args.work_dir) / "mlflow", args.port or 5000)


def _gc(args: argparse.Namespace) -> int:
    from orchestrator.gc import collect
    from orchestrator.report import print_collection
    from orchestrator.sweep_store import find_sweep

    directory = find_sweep(args.sweep, _storage(args))
    print_collection(directory, collect(directory, dry_run=args.dry_run), Path(args.work_dir), args.dry_run)
    return 0


def _cluster_down(args: argparse.Namespace) -> int:
    from orchestrator.cluster import down, load_cluster

    return down(load_cluster(args.cluster))


def _tracking_server_start(args: argparse.Namespace) -> int:
    from orchestrator.mlflow_server import start_detached

    try:
        url = start_detached(args.store, args.host, args.port, args.backend_store_uri, args.artifacts_destination)
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"MLflow tracking server: {url} (store {args.store.expanduser()})")
    return 0


def _tracking_server_stop(args: argparse.Namespace) -> int:
    from orchestrator.mlflow_server import stop_detached

    print("stopped" if stop_detached(args.store) else f"no tracking server running from {args.store}")
    return 0


def _tracking_server_relay(args: argparse.Namespace) -> int:
    from orchestrator.mlflow_server import relay

    return relay(args.store, args.port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mode-cl",
        description="Continual learning of unified multimodal models with MoDE (modality-decoupled experts).",
    )
    parser.add_argument("--version", action="version", version=f"mode-cl {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("methods", help="list the continual-learning methods").set_defaults(func=_methods)

    def add_config_arguments(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("config", nargs="?", default=str(DEFAULT_RUN_CONFIG), help="run config YAML")
        sub.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
        sub.add_argument(
            "--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="data/model cache (default mode-cl-work)"
        )

    run = commands.add_parser("run", help="run one task sequence and print its forgetting metrics")
    add_config_arguments(run)
    run.add_argument("--out", help="results directory (default <work-dir>/runs/<name>)")
    run.add_argument("--name", help="run name; the same name + storage resumes (default <method>-<config hash>)")
    run.add_argument("--storage", help="Ray storage: local dir, shared FS or s3:// (default <work-dir>/ray_results)")
    run.add_argument("--address", help="join this Ray cluster (default: start a local Ray)")
    run.add_argument("--no-ray", action="store_true", help="run in this process, checkpoints under --out")
    run.add_argument(
        "--dry-run", action="store_true", help="validate, print the resource plan (no weights loaded) and exit"
    )
    run.set_defaults(func=_run)
    data = commands.add_parser("data", help="data import").add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    coin = data.add_parser("import-coin", help="CoIN instruction files / generation stream → tokenised Parquet shards")
    coin.add_argument("--model", required=True, help="checkpoint directory or Hugging Face id (its tokenizers)")
    coin.add_argument("--out", type=Path, required=True, help="output directory (re-run to resume)")
    coin.add_argument("--task", help="CoIN task name, e.g. ScienceQA (with --train and/or --test)")
    coin.add_argument("--train", type=Path, help="the task's train file (.json list or .jsonl)")
    coin.add_argument("--test", type=Path, help="the task's test file (.json list or .jsonl)")
    coin.add_argument("--generation", type=Path, help="image-generation stream (.jsonl: image_tokens or image)")
    coin.add_argument("--image-root", type=Path, help="base of relative image paths (default: the file's dir)")
    coin.add_argument("--separator-token", help="vocabulary name of the answer separator (default <reserved08706>)")
    coin.add_argument("--shard-size", type=int, default=1000, help="records per Parquet shard (default 1000)")
    coin.add_argument("--batch-size", type=int, default=16, help="images per VQ-VAE batch (default 16)")
    coin.add_argument("--gen-holdout", type=float, default=0.05, help="share of the stream held out for tests")
    coin.add_argument(
        "--stream-codes", choices=("bpe", "vq"), default="bpe", help="image_tokens are BPE ids or VQ codes"
    )
    coin.add_argument("--device", help="device for the VQ-VAE (default cuda if available)")
    coin.set_defaults(func=_import_coin)
    pretrain = commands.add_parser("pretrain-base", help="pretrain (or find cached) the tiny base Chameleon")
    add_config_arguments(pretrain)
    pretrain.set_defaults(func=_pretrain_base)

    validate = commands.add_parser("validate", help="check a sweep space without starting anything")
    validate.add_argument("space", help="sweep space YAML (e.g. search_spaces/digits_sweep.yaml)")
    validate.set_defaults(func=_validate)

    def add_sweep_arguments(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--storage", help="sweep storage: dir, shared FS or s3:// (default <work-dir>/sweeps)")
        sub.add_argument("--address", help="join this Ray cluster (default: start a local Ray)")
        sub.add_argument("--tracking-uri", help="MLflow server (default: MLFLOW_TRACKING_URI, else an embedded one)")
        sub.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
        sub.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="data/model/MLflow store")
        sub.add_argument("--cluster", type=Path, help="run the driver on the head of this `ray up` cluster")
        sub.add_argument(
            "--verbose", action="store_true", help="Ray's and the workers' log lines here (default: a table)"
        )

    sweep = commands.add_parser("sweep", help="run a Ray Tune sweep of task sequences, tracked in MLflow")
    sweep.add_argument("space", help="sweep space YAML")
    sweep.add_argument("--name", help="sweep name (default: the space's name)")
    add_sweep_arguments(sweep)
    sweep.set_defaults(func=_sweep)
    resume = commands.add_parser("resume", help="resume an interrupted sweep (errored trials continue too)")
    resume.add_argument("sweep", help="sweep name or directory")
    add_sweep_arguments(resume)
    resume.set_defaults(func=_resume)
    report = commands.add_parser("report", help="every trial of a sweep: config, final metrics, status")
    report.add_argument(
        "sweep", help="sweep name or directory, or a results collection (a .jsonl of results, a folder of results.json)"
    )
    report.add_argument("--format", choices=("table", "markdown", "latex", "csv", "json", "parquet"), default="table")
    report.add_argument("--output", help="write here (parquet default: <sweep dir>/trials.parquet or groups.parquet)")
    report.add_argument(
        "--group-by",
        nargs="*",
        metavar="KEY",
        help="mean ± 95%% t interval per group of these swept keys (none given: every swept key but seed)",
    )
    report.add_argument(
        "--baseline", metavar="KEY=VALUE", help="paired differences against this group, e.g. method.name=seq_lora"
    )
    report.add_argument("--half-width", type=float, help="also say how many runs a group needs for this CI half-width")
    report.add_argument(
        "--recompute", action="store_true", help="recompute every metric of the runs under SWEEP from their predictions"
    )
    report.add_argument("--storage", help="where the sweep was run (default <work-dir>/sweeps)")
    report.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    report.add_argument("--cluster", type=Path, help="the sweep ran on this `ray up` cluster")
    report.set_defaults(func=_report)
    compare = commands.add_parser("compare", help="one grouped table across sweeps or results collections")
    compare.add_argument("sources", nargs="+", metavar="SOURCE", help="sweep names or directories, results collections")
    compare.add_argument("--group-by", nargs="*", metavar="KEY", help="besides source (default: every varying key)")
    compare.add_argument("--baseline", metavar="KEY=VALUE", help="paired differences against this group, e.g. source=A")
    compare.add_argument(
        "--allow-diff", action="append", default=[], metavar="KEYS", help="fixed config fields allowed to differ"
    )
    compare.add_argument("--format", choices=("table", "markdown", "latex", "csv", "json", "parquet"), default="table")
    compare.add_argument("--output", help="write here (parquet default: ./groups.parquet)")
    compare.add_argument("--storage", help="where the sweeps were run (default <work-dir>/sweeps)")
    compare.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    compare.set_defaults(func=_compare)
    ui = commands.add_parser("ui", help="the MLflow UI for this project's store, on 127.0.0.1")
    ui.add_argument("--port", type=int, help="local port (default 5000; 5001 with --cluster)")
    ui.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    ui.add_argument("--cluster", type=Path, help="forward the MLflow UI of this `ray up` cluster's head")
    ui.set_defaults(func=_ui)
    gc = commands.add_parser("gc", help="remove checkpoints of a sweep's finished trials (keeps each final one)")
    gc.add_argument("sweep", help="sweep name or directory")
    gc.add_argument("--storage", help="where the sweep was run (default <work-dir>/sweeps)")
    gc.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    gc.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    gc.set_defaults(func=_gc)
    down = commands.add_parser("cluster-down", help="stop a `ray up` cluster's services and tear it down")
    down.add_argument("cluster", type=Path, help="the cluster YAML given to `ray up`")
    down.set_defaults(func=_cluster_down)

    server = commands.add_parser("tracking-server", help="the MLflow server of a cluster head (used by cluster files)")
    server_commands = server.add_subparsers(dest="server_command", metavar="ACTION", required=True)
    start = server_commands.add_parser("start", help="start a detached server (reused if already running)")
    start.add_argument("--store", type=Path, required=True, help="directory: SQLite db, artifacts, pid, log")
    start.add_argument("--host", default="127.0.0.1", help="address to bind: 127.0.0.1, a private IP, or auto")
    start.add_argument("--port", type=int, default=5000)
    start.add_argument("--backend-store-uri", help="e.g. postgresql://host/db (default SQLite in --store)")
    start.add_argument("--artifacts-destination", help="e.g. s3://bucket/mlflow (default --store/artifacts)")
    start.set_defaults(func=_tracking_server_start)
    stop = server_commands.add_parser("stop", help="stop the server started from --store")
    stop.add_argument("--store", type=Path, required=True)
    stop.set_defaults(func=_tracking_server_stop)
    relay = server_commands.add_parser("relay", help="relay 127.0.0.1:PORT to the server (for ui --cluster)")
    relay.add_argument("--store", type=Path, required=True)
    relay.add_argument("--port", type=int, required=True)
    relay.set_defaults(func=_tracking_server_relay)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # peft 0.21 reads a transformers property deprecated in 5.x; the warning is not actionable for users.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_USAGE
    if not (getattr(args, "address", None) or getattr(args, "cluster", None) or getattr(args, "no_ray", False)):
        from orchestrator.ray_runtime import prefer_loopback

        prefer_loopback()  # a Ray this command starts listens on loopback only
    previous = stopping.install()  # SIGTERM, SIGINT and SIGHUP stop the command: orchestrator/stopping.py
    try:
        code = args.func(args)
    except UserError as error:  # bad input: one line; anything else is a bug and keeps its traceback
        print(f"mode-cl: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # a stopping signal: what this command started is stopped by now
        stopping.stopped_by.append(stopping.received() or signal.SIGINT)
        code = 0
    finally:
        stopping.restore(previous)
    if stopping.received():  # also when Ray Tune took the signal and ended the sweep itself
        print(f"mode-cl: stopped by {signal.Signals(stopping.received()).name}", file=sys.stderr)
        return 128 + stopping.received()
    return code


if __name__ == "__main__":
    sys.exit(main())
