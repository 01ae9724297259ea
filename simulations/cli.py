"""The ``fedgraft`` command line: simulate, centralized, predict, keys, site-keys.

Configuration comes from the embedded defaults, then a TOML file (``--config``), then
``--set key=value`` overrides, all with the flat kebab-case keys of
``[tool.flwr.app.config]``. Everything is validated before anything runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.backbone import BackboneError, coordinator_backbone_dir
from common.config import DEFAULTS, ConfigError, RunConfig, load_config
from common.console import configure_console
from common.data import DataError, Example, untrained_labels
from common.outputs import SUMMARY_FILE, default_output_dir
from common.secagg.encoding import HeadroomError, round_encoding
from common.secagg.identity import IdentityError, write_site_keys
from common.splits import (
    all_client_examples,
    default_num_clients,
    describe_sizes,
    evaluation_examples,
    falls_back_to_iid,
    pools,
    run_labels,
)
from common.tasks import TASK_FILE, TASKS, Task, read_task, task_named
from server.checkpoint import CheckpointError, load_checkpoint
from simulations.export import ExportError

log = logging.getLogger("fedgraft")


def check_data(config: RunConfig) -> int:
    """Read and split the data, find the backbone and check the label map before
    any engine starts; return the client count.

    Raises
    ------
    DataError
        For a missing or malformed file, an empty client, a training or test label
        outside the label map, or an unreadable ``head.label-descriptions`` file.
    BackboneError
        When ``model.name`` names no backbone this machine holds.
    HeadroomError
        When secure aggregation's fixed point cannot fit this many clients.
    """
    coordinator_backbone_dir(config.model.name)
    task = task_named(config.model.task)
    task.check_simulation_data(config.data)
    if falls_back_to_iid(config.data, pools(config.data, config.seed).train):
        log.warning(
            "data.partition = %s (the default) but no row of %s has that column: "
            "its rows are split iid over sim.num-clients = %d clients. Set "
            "data.partition (iid, dirichlet or column:<name>) to choose",
            config.data.partition,
            config.data.path,
            config.sim.num_clients,
        )
    num_clients = default_num_clients(config.data, config.seed, config.sim.num_clients)
    clients = all_client_examples(config.data, config.seed, num_clients)
    labels = run_labels(config.data, config.seed)
    if task.has_labels:  # a language model's rows have none to check
        evaluation = evaluation_examples(config.data, config.seed)
        task.check_rows(config, labels, [*clients, evaluation])
        _warn_of_untrained_labels(evaluation, clients)
    if config.secagg.enabled:
        round_encoding(
            num_clients,
            config.secagg.clip_norm,
            config.secagg.max_weight,
            config.codec.secure_ring_bits,
        )
    log.info(
        "%d clients with %s rows; %d labels",
        num_clients,
        describe_sizes(clients),
        len(labels),
    )
    return num_clients


def _warn_of_untrained_labels(
    evaluation: Sequence[Example], clients: Sequence[Sequence[Example]]
) -> None:
    """Warn of evaluation labels no client trains on, naming where each is."""
    untrained = untrained_labels(evaluation, (e for rows in clients for e in rows))
    if untrained:
        shown = [f"'{label}' ({where})" for label, where in untrained.items()]
        log.warning(
            "%d label(s) appear only in the evaluation rows, in no client's "
            "training rows: %s. No client can learn them, so their rows count as "
            "errors; add training rows with them, or drop those evaluation rows",
            len(untrained),
            ", ".join(shown[:10]) + (" ..." if len(shown) > 10 else ""),
        )


def _prepare_environment(output_dir: Path) -> None:
    os.environ.setdefault("FLWR_HOME", str(output_dir / ".flwr"))
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault(
        "RAY_TMPDIR", str(Path("/tmp") / f"fedgraft-ray-{os.getuid()}")
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.pop("RAY_ADDRESS", None)


def simulate(config: RunConfig) -> Path:
    """Run a federated simulation on Flower's Simulation Engine (Ray).

    Returns
    -------
    Path
        The output folder.
    """
    from flwr.simulation import run_simulation

    from client.client_app import app as client_app
    from server.server_app import build_server_app

    num_clients = check_data(config)
    output_dir = (
        Path(config.output_dir)
        if config.output_dir
        else default_output_dir("federated")
    ).resolve()
    config = config.with_overrides(
        **{"output.dir": str(output_dir), "sim.num-clients": num_clients}
    )
    _prepare_environment(output_dir)
    run_simulation(
        server_app=build_server_app(config),
        client_app=client_app,
        num_supernodes=num_clients,
        backend_config={
            "client_resources": {
                "num_cpus": config.sim.cpus_per_client,
                "num_gpus": config.sim.gpus_per_client,
            }
        },
    )
    if not (output_dir / SUMMARY_FILE).exists():
        raise RuntimeError(
            f"the simulation ended without writing {output_dir / SUMMARY_FILE}; "
            "see the log above"
        )
    if config.sim.local_baseline:
        compare_with_local_training(config, output_dir)
    return output_dir


def compare_with_local_training(config: RunConfig, output_dir: Path) -> None:
    """Train each client alone (:func:`simulations.baselines.local_only`), add the
    results to the run's ``summary.json`` as ``local_baseline`` and print them beside
    the run's headline metric (``eval_perplexity`` for a causal language model,
    ``eval_accuracy`` otherwise)."""
    from common.reporting import main_metric
    from simulations.baselines import local_only, local_only_summary

    summary_path = output_dir / SUMMARY_FILE
    summary = json.loads(summary_path.read_text())
    alone = local_only(config)
    stats = local_only_summary(alone)
    name, federated = main_metric(summary["final"])
    summary["local_baseline"] = {
        "clients": alone,
        # best_accuracy, or best_perplexity: what `fedgraft inspect` shows
        f"best_{name.removeprefix('eval_')}": stats[f"best_{name}"],
        **stats,
    }
    summary_path.write_text(json.dumps(summary, indent=2, sort_keys=True))
    own = (
        f"on their own domains: mean {stats['mean_own_domain_accuracy']:.4f}, worst "
        f"{stats['worst_own_domain_accuracy']:.4f}; "
        if "mean_own_domain_accuracy" in stats
        else ""
    )
    print(
        f"\nfederated {name} {federated:.4f} vs clients trained alone on the same "
        f"rows: best {stats[f'best_{name}']:.4f}, mean {stats[f'mean_{name}']:.4f}, "
        f"worst {stats[f'worst_{name}']:.4f} ({own}{len(alone)} clients)"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedgraft", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also print library warnings, Flower's DEBUG lines and progress bars",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("simulate", "federated simulation of several clients on one machine"),
        ("centralized", "the same config as one centralised run (the baseline)"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument(
            "--config", help="TOML file with flat keys (see `fedgraft keys`)"
        )
        command.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override one key (repeatable)",
        )
        if name == "simulate":
            command.add_argument(
                "--resume",
                metavar="DIR",
                help="continue the run in DIR from its last complete round",
            )
    predict = commands.add_parser(
        "predict", help="classify texts with a merged/ folder or an export"
    )
    predict.add_argument("model_dir", help="a run's merged/ folder or an export")
    predict.add_argument("texts", nargs="+", help="texts, or image files (image-cls)")
    generate = commands.add_parser(
        "generate", help="continue a prompt with a causal-lm run's merged model"
    )
    generate.add_argument("model_dir", help="a causal-lm run, its merged/ or export")
    generate.add_argument("prompt")
    generate.add_argument("--max-new-tokens", type=int, default=32)
    demo = commands.add_parser(
        "make-task-demo",
        help="write tiny offline backbones and data for the causal-lm and image-cls "
        "demo configs",
    )
    demo.add_argument("out_dir", nargs="?", default="runs/task-demo")
    export = commands.add_parser("export", help="write a run's merged model elsewhere")
    export.add_argument("run_dir", help="a run's output.dir (or its merged/ folder)")
    export.add_argument("--format", choices=("hf", "onnx"), default="hf")
    export.add_argument("--out", required=True, help="folder to write")
    for name, help_text in (
        ("inspect", "print a run's config, per-round table and totals"),
        ("report", "write PNG plots of a run into DIR/report/"),
    ):
        commands.add_parser(name, help=help_text).add_argument("run_dir")
    keys = commands.add_parser(
        "keys", help="every config key with its default, ready to paste"
    )
    keys.add_argument(
        "--format",
        choices=("toml", "set"),
        default="toml",
        help="toml: lines of a --config file; set: --set options",
    )
    site_keys = commands.add_parser(
        "site-keys",
        help="make a site's Ed25519 signing key for secagg.mode = malicious and "
        "print its roster line and node config",
    )
    site_keys.add_argument("name", help="the site's name in the roster")
    site_keys.add_argument("--out", required=True, help="folder for the key pair")
    site_keys.add_argument(
        "--roster",
        help="roster file the site will read (default OUT/roster.txt); the line is "
        "appended to it when given",
    )
    return parser


def toml_value(value: Any) -> str:
    """``value`` as a TOML literal (bool, int, float or basic string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a TOML basic string


def keys_listing(style: str) -> list[str]:
    """Every key with its default, as lines to paste: ``toml`` for a ``--config``
    file (flat quoted keys), ``set`` for ``--set`` options."""
    if style == "set":
        return [
            f"--set {key}={value if isinstance(value, str) else toml_value(value)}"
            for key, value in DEFAULTS.items()
        ]
    return [
        "# every fedgraft key with its default; paste into a --config file",
        *(f'"{key}" = {toml_value(value)}' for key, value in DEFAULTS.items()),
    ]


def _keys(arguments: argparse.Namespace) -> None:
    print("\n".join(keys_listing(arguments.format)))


def _site_keys(arguments: argparse.Namespace) -> None:
    private, public = write_site_keys(arguments.name, Path(arguments.out).resolve())
    line = public.read_text().strip()
    roster = Path(arguments.roster or Path(arguments.out) / "roster.txt").resolve()
    if arguments.roster:
        with roster.open("a") as stream:
            stream.write(line + "\n")
    print(f"# {private}: the site's private key; it never leaves the site")
    print("# roster line (every site's roster lists every site, this one included):")
    print(line)
    print("# node config of this site (flower-supernode --node-config):")
    print(f'secagg-signing-key="{private}" secagg-roster="{roster}"')


def _saved_task(folder: Path) -> Task:
    """The task that wrote the saved model in ``folder``.

    Raises
    ------
    ExportError
        When its task file names no known task.
    """
    name = read_task(folder)
    if name not in TASKS:
        raise ExportError(
            f"{folder / TASK_FILE}: task {name!r} is not one of {', '.join(TASKS)}"
        )
    return TASKS[name]


def _predict(arguments: argparse.Namespace) -> None:
    task = _saved_task(Path(arguments.model_dir))
    classifier = task.open_classifier(Path(arguments.model_dir))
    if classifier is None:
        raise ExportError(
            f"{arguments.model_dir} is {task.noun}; use "
            "`fedgraft generate DIR PROMPT`"
        )
    predictions = classifier.predict(arguments.texts)
    for text, (label, probability) in zip(arguments.texts, predictions, strict=True):
        print(f"{label}\t{probability:.3f}\t{text}")


def _generate(arguments: argparse.Namespace) -> None:
    from common.tasks.causal_lm.model import generate
    from simulations.export import merged_dir

    folder = merged_dir(Path(arguments.model_dir))
    task = _saved_task(folder)
    if not task.generates:
        raise ExportError(
            f"{folder} holds a {task.name} model; `generate` needs a "
            f"{' or '.join(t.name for t in TASKS.values() if t.generates)} run "
            "(`fedgraft predict` classifies)"
        )
    if arguments.max_new_tokens < 1:
        raise ExportError("--max-new-tokens must be at least 1")
    print(generate(folder, arguments.prompt, arguments.max_new_tokens))


def _make_task_demo(arguments: argparse.Namespace) -> None:
    from simulations.task_demo import write_task_demo

    for name, path in write_task_demo(Path(arguments.out_dir)).items():
        print(f"{name}\t{path}")


def _export(arguments: argparse.Namespace) -> None:
    from simulations.export import export_run

    out = export_run(Path(arguments.run_dir), arguments.format, Path(arguments.out))
    print(f"exported ({arguments.format}): {out}")


def _inspect(arguments: argparse.Namespace) -> None:
    from rich.console import Console

    from simulations.inspection import inspect_run

    inspect_run(Path(arguments.run_dir), Console(width=120))


def _report(arguments: argparse.Namespace) -> None:
    from rich.console import Console

    from simulations.cross_site import cross_site_table
    from simulations.inspection import read_run_metrics
    from simulations.report import write_report

    for path in write_report(Path(arguments.run_dir)):
        print(path)
    sites = cross_site_table(read_run_metrics(Path(arguments.run_dir)))
    if sites is not None:
        Console(width=120).print(sites)


def _train(arguments: argparse.Namespace) -> None:
    if getattr(arguments, "resume", None):
        saved = load_checkpoint(Path(arguments.resume)).config
        resume = {"output.dir": str(Path(arguments.resume).resolve()), "resume": "true"}
        config = load_config(arguments.config, arguments.set, base={**saved, **resume})
    else:
        config = load_config(arguments.config, arguments.set)
    if arguments.command == "simulate":
        print(f"outputs: {simulate(config)}")
    else:
        from simulations.baselines import train_centralized

        check_data(config)
        print(f"outputs: {train_centralized(config)}")


_COMMANDS = {
    "keys": _keys,
    "site-keys": _site_keys,
    "predict": _predict,
    "generate": _generate,
    "make-task-demo": _make_task_demo,
    "export": _export,
    "inspect": _inspect,
    "report": _report,
    "simulate": _train,
    "centralized": _train,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedgraft`` console script."""
    arguments = _parser().parse_args(argv)
    configure_console(arguments.verbose)
    try:
        _COMMANDS[arguments.command](arguments)
    except (
        ConfigError,
        DataError,
        BackboneError,
        HeadroomError,
        CheckpointError,
        ExportError,
        IdentityError,
        FileNotFoundError,
    ) as error:
        print(f"fedgraft: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
