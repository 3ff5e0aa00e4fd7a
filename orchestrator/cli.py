"""The ``mode-cl`` command line. Subcommands parse and validate their input, then call library code.

mode-cl --version
mode-cl methods          # the continual-learning methods and what they train
mode-cl demo             # every method trains briefly on the tiny Chameleon; checks MoDE's invariants
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

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


def _demo(args: argparse.Namespace) -> int:
    from orchestrator.demo import run_demo

    return run_demo(steps=args.steps, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mode-cl",
        description="Continual learning of unified multimodal models with MoDE (modality-decoupled experts).",
    )
    parser.add_argument("--version", action="version", version=f"mode-cl {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("methods", help="list the continual-learning methods").set_defaults(func=_methods)
    demo = commands.add_parser("demo", help="train every method briefly on the tiny Chameleon and check MoDE")
    demo.add_argument("--steps", type=int, default=30, help="optimisation steps per method (default 30)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # peft 0.21 reads a transformers property deprecated in 5.x; the warning is not actionable for users.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_USAGE
    if getattr(args, "steps", 1) <= 0:
        parser.error("--steps must be a positive integer")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
