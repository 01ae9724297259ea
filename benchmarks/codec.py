"""What each delta codec costs on the wire and in accuracy, on a non-IID split.

Method: every codec (``fp32``, ``fp16``, ``bf16``, ``int8``, ``int4``, ``topk``) runs
the same federation: CLINC150 (``../shared/data/clinc150/train.jsonl``, tested on
``test.jsonl``) split over ``--num-clients`` sites by a Dirichlet label skew
(``data.partition = dirichlet``, ``data.dirichlet-alpha = 0.1``), FedAvg, the same
seed, rounds, local epochs and step cap. Each run goes through the real coordinator
(``server.server_app.coordinate``) and ClientApp over
``simulations.inprocess_grid.InProcessGrid``, which hands each message to the
ClientApp in this process (no Ray start-up per run). The ``fp32`` run goes first (it
is added when ``--codecs`` leaves it out): it is the reference for the accuracy drop.

Bytes are the coordinator's own counts (``bytes_up`` / ``bytes_down`` of
``metrics.jsonl``: the serialised size of the adapter records, names and array
headers included), divided by the number of training replies (up; masked uploads
included) and training messages (down) the grid carried; a site that first lacked the
backbone receives round 1's message twice, and both are counted.
``uplink_reduction_vs_full_model`` compares one upload with sending the whole backbone
in float32 (``summary.json``'s ``backbone.float32_bytes``). ``topk`` sends its
downlink in float32 (clients are stateless; a sparse model is not a model), ``int4``
in int8, and ``int8`` quantises the downlink too.

Behind secure aggregation (``--secure-codecs``, default ``fp32,int8``; each row has
``secure: true``) the upload is the masked fixed-point vector: 32-bit words for
``fp32``, 16-bit words of a rotated delta for the quantising codecs (README, "Compressed
uploads behind secure aggregation"), with ``secagg.max-weight`` set by
``--secagg-max-weight``.

Output: one JSON object per codec on stdout (``codec``, ``bytes_up_per_client_round``,
``bytes_down_per_client_round``, ``uplink_reduction_vs_full_model``, ``accuracy``,
``accuracy_drop_vs_fp32``, ``wall_seconds``, ``command`` and a few more); the runs'
own tables go to stderr. Run from the repository root::

    python benchmarks/codec.py --quick
    python benchmarks/codec.py --rounds 3 --max-steps 20 --num-clients 20

``--quick`` uses the built-in demo corpus (``data.path = ""``), 4 sites, 2 rounds and
one local epoch: a smoke test of the harness, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import data_settings, run_federation  # noqa: E402  (this folder)

from common.config import CODECS as ALL_CODECS  # noqa: E402

log = logging.getLogger("benchmarks.codec")


def base_config(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The settings every codec's run shares (data, split, budget)."""
    return {
        **data_settings(args.quick, args.test_per_label, out),
        "data.partition": "dirichlet",
        "data.dirichlet-alpha": 0.1,
        "sim.num-clients": args.num_clients,
        "sim.local-baseline": False,
        "num-server-rounds": args.rounds,
        "train.local-epochs": 1,
        "train.max-steps": args.max_steps,
        "train.batch-size": args.batch_size,
        "train.lr": args.lr,
        "aggregation": "fedavg",
        "codec.topk-fraction": args.topk_fraction,
    }


def run_codec(
    flat: dict[str, Any], codec: str, output: Path, secure: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One federated run with ``codec`` over the in-process grid (behind secure
    aggregation with the ``secure`` settings, when given).

    Returns
    -------
    dict
        Accuracy, bytes per client-round, the backbone's float32 size, wall time.
    """
    from flwr.app import MessageType

    from common import keys

    run = run_federation({**flat, "codec": codec, **(secure or {})}, output)
    rows, summary, grid, wall = run.rows, run.summary, run.grid, run.wall_seconds
    # Status replies ("send me the backbone") carry no adapter and count no bytes.
    uploads = sum(
        1
        for reply in grid.received
        if not reply.has_error()
        and (
            keys.ADAPTER_RECORD in reply.content.array_records
            or keys.MASKED_RECORD in reply.content.array_records
        )
    )
    downloads = sum(
        1 for m in grid.sent if m.metadata.message_type == MessageType.TRAIN
    )
    bytes_up = sum(row.get("bytes_up", 0) for row in rows)
    bytes_down = sum(row.get("bytes_down", 0) for row in rows)
    return {
        "codec": codec,
        "secure": secure is not None,
        "accuracy": rows[-1]["eval_accuracy"],
        "accuracy_per_round": [row["eval_accuracy"] for row in rows],
        "bytes_up_per_client_round": round(bytes_up / max(uploads, 1)),
        "bytes_down_per_client_round": round(bytes_down / max(downloads, 1)),
        "backbone_float32_bytes": summary["backbone"]["float32_bytes"],
        "client_rounds": uploads,
        "rejected": sum(row.get("rejected", 0) for row in rows),
        "clients": run.clients,
        "rounds": rows[-1]["round"],
        "wall_seconds": wall,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="demo corpus, 4 sites")
    parser.add_argument(
        "--codecs", default=",".join(ALL_CODECS), help="comma list; default all six"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--num-clients", type=int, default=20)
    parser.add_argument("--topk-fraction", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument(
        "--secure-codecs",
        default="fp32,int8",
        help="codecs also run behind secure aggregation (empty: none)",
    )
    parser.add_argument("--secagg-max-weight", type=float, default=2000.0)
    parser.add_argument(
        "--test-per-label",
        type=int,
        default=0,
        help="evaluate on this many CLINC150 test rows per intent (0: all 30)",
    )
    parser.add_argument("--out", default="", help="folder for the runs' outputs")
    args = parser.parse_args(argv)
    command = "python benchmarks/codec.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    log.setLevel(logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.quick:
        args.rounds, args.max_steps, args.batch_size = 2, 0, 16
        args.num_clients = 4
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    unknown = sorted(set(codecs) - set(ALL_CODECS))
    if unknown:
        parser.error(f"--codecs: unknown {unknown}; use {', '.join(ALL_CODECS)}")
    # fp32 first: the reference of every accuracy drop.
    codecs = ["fp32", *[c for c in codecs if c != "fp32"]]
    out = Path(args.out or tempfile.mkdtemp(prefix="fedgraft-codec-"))
    out.mkdir(parents=True, exist_ok=True)
    flat = base_config(args, out)
    secure = {"secagg.enabled": True, "secagg.max-weight": args.secagg_max_weight}
    cells: list[tuple[str, dict[str, Any] | None]] = [(c, None) for c in codecs]
    cells += [(c.strip(), secure) for c in args.secure_codecs.split(",") if c.strip()]
    reference: dict[str, Any] | None = None
    for codec, secure_settings in cells:
        log.info(
            "codec %s%s", codec, " behind secure aggregation" if secure_settings else ""
        )
        name = f"secure-{codec}" if secure_settings else codec
        with redirect_stdout(sys.stderr):  # the runs' tables; stdout is JSON
            result = run_codec(flat, codec, out / name, secure_settings)
        if secure_settings:
            result["secagg_max_weight"] = args.secagg_max_weight
        if reference is None:
            reference = result
        result["uplink_reduction_vs_full_model"] = round(
            result["backbone_float32_bytes"] / result["bytes_up_per_client_round"], 1
        )
        result["uplink_vs_fp32"] = round(
            result["bytes_up_per_client_round"]
            / reference["bytes_up_per_client_round"],
            4,
        )
        result["accuracy_drop_vs_fp32"] = round(
            reference["accuracy"] - result["accuracy"], 4
        )
        result["topk_fraction"] = args.topk_fraction if codec == "topk" else None
        result["command"] = command
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
