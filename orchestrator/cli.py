"""The ``mode-cl`` command line. Subcommands parse and validate their input, then call library code.

mode-cl --version
mode-cl methods                          # the continual-learning methods
mode-cl pretrain-base [CONFIG]           # build (or find cached) the tiny base model
mode-cl run [CONFIG] [--set k=v] [--name N] [--storage S] [--address A] [--out DIR] [--no-ray]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from trainables import __version__

EXIT_USAGE = 2


def _methods(_: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from trainables.methods import METHODS

    table = Table(title="methods")
    table.add_column("name")
    table.add_column("description")
    for name, cls in METHODS.items():
        table.add_row(name, (cls.__doc__ or "").strip().splitlines()[0])
    Console().print(table)
    return 0


DEFAULT_RUN_CONFIG = Path(__file__).resolve().parent.parent / "search_spaces" / "digits.yaml"
DEFAULT_WORK_DIR = Path("mode-cl-work")


def _load_config(args: argparse.Namespace):
    from trainables.config import ConfigError, load_run_config

    try:
        return load_run_config(args.config, args.set or [])
    except ConfigError as error:
        raise UsageError(str(error)) from None


def _run(args: argparse.Namespace) -> int:
    from orchestrator.report import print_results, wide_console

    config = _load_config(args)
    work_dir = Path(args.work_dir).resolve()
    name = args.name or f"{config.method.name}-{config.config_hash()}"
    out = Path(args.out) if args.out else work_dir / "runs" / name
    console = wide_console()
    path = "in-process" if args.no_ray else "Ray Train"
    console.print(
        f"[bold]mode-cl run[/] ({path}): method {config.method.name}, tasks {list(config.tasks)}, seed {config.seed}"
    )
    if args.no_ray:
        from trainables.engine import run_sequence

        results = run_sequence(config, work_dir, out, log=console.print)
    else:
        from orchestrator.train import run_with_ray

        storage = args.storage or str(work_dir / "ray_results")
        results = run_with_ray(config, work_dir, out, name, storage, args.address, log=console.print)
    print_results(results, console)
    console.print(f"results: {out / 'results.json'}")
    return 0


def _pretrain_base(args: argparse.Namespace) -> int:
    from trainables.base_model import pretrain_base
    from trainables.engine import prepare_data

    config = _load_config(args)
    directory = pretrain_base(config.base, config.data, prepare_data(config, args.work_dir), args.work_dir)
    print(f"base model: {directory}")
    return 0


def _space(path: str):
    from orchestrator.space import load_space
    from trainables.config import ConfigError

    try:
        return load_space(path)
    except ConfigError as error:
        raise UsageError(str(error)) from None


def _validate(args: argparse.Namespace) -> int:
    space = _space(args.space)
    print(
        f"{args.space}: ok — {space.size} trials ({space.search}, {space.scheduler['type']}), objective "
        f"{space.objective_mode} {space.objective_metric}, {space.max_concurrent_trials} at a time"
    )
    return 0


def _storage(args: argparse.Namespace) -> str:
    return args.storage or str((Path(args.work_dir) / "sweeps").resolve())


def _with_tracking(args: argparse.Namespace, body) -> int:
    from orchestrator.mlflow_server import resolve_tracking_uri, tracking_server
    from orchestrator.report import wide_console

    console = wide_console()
    uri = resolve_tracking_uri(args.tracking_uri)
    if args.no_tracking:
        return body(None, console)
    if uri:
        return body(uri, console)
    with tracking_server(Path(args.work_dir) / "mlflow", log=console.print) as local_uri:
        return body(local_uri, console)


def _sweep(args: argparse.Namespace) -> int:
    from orchestrator.report import print_trials
    from orchestrator.sweep import run_sweep

    space = _space(args.space)
    if args.name:
        space.name = args.name

    def body(uri, console):
        try:
            rows = run_sweep(space, Path(args.work_dir), _storage(args), uri, args.address, console.print)
        except ValueError as error:
            raise UsageError(str(error)) from None
        print_trials(rows, space.objective_metric, console)
        console.print("browse the results: mode-cl ui")
        return 0

    return _with_tracking(args, body)


def _resume(args: argparse.Namespace) -> int:
    from orchestrator.report import print_trials
    from orchestrator.sweep import resume_sweep

    def body(uri, console):
        try:
            rows = resume_sweep(args.sweep, _storage(args), uri, args.address, console.print)
        except ValueError as error:
            raise UsageError(str(error)) from None
        print_trials(rows, "avg_acc", console)
        return 0

    return _with_tracking(args, body)


def _report(args: argparse.Namespace) -> int:
    from orchestrator.report import report_trials
    from orchestrator.sweep import SWEEP_FILE, sweep_dir

    directory = sweep_dir(args.sweep, _storage(args))
    if not (directory / SWEEP_FILE).is_file():
        raise UsageError(f"no sweep at {directory}: check the name, or pass --storage where it was run")
    return report_trials(directory, args.format, args.output)


def _ui(args: argparse.Namespace) -> int:
    from orchestrator.mlflow_server import serve_forever

    return serve_forever(Path(args.work_dir) / "mlflow", args.port)


class UsageError(Exception):
    """Bad user input: printed as one line, exit code 2."""


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
    run.set_defaults(func=_run)
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
    report.add_argument("sweep", help="sweep name or directory")
    report.add_argument("--format", choices=("table", "json", "parquet"), default="table")
    report.add_argument("--output", help="file for parquet (default <sweep dir>/trials.parquet)")
    report.add_argument("--storage", help="where the sweep was run (default <work-dir>/sweeps)")
    report.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    report.set_defaults(func=_report)
    ui = commands.add_parser("ui", help="the MLflow UI for this project's store, on 127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    ui.set_defaults(func=_ui)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # peft 0.21 reads a transformers property deprecated in 5.x; the warning is not actionable for users.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args)
    except UsageError as error:
        print(f"mode-cl: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
