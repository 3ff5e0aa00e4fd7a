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
    from rich.console import Console

    from orchestrator.report import print_results

    config = _load_config(args)
    work_dir = Path(args.work_dir).resolve()
    name = args.name or f"{config.method.name}-{config.config_hash()}"
    out = Path(args.out) if args.out else work_dir / "runs" / name
    console = Console()
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
