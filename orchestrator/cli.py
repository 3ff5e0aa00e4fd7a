"""The ``mode-cl`` command line. Subcommands parse and validate their input, then call library code.

mode-cl --version
mode-cl methods                          # the continual-learning methods
mode-cl pretrain-base [CONFIG]           # build (or find cached) the tiny base model
mode-cl run [CONFIG] [--set k=v] [--name N] [--storage S] [--address A] [--out DIR] [--no-ray] [--dry-run]
mode-cl data import-coin --model M --out DIR [--task NAME --train F --test F]... [--generation F]
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
    if args.dry_run:
        return _dry_run(config)
    if config.coin is not None:
        _check_coin_inputs(config)
    work_dir = Path(args.work_dir).resolve()
    name = args.name or f"{config.method.name}-{config.config_hash()}"
    out = Path(args.out) if args.out else work_dir / "runs" / name
    console = wide_console()
    path = "in-process" if args.no_ray else "Ray Train"
    console.print(
        f"[bold]mode-cl run[/] ({path}): method {config.method.name}, tasks {list(config.tasks)}, seed {config.seed}"
    )
    storage = args.storage or str(work_dir / "ray_results")
    existing = out / "checkpoints" if args.no_ray else (Path(storage) / name if "://" not in storage else None)
    _refuse_changed_config(existing, config, name)
    if args.no_ray:
        from trainables.engine import run_sequence

        results = run_sequence(config, work_dir, out, log=console.print)
    else:
        from orchestrator.train import run_with_ray

        results = run_with_ray(config, work_dir, out, name, storage, args.address, log=console.print)
    print_results(results, console)
    console.print(f"results: {out / 'results.json'}")
    return 0


def _refuse_changed_config(checkpoints: Path | None, config, name: str) -> None:
    """Resuming a run whose stored config differs would mix two experiments: refuse, with the diff."""
    import json

    from trainables.checkpoint import list_checkpoints
    from trainables.config import config_diff

    for directory in reversed(list_checkpoints(checkpoints) if checkpoints else []):
        try:
            stored = json.loads((directory / "state.json").read_text())
        except (OSError, ValueError):
            continue
        if stored.get("config_hash") != config.config_hash():
            raise UsageError(
                f"run {name!r} already exists with a different config "
                f"({config_diff(stored['config'], config.to_dict())}); "
                "rerun it unchanged to resume, or pick another --name/--out"
            )
        return


def _coin_errors():
    from trainables.chameleon import ModelSourceError
    from trainables.data.coin import CoinInputError

    return (ModelSourceError, CoinInputError)


def _check_coin_inputs(config) -> None:
    """Fail before anything starts (one line, exit 2) if the model or the imported data are unusable."""
    from transformers import ChameleonConfig

    from trainables.chameleon import resolve_model_dir
    from trainables.coin_eval import CoinBenchmark

    try:
        model_config = ChameleonConfig.from_pretrained(resolve_model_dir(config.coin.model, "coin.model"))
        CoinBenchmark(config, model_config, log=lambda message: None)
    except _coin_errors() as error:
        raise UsageError(str(error)) from None


def _dry_run(config) -> int:
    from rich.table import Table

    from orchestrator.report import wide_console
    from trainables.plan import resource_plan

    try:
        plan = resource_plan(config)
    except _coin_errors() as error:
        raise UsageError(str(error)) from None
    console = wide_console()
    table = Table(title=f"resource plan: method {config.method.name}, tasks {list(config.tasks)} (no weights loaded)")
    table.add_column("item")
    table.add_column("value", overflow="fold")
    table.add_row("model shape from", plan["model_source"])
    table.add_row("base parameters", f"{plan['base_params']:,} (VQ-VAE {plan['vq_params']:,}), {plan['dtype']}")
    table.add_row("adapter parameters", f"{plan['adapter_params']:,} ({100 * plan['adapter_share']:.2f} % of base)")
    table.add_row(
        "batch",
        f"global {plan['global_batch']} = {plan['workers']} worker(s) × {plan['micro_batch_per_worker']}, "
        f"max length {plan['max_length']}, gradient checkpointing {'on' if plan['gradient_checkpointing'] else 'off'}",
    )
    memory = plan["memory_gib_per_worker"]
    parts = ", ".join(f"{name} {value:.1f}" for name, value in memory.items() if name != "total")
    table.add_row("GPU memory per worker (estimate)", f"{memory['total']:.1f} GiB ({parts} GiB)")
    steps = ", ".join(
        f"{task} {n if n is not None else '? (not imported yet)'}" for task, n in plan["steps_per_task"].items()
    )
    table.add_row("steps per task", steps)
    console.print(table)
    console.print(f"config ok (hash {config.config_hash()}); nothing was started")
    return 0


def _import_coin(args: argparse.Namespace) -> int:
    from trainables.data.coin import TaskFiles, import_coin

    if (args.train or args.test) and not args.task:
        raise UsageError("--train/--test need --task NAME (e.g. --task ScienceQA); import one task per call")
    tasks = [TaskFiles(args.task, args.train, args.test)] if args.task else []
    try:
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
    except _coin_errors() as error:
        raise UsageError(str(error)) from None
    for split, written in result["shards_written"].items():
        print(f"{split}: {written} shard(s) written")
    print(f"imported into {args.out} (manifest.json lists every task and split)")
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


def _with_tracking(args: argparse.Namespace, body, prepare=None, on_ready=None) -> int:
    """Run ``body(tracking_uri, console)`` with the embedded MLflow server unless one is configured.
    Ray starts, then ``prepare(tracking_uri, console)`` runs (work that needs Ray but not yet the
    server), while the server boots. With ``on_ready(tracking_uri)``, ``body`` does not wait for
    the server: ``on_ready`` is called once it answers (directly, for a configured server)."""
    from orchestrator.mlflow_server import resolve_tracking_uri, tracking_server
    from orchestrator.report import wide_console
    from orchestrator.train import init_ray

    console = wide_console()
    uri = resolve_tracking_uri(args.tracking_uri)

    def start(tracking_uri: str | None) -> None:
        init_ray(args.address)
        if prepare is not None:
            prepare(tracking_uri, console)

    if args.no_tracking or uri:
        uri = None if args.no_tracking else uri
        if prepare is not None:
            start(uri)
        if on_ready is not None and uri:
            on_ready(uri)
        return body(uri, console)
    store = Path(args.work_dir) / "mlflow"
    with tracking_server(store, log=console.print, while_starting=start, on_ready=on_ready) as local_uri:
        return body(local_uri, console)


def _sweep(args: argparse.Namespace) -> int:
    from orchestrator.report import print_trials
    from orchestrator.sweep import check_new_sweep, run_sweep

    space = _space(args.space)
    if args.name:
        space.name = args.name
    if args.cluster:
        from orchestrator.cluster import ClusterError, sweep_on_cluster

        try:
            return sweep_on_cluster(_cluster(args.cluster), Path(args.space), space.name)
        except ClusterError as error:
            raise UsageError(str(error)) from None
    try:  # before anything starts
        check_new_sweep(space.name, _storage(args))
    except ValueError as error:
        raise UsageError(str(error)) from None

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
    from orchestrator.sweep import check_resumable, parent_run_reopener, restore_sweep, resume_sweep

    if args.cluster:
        from orchestrator.cluster import resume_on_cluster

        return resume_on_cluster(_cluster(args.cluster), args.sweep)
    try:  # before anything starts
        check_resumable(args.sweep, _storage(args))
    except ValueError as error:
        raise UsageError(str(error)) from None

    restored = {}

    def prepare(uri, console):  # Tune's restore of the experiment state, while MLflow boots
        try:
            restored["sweep"] = restore_sweep(args.sweep, _storage(args), uri, console.print)
        except ValueError as error:
            raise UsageError(str(error)) from None
        restored["reopen_parent"] = parent_run_reopener(restored["sweep"], uri)  # imports MLflow here

    def body(uri, console):
        rows = resume_sweep(restored["sweep"], uri, console.print)
        print_trials(rows, "avg_acc", console)
        return 0

    def on_ready(uri):  # the parent run goes back to RUNNING once the server answers
        restored["reopen_parent"]()

    return _with_tracking(args, body, prepare, on_ready)


def _report(args: argparse.Namespace) -> int:
    from orchestrator.report import report_trials
    from orchestrator.sweep import SWEEP_FILE, sweep_dir

    if args.cluster:
        from orchestrator.cluster import report_on_cluster

        return report_on_cluster(_cluster(args.cluster), args.sweep, args.format)
    directory = sweep_dir(args.sweep, _storage(args))
    if not (directory / SWEEP_FILE).is_file():
        raise UsageError(f"no sweep at {directory}: check the name, or pass --storage where it was run")
    return report_trials(directory, args.format, args.output)


def _ui(args: argparse.Namespace) -> int:
    from orchestrator.mlflow_server import serve_forever

    if args.cluster:
        from orchestrator.cluster import ui_on_cluster

        return ui_on_cluster(_cluster(args.cluster), args.port or 5001)
    return serve_forever(Path(args.work_dir) / "mlflow", args.port or 5000)


def _gc(args: argparse.Namespace) -> int:
    from rich.table import Table

    from orchestrator.gc import collect, tree_size
    from orchestrator.report import wide_console
    from orchestrator.sweep import SWEEP_FILE, sweep_dir

    directory = sweep_dir(args.sweep, _storage(args))
    if not (directory / SWEEP_FILE).is_file():
        raise UsageError(f"no sweep at {directory}: check the name, or pass --storage where it was run")
    before = tree_size(directory)
    result = collect(directory, dry_run=args.dry_run)
    console = wide_console()
    verb = "would remove" if args.dry_run else "removed"
    console.print(
        f"{len(result.finished)} finished trial(s): {verb} {len(result.removed)} checkpoint(s), "
        f"{result.freed_bytes / 2**20:.1f} MiB; {len(result.unfinished)} unfinished trial(s) left as they are"
    )
    work_dir = Path(args.work_dir)
    table = Table(title="disk footprint")
    table.add_column("what")
    table.add_column("MiB", justify="right")
    after = before - (0 if args.dry_run else result.freed_bytes)
    table.add_row(f"sweep {directory.name} (Tune/Train state, checkpoints)", f"{after / 2**20:.1f}")
    for name, what in (("mlflow", "MLflow store (all sweeps)"), ("base", "base models"), ("data", "task data"),
                       ("teacher_cache", "teacher caches")):  # fmt: skip
        table.add_row(f"{what}: {work_dir / name}", f"{tree_size(work_dir / name) / 2**20:.1f}")
    console.print(table)
    return 0


def _cluster(path: Path):
    from orchestrator.cluster import ClusterError, load_cluster

    try:
        return load_cluster(path)
    except ClusterError as error:
        raise UsageError(str(error)) from None


def _cluster_down(args: argparse.Namespace) -> int:
    from orchestrator.cluster import down

    return down(_cluster(args.cluster))


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
    report.add_argument("--cluster", type=Path, help="the sweep ran on this `ray up` cluster")
    report.set_defaults(func=_report)
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
    try:
        return args.func(args)
    except UsageError as error:
        print(f"mode-cl: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
