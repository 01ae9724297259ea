"""What a site keeps between rounds, on its own disk, so that a resumed run has it.

Flower's per-run context state starts empty in a resumed run (a new Flower run), so
the records a site carries from round to round are mirrored in its state folder::

    <state-dir>/<site>/<run identity>/<record>.r<round>.safetensors | .json

- ``<state-dir>``: node config ``state-dir``, else ``site-state/`` in the site's
  cache folder;
- ``<site>``: a digest of the node config keys that pick the site's rows
  (``data-path``, ``partition-id``, ``num-partitions``), so the virtual sites of a
  simulation that share a folder stay apart;
- ``<run identity>``: the coordinator's run identity (kept in its checkpoint, so a
  resumed run sends the same one; never Flower's run id, which a resume changes).

Before training, :meth:`SiteState.restore` puts into the context the copy saved
after the latest earlier round (FedSA's B, top-k's residual: a round the coordinator
runs again starts from what it started from before) or, for the DP-SGD accountant,
the latest copy (a round trained twice spent privacy twice). After training,
:meth:`SiteState.save` writes this round's copy and drops all but the last two.
Every file is written to a temporary name, synced and renamed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from client.adapters import LOCAL_FACTORS_RECORD, TOPK_RESIDUAL_RECORD
from common.wire import from_array_record, to_array_record

log = logging.getLogger(__name__)

#: The context-state record holding the site's DP-SGD accountant history
#: (client.private_training).
DP_SGD_RECORD = "fedgraft-dp-sgd"
#: Node config key of the site's state folder.
STATE_DIR_KEY = "state-dir"
#: Node config keys that identify a site's rows.
SITE_KEYS = ("data-path", "partition-id", "num-partitions")
#: Records restored from the copy saved before the current round.
ROUND_RECORDS = (LOCAL_FACTORS_RECORD, TOPK_RESIDUAL_RECORD)
#: Records restored from the latest copy (spent privacy is never rolled back).
LEDGER_RECORDS = (DP_SGD_RECORD,)
_KEPT_COPIES = 2
_NAME = re.compile(r"^(?P<record>[a-z0-9-]+)\.r(?P<round>\d+)\.(?:safetensors|json)$")
_IDENTITY = re.compile(r"^[0-9a-f]{16,64}$")


class SiteStateError(ValueError):
    """The site's state folder or a file in it is unusable; the message names it."""


def site_folder(node_config: Mapping[str, object], cache_dir: Path) -> Path:
    """The folder holding this site's state for every run."""
    configured = str(node_config.get(STATE_DIR_KEY, ""))
    root = Path(configured).expanduser() if configured else cache_dir / "site-state"
    site = json.dumps([str(node_config.get(key, "")) for key in SITE_KEYS])
    return root / hashlib.sha256(site.encode()).hexdigest()[:16]


class SiteState:
    """One site's records of one run on disk.

    Parameters
    ----------
    folder : Path
        ``<state-dir>/<site>``.
    run_identity : str
        The coordinator's run identity (lowercase hex).

    Raises
    ------
    SiteStateError
        When ``run_identity`` is not lowercase hex (it becomes a folder name).
    """

    def __init__(self, folder: Path, run_identity: str) -> None:
        if not _IDENTITY.match(run_identity):
            raise SiteStateError(
                f"run identity {run_identity[:80]!r} from the coordinator is not 16 "
                "to 64 lowercase hex digits; refusing to use it as a folder name"
            )
        self.directory = folder / run_identity

    def restore(self, context: Context, server_round: int) -> None:
        """Put the saved records into ``context.state`` before ``server_round``."""
        copies = self._copies()
        for record in (*ROUND_RECORDS, *LEDGER_RECORDS):
            rounds = sorted(copies.get(record, {}))
            if record in ROUND_RECORDS:
                rounds = [r for r in rounds if r < server_round]
            if rounds:
                context.state[record] = self._read(copies[record][rounds[-1]])

    def save(self, context: Context, server_round: int) -> None:
        """Write this round's copy of every kept record in ``context.state``."""
        self.directory.mkdir(parents=True, exist_ok=True)
        state = context.state
        for record in ROUND_RECORDS:
            if record in state.array_records:
                arrays = from_array_record(state.array_records[record])
                self._write(f"{record}.r{server_round}.safetensors", arrays)
        for record in LEDGER_RECORDS:
            if record in state.config_records:
                document = dict(state.config_records[record])
                self._write(f"{record}.r{server_round}.json", document)
        for record, rounds in self._copies().items():
            for old in sorted(rounds)[:-_KEPT_COPIES]:
                rounds[old].unlink()

    def _copies(self) -> dict[str, dict[int, Path]]:
        copies: dict[str, dict[int, Path]] = {}
        if not self.directory.is_dir():
            return copies
        for path in self.directory.iterdir():
            match = _NAME.match(path.name)
            if match:
                copies.setdefault(match["record"], {})[int(match["round"])] = path
        return copies

    @staticmethod
    def _read(path: Path) -> ArrayRecord | ConfigRecord:
        try:
            if path.suffix == ".json":
                return ConfigRecord(json.loads(path.read_text()))
            return to_array_record(load_file(str(path)))
        except (OSError, ValueError, SafetensorError) as error:
            raise SiteStateError(
                f"{path}: unreadable site state ({error}); delete the file to start "
                "this run's site state afresh (a resumed run then differs from an "
                "uninterrupted one)"
            ) from None

    def _write(self, name: str, content: Mapping[str, object]) -> None:
        handle, staging = tempfile.mkstemp(prefix=f".{name}.", dir=self.directory)
        os.close(handle)
        if name.endswith(".json"):
            Path(staging).write_text(json.dumps(dict(content)))
        else:
            save_file(dict(content), staging)  # type: ignore[arg-type]
        with open(staging, "rb") as stream:
            os.fsync(stream.fileno())
        os.replace(staging, self.directory / name)


__all__ = [
    "DP_SGD_RECORD",
    "LEDGER_RECORDS",
    "ROUND_RECORDS",
    "STATE_DIR_KEY",
    "SiteState",
    "SiteStateError",
    "site_folder",
]
